"""The coordinator: node 0's writer in its second role, deciding each save's verdict.

Call sequence, on node 0's writer thread, once per save (``run``), right after node 0 wrote its
own files:

1. wait for every other node writer to start the save (``begun/<n>``, within ``timeout_s``) and to
   report (``node/<n>``; as long as it takes while its heartbeat goes on);
2. gather every rank's `Announcement` (``vh/<rank>``) and check that all ranks resolved the same
   components, patterns, groups and REPLICATED shapes;
3. assemble the manifest from the node reports (`save.assemble`), compare replica digests and,
   at FULL level, ask the ranks holding odd replicas to compare them with the written copy
   (``fullreq`` / ``full/<rank>``);
4. commit (`save.commit.Committer.commit`) and publish the `Outcome` (``outcome``) that every
   rank's worker resolves its handle with; set ``job.published``;
5. run the post-commit work (sweep, retention: ``Committer.after_commit``); set ``job.retained``.

Any failure publishes a failed Outcome naming each failing rank instead; when every node has
reported (no writer can still be writing), what the save wrote is removed first. A world of one
runs the same sequence: steps 1 and 2 have no peers to wait for. Nothing here calls a collective;
every wait has a deadline or a liveness check.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from ..dist.link import LinkTimeout, RemoteFailure, StoreLink, causes_of
from ..dist.liveness import CallerWatch
from ..dist.messages import (Announcement, Begun, CommittedInfo, FullAnswer, FullItem, FullRequest,
                             NodeReport, Outcome, WrittenTensor)
from ..dist.topology import Topology
from ..errors import CheckpointError, ReplicationError
from ..format.manifest import Manifest
from ..format.metrics_file import encode
from ..format.names import step_dir
from ..storage import Storage
from .assemble import assemble
from .commit import Committer
from .job import SaveJob
from .replicas import check_agreement, describe, find_mismatches

log = logging.getLogger("async_ckpt")


class Coordinator:
    """Validates, commits and publishes each save; see the module docstring for the sequence."""

    def __init__(self, storage: Storage, topo: Topology, link: StoreLink, committer: Committer,
                 versions: dict[str, str]):
        self.storage, self.topo, self.link = storage, topo, link
        self.committer, self.versions = committer, versions

    def before_write(self, job: SaveJob) -> None:
        """Called by node 0's writer before it writes: with a single node, that writer is the
        only one writing this save, so a killed earlier attempt's leftovers of the step (on S3,
        unfinished multipart uploads no listing shows) can go now. With several nodes another node
        may already be writing; their leftovers go when the folder is swept as garbage."""
        if self.topo.num_nodes == 1:
            self.committer.discard_uncommitted(job.step)

    def run(self, job: SaveJob, own: NodeReport) -> None:
        manifest, all_reported = None, False
        try:
            if own.failed:          # no need to wait for the other nodes to fail this save
                all_reported = self.topo.num_nodes == 1
                raise RemoteFailure(dict(own.causes))
            reports = [own] + self._other_reports(job)
            all_reported = True
            manifest = self._decide(job, reports)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the published outcome
            self._fail(job, exc, discard=all_reported)
        finally:
            job.published.set()
        if manifest is not None:
            try:
                self.committer.after_commit(manifest)
            except Exception:  # noqa: BLE001 - retention trouble must not fail a committed save
                log.exception("[rank %d step %d] retention failed", self.topo.rank, job.step)
        job.retained.set()

    # -- the sequence -----------------------------------------------------------------------------
    def _decide(self, job: SaveJob, reports: list[NodeReport]) -> Manifest:
        link, topo, seq = self.link, self.topo, job.seq
        world = range(topo.world_size)
        causes = {r: c for rep in reports for r, c in rep.causes.items()}
        if causes:
            raise RemoteFailure(causes)
        peers = {r: r for r in world if r != topo.rank}
        announces = link.gather(seq, {r: f"vh/{r}" for r in world}, Announcement, "rank(s)", world,
                                alive=peers, watch=CallerWatch(link, seq, job.step, peers))
        # Every rank announced this save, so every worker has read the previous one's outcome:
        # only now may its shared keys go (each rank deleted its own keys of it already).
        link.retire(seq - 1, ["outcome", "nev", "errors", "fullreq"])
        disagreement = check_agreement(announces, job.replicated_shapes)
        if disagreement:
            raise CheckpointError(disagreement)
        job.timings["write_s"] = reports[0].write_s
        assembled = assemble(job.step, topo, reports, job.metrics, {}, self.versions)
        copies = {(k, name): tuple(e.members) for k, c in assembled.manifest.components.items()
                  for name, e in c.shards.items() if c.sharing_pattern == "per_group"}
        mismatches = find_mismatches(announces, assembled.owners, copies)
        if mismatches:
            raise describe(mismatches, assembled.trees, self._full_compare(job, assembled.manifest, mismatches))
        job.timings["total_s"] = time.perf_counter() - job.started
        manifest = dataclasses.replace(assembled.manifest, timings=dict(job.timings),
                                       retention=self.committer.options.retention_policy())
        self.committer.commit(manifest)
        info = CommittedInfo(self.storage.child_url(step_dir(job.step)), manifest.nbytes,
                             manifest.stored_nbytes, manifest.created, manifest.timings,
                             encode(job.metrics))
        link.post(seq, "outcome", Outcome(ok=True, info=info))
        log.info("[rank %d step %d] committed %s (%.1f MiB from %d node(s), %.2f s after save())",
                 topo.rank, job.step, info.url, manifest.nbytes / 2**20, topo.num_nodes,
                 job.timings["total_s"])
        return manifest

    def _other_reports(self, job: SaveJob) -> list[NodeReport]:
        topo, link, seq = self.topo, self.link, job.seq
        nodes = range(1, topo.num_nodes)
        if not nodes:
            return []
        writers = {n: topo.node_writer_of(n) for n in nodes}
        world = range(topo.world_size)
        try:
            # Every node writer must start this save within timeout_s; after that it may write
            # for as long as it needs, as long as its process is alive.
            link.gather(seq, {n: f"begun/{n}" for n in nodes}, Begun, "node(s)", world, alive=writers,
                        watch=CallerWatch(link, seq, job.step, writers))
            others = link.gather(seq, {n: f"node/{n}" for n in nodes}, NodeReport, "node(s)", world,
                                 alive=writers, forever=True)
        except LinkTimeout as exc:
            exc.missing = [topo.node_writer_of(n) for n in exc.missing]
            raise
        return [others[n] for n in sorted(others)]

    def _fail(self, job: SaveJob, exc: Exception, discard: bool) -> None:
        topo = self.topo
        causes = causes_of(exc, topo.rank, "did not report in time")
        if isinstance(exc, ReplicationError):
            causes = exc.per_rank or causes
        if not isinstance(exc, (RemoteFailure, LinkTimeout)):
            job.local_errors.setdefault(topo.rank, exc)
        log.error("[rank %d step %d] save failed: %s", topo.rank, job.step, exc)
        if discard:
            self.committer.discard_uncommitted(job.step)
        self.link.post(job.seq, "outcome", Outcome(ok=False, message=str(exc), causes=causes,
                                                   replication=isinstance(exc, ReplicationError)))
        self.link.bump(job.seq)          # wakes every waiter of this save (see dist.link)

    def _full_compare(self, job: SaveJob, manifest: Manifest, mismatches: list[dict]
                      ) -> dict[tuple[str, int, int], dict]:
        """FULL: ask each mismatching rank to compare its replica with the written copy."""
        items = []
        for m in mismatches:
            if "tensor" in m and m["level"] == "full":
                copy = m.get("copy", "replicated")
                entry = manifest.components[m["component"]].shards[copy].tensors[m["tensor"]]
                # Compare each odd replica with the written copy; when the writer is the odd one,
                # a rank of the majority compares instead and the result is the writer's.
                pairs = (tuple((r, r) for r in m["ranks"]) if m["owner"] in m["agree"]
                         else ((m["agree"][0], m["owner"]),))
                record = WrittenTensor(m["tensor"], entry.dtype, entry.shape, entry.file, entry.offset,
                                       entry.length, entry.nbytes, entry.hash, entry.frames, entry.codec)
                items.append(FullItem(m["component"], m["tensor"], pairs, record))
        if not items:
            return {}
        link = self.link
        link.post(job.seq, "fullreq", FullRequest(tuple(items)))
        link.bump(job.seq)               # the waiting rank workers look for it
        ranks = sorted({pair[0] for item in items for pair in item.pairs})
        answers = link.gather(job.seq, {r: f"full/{r}" for r in ranks}, FullAnswer, "rank(s)",
                              range(self.topo.world_size), stop_on_outcome=False)
        return {(r.component, r.tensor, r.report_as): {"max_abs_diff": r.max_abs_diff,
                                                       "differing": r.differing}
                for answer in answers.values() for r in answer.results}

