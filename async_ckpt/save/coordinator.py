"""A multi-rank save, as seen by a node writer (and by the coordinator, node 0's writer).

Node writer: take this process's own staged job, collect the job descriptors the node's other
local ranks posted to the Store, map their shared-memory buffers, stream each rank's records into
its own data file (all of the node's files concurrently, hashing in the same pass), make them
durable and report the files and their records. Coordinator: gather every node's report and every rank's announcement, check that the
ranks agree and that replicas match, build the single manifest, commit it with one exclusive
create and publish the outcome that every rank's handle resolves with. Nothing here calls a
collective; every wait has a deadline.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..format.codec import byte_view, codec_for
from ..errors import CheckpointError, ReplicationError
from ..format.names import manifest_path, step_dir
from ..dist.link import LinkTimeout, RemoteFailure
from ..format.manifest import ComponentEntry, FileEntry, Manifest, ShardEntry, TensorEntry
from ..format.metrics_file import encode
from .replicas import check_agreement, describe, find_mismatches, tensor_paths
from .staging import attach_shared
from ..format.tree import dtype_from_name, dtype_name

if TYPE_CHECKING:
    from .node_writer import NodeWriter, SaveJob

log = logging.getLogger("async_ckpt")
_MAX_ATTACHED = 16


def describe_job(job: "SaveJob", rank: int) -> dict:
    """What a node writer needs to write one rank's staged buffer (JSON, sent through the Store)."""
    shards = []
    for shard, tree, comp in zip(job.plan.shards, job.trees, job.components):
        shards.append({
            "component": comp.key, "pattern": shard.pattern.value, "shard": shard.shard,
            "num_tensors": shard.num_tensors, "tree_source": shard.tree_source,
            "tree": tree if shard.tree_source else None, "required": comp.required,
            "validation": comp.validation_level, "metadata": comp.metadata,
            "members": list(comp.members or ()),
            "slots": [[s.index, dtype_name(s.dtype), list(s.shape), s.nbytes, s.offset]
                      for s in shard.slots if s.write]})
    return {"rank": rank, "step": job.step, "shm": job.buffer.name,
            "capacity": job.buffer.capacity, "shards": shards}


def _attach(writer: "NodeWriter", name: str, capacity: int):
    cached = writer.attached.get(name)
    if cached is None:
        cached = attach_shared(name, capacity)
        writer.attached[name] = cached
        while len(writer.attached) > _MAX_ATTACHED:   # peers replaced their buffers long ago
            writer.attached.popitem(last=False)
    writer.attached.move_to_end(name)
    return cached


def _causes(exc: BaseException, topo, what_missing: str) -> dict[int, str]:
    if isinstance(exc, RemoteFailure):
        return dict(exc.causes)
    if isinstance(exc, LinkTimeout):
        return {int(r): f"{what_missing} ({exc})" for r in exc.missing}
    return {topo.rank: f"{type(exc).__name__}: {exc}"}


def write_node(writer: "NodeWriter", job: "SaveJob") -> dict:
    """Write this node's data file; return the report for the coordinator (or an error report)."""
    link, topo, storage = writer.link, writer.topo, writer.storage
    folder, seq, world = step_dir(job.step), job.seq, range(topo.world_size)
    try:
        if topo.rank != 0:
            link.post(seq, f"begun/{topo.node}", 1)   # the coordinator's hand-over deadline ends
        peers = [r for r in topo.node_ranks() if r != topo.rank]
        descs = [describe_job(job, topo.rank)]
        if peers:
            got = link.gather(seq, {r: f"job/{r}" for r in peers}, "rank(s)", world,
                              alive={r: r for r in peers})
            descs += [got[r] for r in peers]
        job.buffer.wait_copied()
        buffers = {topo.rank: job.buffer.tensor}
        for desc in descs[1:]:
            buffers[desc["rank"]] = _attach(writer, desc["shm"], desc["capacity"])
        if errors := link.errors(seq, world):
            raise RemoteFailure(errors)             # no point writing a save that has failed
        t0 = time.perf_counter()
        # One file per local rank, written concurrently: parallel streams keep the disk (or the
        # object store) busier than one, as DCP's per-rank writers do.
        with ThreadPoolExecutor(len(descs), thread_name_prefix="ckpt-node-file") as pool:
            futures = [pool.submit(_write_rank_file, writer, folder, d, buffers[d["rank"]])
                       for d in descs]
            outcomes = [f.result() for f in futures]    # the pool waits for every writer first
        storage.sync_dir(folder)
        files = [{"file": name, "size": result.size, "hash": result.hash}
                 for name, result in outcomes if name is not None]
        shards = []
        for d, (name, result) in zip(descs, outcomes):
            results = iter(result.records if result is not None else ())
            for sh in d["shards"]:
                tensors = []
                for index, dtype, shape, nbytes, _offset in sh.pop("slots"):
                    rec = next(results)
                    tensors.append([index, dtype, shape, name, rec.offset, rec.length, nbytes,
                                    rec.hash, list(rec.frames), rec.codec])
                shards.append({**sh, "rank": d["rank"], "tensors": tensors})
        return {"node": topo.node, "rank": topo.rank, "files": files,
                "write_s": time.perf_counter() - t0, "shards": shards}
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which fails the save
        log.error("[rank %d step %d] node %d failed to write: %r", topo.rank, job.step, topo.node, exc)
        return {"node": topo.node, "rank": topo.rank,
                "causes": _causes(exc, topo, "did not hand over its staged state")}


def _write_rank_file(writer: "NodeWriter", folder: str, desc: dict, buffer):
    """Stream one rank's staged records into its own data file; (None, None) if it has none."""
    slots = [slot for sh in desc["shards"] for slot in sh["slots"]]
    if not slots:
        return None, None
    records = [byte_view(buffer[offset:offset + nbytes]) for _i, _dt, _sh, nbytes, offset in slots]
    codecs = [codec_for(dtype_from_name(dt, "staged slot"), writer.codec != "raw")
              for _i, dt, _sh, _n, _o in slots]
    name = f"data-n{writer.topo.node:05d}-r{desc['rank']:05d}-{os.urandom(4).hex()}.bin"
    return name, writer.datafile.write_file(writer.storage, f"{folder}/{name}", records, codecs)


def build_manifest(writer: "NodeWriter", job: "SaveJob", reports: list[dict]
                   ) -> tuple[Manifest, dict[str, list[int]], dict[str, dict[int, str]]]:
    """The manifest from every node's report; also each REPLICATED tensor's owner and paths."""
    files: dict[str, FileEntry] = {}
    parts: dict[tuple[str, str], dict] = {}
    for report in reports:
        for f in report["files"]:
            files[f["file"]] = FileEntry(f["size"], f["hash"])
        for sh in report["shards"]:
            part = parts.setdefault((sh["component"], sh["shard"]), {
                "meta": sh, "tree": None, "tensors": {}, "owners": set()})
            if sh["tree_source"]:
                part["tree"] = sh["tree"]
                part["owners"].add(sh["rank"])
            for index, dtype, shape, file, offset, length, nbytes, digest, frames, codec in sh["tensors"]:
                part["tensors"][index] = (TensorEntry(dtype, tuple(shape), file, offset, length,
                                                      nbytes, codec, digest, tuple(frames)),
                                          sh["rank"])
                part["owners"].add(sh["rank"])
    components: dict[str, ComponentEntry] = {}
    owners: dict[str, list[int]] = {}
    paths: dict[str, dict[int, str]] = {}
    nbytes = 0
    for (key, shard), part in sorted(parts.items()):
        meta, tensors = part["meta"], part["tensors"]
        if part["tree"] is None or sorted(tensors) != list(range(meta["num_tensors"])):
            raise CheckpointError(f"component {key!r} shard {shard!r} is incomplete: no node "
                                  f"reported {'its skeleton' if part['tree'] is None else 'all its tensors'}")
        entry = components.setdefault(key, ComponentEntry(
            meta["pattern"], meta["required"], meta["validation"], meta["metadata"], {}))
        ordered = [tensors[i] for i in range(meta["num_tensors"])]
        entry.shards[shard] = ShardEntry(part["tree"], tuple(t for t, _ in ordered),
                                         tuple(sorted(part["owners"])), tuple(meta["members"]))
        nbytes += sum(t.nbytes for t, _ in ordered)
        if meta["pattern"] == "replicated":
            owners[key] = [rank for _, rank in ordered]
            paths[key] = tensor_paths(part["tree"])
    manifest = Manifest(
        step=job.step,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        topology=writer.topo.as_json(), metrics=encode(job.metrics), files=files,
        components=components, nbytes=nbytes, stored_nbytes=sum(f.size for f in files.values()),
        timings=dict(job.timings), versions=writer.versions)
    return manifest, owners, paths


def _full_compare(writer: "NodeWriter", job: "SaveJob", manifest: Manifest, mismatches: list[dict]
                  ) -> dict[tuple[str, int, int], dict]:
    """FULL: ask each mismatching rank to compare its replica with the written copy."""
    request = []
    for m in mismatches:
        if "tensor" in m and m["level"] == "full":
            entry = manifest.components[m["component"]].shards["replicated"].tensors[m["tensor"]]
            # Compare each odd replica with the written copy; when the writer is the odd one,
            # a rank of the majority compares instead and the result is the writer's.
            pairs = ([[r, r] for r in m["ranks"]] if m["owner"] in m["agree"]
                     else [[m["agree"][0], m["owner"]]])
            request.append({"component": m["component"], "tensor": m["tensor"], "pairs": pairs,
                            "record": [entry.dtype, list(entry.shape), entry.file, entry.offset,
                                       entry.length, entry.nbytes, entry.codec, entry.hash,
                                       list(entry.frames)]})
    if not request:
        return {}
    link = writer.link
    link.post(job.seq, "fullreq", request)
    ranks = sorted({pair[0] for item in request for pair in item["pairs"]})
    answers = link.gather(job.seq, {r: f"full/{r}" for r in ranks}, "rank(s)",
                          range(writer.topo.world_size), stop_on_outcome=False)
    return {(key, index, report_as): result for items in answers.values()
            for key, index, report_as, result in items}


def coordinate(writer: "NodeWriter", job: "SaveJob", own: dict) -> None:
    """Node 0's writer: validate, commit the one manifest, publish the outcome, run retention."""
    link, topo, storage, seq = writer.link, writer.topo, writer.storage, job.seq
    world = range(topo.world_size)
    try:
        if "causes" in own:
            raise RemoteFailure(own["causes"])
        nodes = range(1, topo.num_nodes)
        writers = {n: topo.node_writer_of(n) for n in nodes}
        try:
            # Every node writer must start this save within timeout_s; after that it may write
            # for as long as it needs, as long as its process is alive.
            link.gather(seq, {n: f"begun/{n}" for n in nodes}, "node(s)", world, alive=writers)
            others = link.gather(seq, {n: f"node/{n}" for n in nodes}, "node(s)", world,
                                 alive=writers, forever=True)
        except LinkTimeout as exc:
            exc.missing = [topo.node_writer_of(n) for n in exc.missing]
            raise
        reports = [own] + [others[n] for n in sorted(others)]
        causes = {int(r): c for rep in reports for r, c in rep.get("causes", {}).items()}
        if causes:
            raise RemoteFailure(causes)
        announces = link.gather(seq, {r: f"vh/{r}" for r in world}, "rank(s)", world,
                                alive={r: r for r in world})
        # Every rank announced this save, so every worker and node writer is done with the
        # previous one: only now may its keys go (deleting earlier races a reader's get()).
        link.delete(seq - 1, ["outcome", "nerr", "fullreq"] + [f"begun/{n}" for n in nodes]
                    + [f"node/{n}" for n in nodes]
                    + [f"{kind}/{r}" for r in world for kind in ("job", "vh", "err", "full")])
        disagreement = check_agreement(announces)
        if disagreement:
            raise CheckpointError(disagreement)
        manifest, owners, paths = build_manifest(writer, job, reports)
        mismatches = find_mismatches(announces, owners)
        if mismatches:
            raise describe(mismatches, paths, _full_compare(writer, job, manifest, mismatches))
        job.timings["write_s"] = own["write_s"]
        job.timings["total_s"] = time.perf_counter() - job.started
        manifest = Manifest(**{**manifest.__dict__, "timings": dict(job.timings)})
        try:
            storage.create_exclusive(manifest_path(job.step), manifest.to_json())
        except FileExistsError:
            raise CheckpointError(f"step {job.step} was committed by someone else meanwhile") from None
    except Exception as exc:  # noqa: BLE001 - every failure becomes the published outcome
        causes = _causes(exc, topo, "did not report in time")
        if isinstance(exc, ReplicationError):
            causes = getattr(exc, "per_rank", None) or causes
        log.error("[rank %d step %d] save failed: %s", topo.rank, job.step, exc)
        link.post(seq, "outcome", {"ok": False, "message": str(exc), "causes": causes,
                                   "replication": isinstance(exc, ReplicationError)})
        return
    info = {"url": storage.child_url(step_dir(job.step)), "nbytes": manifest.nbytes,
            "stored_nbytes": manifest.stored_nbytes, "created": manifest.created,
            "timings": manifest.timings, "metrics": encode(job.metrics)}
    link.post(seq, "outcome", {"ok": True, "info": info})
    log.info("[rank %d step %d] committed %s (%.1f MiB from %d node(s), %.2f s after save())",
             topo.rank, job.step, info["url"], manifest.nbytes / 2**20, topo.num_nodes,
             job.timings["total_s"])
    try:
        writer.after_commit(job.step)
    except Exception:  # noqa: BLE001 - retention trouble must not fail a committed save
        log.exception("[rank %d step %d] retention failed", topo.rank, job.step)


def node_save(writer: "NodeWriter", job: "SaveJob") -> None:
    report = write_node(writer, job)
    job.written.set()
    if writer.topo.rank == 0:
        coordinate(writer, job, report)
    else:
        writer.link.post(job.seq, f"node/{writer.topo.node}", report)
