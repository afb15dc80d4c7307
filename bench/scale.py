"""`python -m bench.scale`: what a save costs at 8 to 4,096 ranks, simulated in one process.

Each row is a topology (ranks, 8 per node) x tensors per rank x pattern (PER_RANK: every rank its
own copy, FSDP-like; REPLICATED: one copy spread over all ranks). A row drives the library's own
code for one save: the real `Planner` for every rank, `SaveJob.descriptor` and the rank worker's
announcement, the real `NodeWriter.write` (waiting for its peers' descriptors, building the node
report; only the data-file write is stubbed), and the real `Coordinator.run` (gathering,
agreement, `assemble`, the manifest commit to a local folder, sweep and retention), all through
`StoreLink`s over a real TCPStore on 127.0.0.1 (every message encoded, sent, stored and decoded).
Every Store client is wrapped in `CountingStore`, which counts requests (round trips) per role.

Per row it reports: root manifest bytes, the largest manifest fragment (`largest_fragment`: none
before per-node fragments exist), coordinator time per save (all messages already posted, so
this is processing, not waiting), retention time, Store round trips per save by role, what one
loading rank parses and how long (`loading_rank_reads`), objects per checkpoint
(`objects_per_checkpoint`). Separately, per world size, a waiting phase measures Store round
trips per second of waiting ranks (real `RankWorker._wait_outcome` plus the rank's own real
`Heartbeat`, on their own clients and threads) and of the coordinator waiting for node reports,
while a save is in flight. With ``--s3 moto|seaweedfs`` an S3 phase counts S3 requests per save
at 8 and 16 ranks against a real loopback server (the data objects are real, tiny) and per first
save (the write probe), and the table extrapolates them.

    python -m bench.scale --quick                      # 8 and 64 ranks x 100 tensors (~1 min)
    python -m bench.scale                              # every row that fits --max-entries
    python -m bench.scale --rows 512x1000,4096x100 --label after --out bench/results/scale-after
    python -m bench.scale --compare bench/results/scale-before.json bench/results/scale-after.json

Rows whose ranks x tensors exceed ``--max-entries`` (default 600,000) are skipped and marked
"not run": at 4,096 x 1,000 the old protocol needs ~10 GB and minutes per save on one machine.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from async_ckpt.dist.link import StoreLink
from async_ckpt.dist.messages import Outcome, WrittenFile
from async_ckpt.dist.relay import BoardReader, BoardWriter
from async_ckpt.dist.topology import Topology
from async_ckpt.format import fragments
from async_ckpt.format.codec import segments_hash
from async_ckpt.format.manifest import MANIFEST_NAME, Manifest
from async_ckpt.format.names import read_manifest, step_dir
from async_ckpt.format.tree import flatten
from async_ckpt.handle import Settlement
from async_ckpt.options import CheckpointOptions
from async_ckpt.save import plan as plan_module
from async_ckpt.save.commit import Committer
from async_ckpt.save.coordinator import Coordinator
from async_ckpt.save.datafile import FileResult, RecordResult
from async_ckpt.save.job import ComponentSpec, SaveJob
from async_ckpt.save.node_writer import NodeWriter
from async_ckpt.save.plan import Planner, state_layout
from async_ckpt.sharing import stages_every_replica
from async_ckpt.storage import LocalStorage
from async_ckpt.storage.base import SEGMENT_ALIGN
from async_ckpt.types import SharingPattern, ValidationLevel

from .scale_report import _git, compare, markdown
from .scale_store import Tally, link_for, new_store, warm
from .scale_workers import PER_NODE, announce, retire, run_waiting, wait_outcome

ALL_ROWS = [(w, t) for w in (8, 64, 512, 4096) for t in (100, 1000)]
QUICK_ROWS = [(8, 100), (64, 100)]
PATTERNS = {"per_rank": SharingPattern.PER_RANK, "replicated": SharingPattern.REPLICATED}
_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
             "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")
_SHAPES = ((512, 4096), (128, 4096), (128, 4096), (4096, 512), (1792, 4096), (1792, 4096),
           (4096, 1792), (4096,), (4096,))


# -- the simulated state -------------------------------------------------------------------------
def llama_state(tensors: int) -> dict[str, torch.Tensor]:
    """`tensors` bf16 tensors named like a Llama checkpoint's (~40 characters); meta tensors: only
    their dtype and shape matter here."""
    state = {}
    for i in range(tensors):
        name = f"model.layers.{i // len(_SUFFIXES)}.{_SUFFIXES[i % len(_SUFFIXES)]}"
        state[name] = torch.empty(_SHAPES[i % len(_SHAPES)], dtype=torch.bfloat16, device="meta")
    return state


class _StubBuffer:
    """What a SaveJob needs of a staging buffer when nothing is staged."""

    def __init__(self, name: str, capacity: int):
        self.name, self.capacity, self.tensor = name, capacity, None

    def views(self, plan: Any) -> list[list[torch.Tensor]]:
        return [[] for _ in plan.shards]

    def wait_copied(self) -> None:
        return None


class _Writer(NodeWriter):
    """The real NodeWriter.write (waiting for peers, building the report, writing the node's
    manifest fragment to `storage`) without the data write: each rank's "file" gets fabricated
    records of the right sizes (`real_objects`: plus a real, tiny object, for the S3 phase)."""

    def __init__(self, topo: Topology, link: StoreLink, storage: Any, real_objects: bool = False):
        self.storage, self.topo, self.link = storage, topo, link
        self.streamer, self.compressed, self.coordinator = None, False, None  # type: ignore[assignment]
        self.real_objects = real_objects
        self.node_object = True

    def _attach(self, name: str, capacity: int) -> Any:
        return None

    def _fabricate(self, desc: Any, base: int = 0) -> FileResult | None:
        slots = [slot for sh in desc.shards for slot in sh.slots]
        if not slots:
            return None
        offset, records = 0, []
        for slot in slots:
            records.append(RecordResult(base + offset, slot.nbytes, f"{desc.rank:08x}{slot.index:024x}", ()))
            offset += (slot.nbytes + 63) // 64 * 64
        return FileResult(offset, "f" * 32, tuple(records))

    def _real_object(self, folder: str, name: str) -> None:
        if self.real_objects:          # the S3 phase: a real (tiny) object per data file
            writer = self.storage.open_writer(f"{folder}/{name}")
            writer.write(memoryview(b"\0" * 1024))
            writer.commit()

    def _write_rank_file(self, folder: str, desc: Any, buffer: Any) -> tuple[Any, Any]:
        result = self._fabricate(desc)
        if result is None:
            return None, None
        name = f"data-n{self.topo.node:05d}-r{desc.rank:05d}-{os.urandom(4).hex()}.bin"
        self._real_object(folder, name)
        return name, result

    def _write_node_object(self, folder: str, descs: Any, buffers: Any) -> tuple[Any, Any]:
        """One object per node, each rank's fabricated records a segment of it."""
        name = f"data-n{self.topo.node:05d}-{os.urandom(4).hex()}.bin"
        base, segments, outcomes = 0, [], []
        for desc in sorted(descs, key=lambda d: d.rank):
            result = self._fabricate(desc, base)
            size = result.size if result is not None else 0
            segments.append((base, size, f"{desc.rank:032x}"))
            outcomes.append((desc.rank, result))
            base += (size + SEGMENT_ALIGN - 1) // SEGMENT_ALIGN * SEGMENT_ALIGN
        self._real_object(folder, name)
        by_rank = dict(outcomes)
        written = WrittenFile(name, base, segments_hash(segments), tuple(segments))
        return (written,), [(name if by_rank[d.rank] is not None else None, by_rank[d.rank]) for d in descs]


@dataclasses.dataclass
class World:
    """Every simulated rank's topology, plan and job for one row."""
    topos: list[Topology]
    jobs: list[SaveJob]
    plan_s: float
    owners_s: float


def build_world(world: int, tensors: int, pattern: SharingPattern, step: int, seq: int) -> World:
    local = min(PER_NODE, world)
    topos = [Topology(r, world, r % local, local, r // local) for r in range(world)]
    meta = llama_state(tensors)
    tree, _ = flatten({k: torch.zeros(1, dtype=torch.bfloat16) for k in meta}, "model")
    flat = list(meta.values())        # flatten keeps the dict's order
    level = (ValidationLevel.QUICK if pattern is SharingPattern.REPLICATED else ValidationLevel.NONE)
    shapes = ({"model": tuple((str(t.dtype), tuple(t.shape)) for t in flat)}
              if pattern is SharingPattern.REPLICATED else {})
    real_owners = plan_module.replica_owners
    memo: dict[Any, Any] = {}
    owners_s = 0.0

    def owners(sizes: list[int], topo: Topology) -> Any:
        # Every rank computes the same assignment; time it once, reuse it for the other ranks.
        nonlocal owners_s
        key = (tuple(sizes), topo.world_size, topo.local_world_size)
        if key not in memo:
            t0 = time.perf_counter()
            memo[key] = real_owners(sizes, topo)
            owners_s = time.perf_counter() - t0
        return memo[key]
    plan_module.replica_owners = owners
    jobs, plan_s = [], 0.0
    try:
        for topo in topos:
            stage_all = stages_every_replica(pattern, level, topo)
            t0 = time.perf_counter()
            plan = Planner(topo).plan(state_layout([("model", pattern, None, stage_all, flat)]))
            plan_s = max(plan_s, time.perf_counter() - t0)
            jobs.append(SaveJob(step, seq, plan, _StubBuffer(f"shm-{topo.rank}", plan.buffer_nbytes),  # type: ignore[arg-type]
                                [tree], [ComponentSpec("model", True, level.value, None)],
                                {"loss": 1.0 / step}, Settlement(step), time.perf_counter(),
                                replicated_shapes=shapes))
    finally:
        plan_module.replica_owners = real_owners
    return World(topos, jobs, plan_s, owners_s)


# -- what a checkpoint is made of, and what a loading rank reads -----------------------------------
def largest_fragment(storage: LocalStorage, step: int, manifest: Manifest) -> int | None:
    """Bytes of the largest per-node manifest fragment of `step` (None: no fragments)."""
    return max((ref.size for ref in manifest.fragments.values()), default=None)


def loading_rank_reads(storage: LocalStorage, step: int, rank: int) -> tuple[int, float]:
    """(bytes, seconds) that one loading rank reads and validates before it reads any data: the
    root manifest and the fragment holding its copy (the loader's own calls: load/restore.py)."""
    t0 = time.perf_counter()
    root = read_manifest(storage, step_dir(step), step, fragments=False)
    copies = root.copies("model")
    name = f"rank{rank}" if f"rank{rank}" in copies else None
    needed = root.fragments_of("model", name) if name is not None else []
    fragments.complete(storage, step_dir(step), root, needed)
    return (storage.size(f"{step_dir(step)}/{MANIFEST_NAME}") + sum(root.fragments[n].size for n in needed),
            time.perf_counter() - t0)


def objects_per_checkpoint(storage: LocalStorage, step: int, manifest: Manifest) -> int:
    """Objects a committed checkpoint consists of (data files are stubbed: counted from the
    manifest): data files, fragments and the root."""
    return len(manifest.files) + len(manifest.fragments) + 1


# -- one save of one row -------------------------------------------------------------------------
def run_row(master: Any, root: str, world: int, tensors: int, pattern_name: str, seq: int,
            sample: int = 16) -> dict:
    pattern = PATTERNS[pattern_name]
    step = seq * 10
    ns = f"bench/{world}x{tensors}/{pattern_name}"
    tallies = {role: Tally() for role in ("ranks", "node_writers", "coordinator", "workers")}
    links = {role: link_for(master, ns, tally) for role, tally in tallies.items()}
    for link in links.values():
        warm(link)                      # the client connections, outside every figure
    for tally in tallies.values():
        tally.ops.clear()
    t0 = time.perf_counter()
    w = build_world(world, tensors, pattern, step, seq)
    build_s = time.perf_counter() - t0
    storage = LocalStorage(root)
    os.makedirs(os.path.join(root, step_dir(step)), exist_ok=True)   # data writes are stubbed
    options = CheckpointOptions.from_keywords({}, keep_last=2, keep_best=1, best_metric="loss",
                                              greater_is_better=False)
    committer = Committer(storage, options, 0, w.topos[0].num_nodes > 1, lambda: {step})
    coordinator = Coordinator(storage, w.topos[0], links["coordinator"], committer, {"bench": "scale"})
    # Every rank's hand-over and announcement, then every node's report (node 0's in process).
    own_report = None
    for node in range(w.topos[0].num_nodes):
        ranks = list(w.topos[0].node_ranks(node))
        for r in ranks[1:]:
            links["ranks"].post(seq, f"job/{r}", w.jobs[r].descriptor(r))
        for r in ranks:
            links["ranks"].post(seq, f"vh/{r}", announce(w.jobs[r], w.topos[r], links["ranks"]))
        writer = _Writer(w.topos[ranks[0]], links["node_writers"], storage)
        report = writer.write(w.jobs[ranks[0]])
        if report.failed:
            raise RuntimeError(f"node {node} failed: {report.causes}")
        if node == 0:
            own_report = report
        else:
            links["node_writers"].post(seq, f"node/{node}", report)
    job0 = w.jobs[0]
    t0 = time.perf_counter()
    thread = threading.Thread(target=coordinator.run, args=(job0, own_report))
    thread.start()
    job0.published.wait()
    coordinator_s = time.perf_counter() - t0
    thread.join()
    retention_s = time.perf_counter() - t0 - coordinator_s
    outcome = links["workers"].get(seq, "outcome", Outcome)
    if not outcome.ok:
        raise RuntimeError(f"the simulated save failed: {outcome.message[:500]}")
    # Every other rank's worker fetches the verdict: measured on a sample, counted for all.
    # A rank that is not its node's writer reads the outcome off its node's board (dist.relay),
    # which local rank 0's worker wrote as it learnt it, and found once per checkpointer.
    writers = [r for r in range(1, world) if w.topos[r].is_node_writer]
    others = [r for r in range(1, world) if not w.topos[r].is_node_writer]
    kinds = {"writers": writers[:: max(1, len(writers) // sample)][:sample],
             "others": others[:: max(1, len(others) // sample)][:sample]}
    sampled = kinds["writers"] + kinds["others"]
    boards = {w.topos[r].node: BoardWriter.create() for r in sampled}
    readers = {node: BoardReader.attach(board.name) for node, board in boards.items()}
    for board in boards.values():
        board.publish(seq, 0, outcome)
    workers_total = 0.0
    try:
        for kind, ranks in kinds.items():
            before = tallies["workers"].total()
            for r in ranks:
                node = w.topos[r].node
                wait_outcome(w.jobs[r], w.topos[r], links["workers"], boards[node], readers[node])
                retire(w.jobs[r], w.topos[r], links["workers"])
            if ranks:
                each = (tallies["workers"].total() - before) / len(ranks)
                workers_total += each * len(writers if kind == "writers" else others)
    finally:
        for node, board in boards.items():
            if readers[node] is not None:
                readers[node].close()  # type: ignore[union-attr]
            board.close()
    per_worker = workers_total / max(1, world - 1)
    manifest = read_manifest(storage, step_dir(step), step, fragments=False)
    load_bytes, load_s = loading_rank_reads(storage, step, world - 1)
    per_role = {role: t.total() for role, t in tallies.items() if role != "workers"}
    per_role["workers"] = round(per_worker * (world - 1))
    return {
        "world": world, "tensors": tensors, "pattern": pattern_name, "nodes": w.topos[0].num_nodes,
        "manifest_bytes": storage.size(f"{step_dir(step)}/{MANIFEST_NAME}"),
        "largest_fragment_bytes": largest_fragment(storage, step, manifest),
        "coordinator_s": round(coordinator_s, 4), "retention_s": round(retention_s, 4),
        "plan_s_per_rank": round(w.plan_s, 4), "replica_owners_s": round(w.owners_s, 4),
        "build_s": round(build_s, 2),
        "store_round_trips": per_role, "store_round_trips_total": sum(per_role.values()),
        "store_ops": {role: t.snapshot() for role, t in tallies.items()},
        "worker_round_trips_each": per_worker,
        "load_bytes": load_bytes, "load_s": round(load_s, 4),
        "objects": objects_per_checkpoint(storage, step, manifest),
    }


def parse_rows(text: str) -> list[tuple[int, int]]:
    rows = []
    for part in text.split(","):
        world, tensors = part.lower().split("x")
        rows.append((int(world), int(tensors)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", help="e.g. 8x100,512x1000 (default: all, or --quick's)")
    p.add_argument("--quick", action="store_true", help="8 and 64 ranks x 100 tensors, short waits")
    p.add_argument("--patterns", default="per_rank,replicated")
    p.add_argument("--max-entries", type=int, default=600_000,
                   help="skip rows with more ranks x tensors than this (unless named in --rows)")
    p.add_argument("--waiting", default="", help="world sizes for the waiting phase (default: "
                   "those of the rows, at most 512)")
    p.add_argument("--waiters", type=int, default=16)
    p.add_argument("--window-s", type=float, default=3.0)
    p.add_argument("--s3", choices=("moto", "seaweedfs"), help="count S3 requests on this server")
    p.add_argument("--label", default="run")
    p.add_argument("--out", help="write <out>.json and <out>.md")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE.json", "AFTER.json"))
    args = p.parse_args(argv)
    if args.compare:
        with open(args.compare[0]) as f:
            before = json.load(f)
        with open(args.compare[1]) as f:
            after = json.load(f)
        print(compare(before, after))
        return 0
    rows = parse_rows(args.rows) if args.rows else (QUICK_ROWS if args.quick else ALL_ROWS)
    explicit = bool(args.rows)
    patterns = [x for x in args.patterns.split(",") if x]
    master = new_store()
    doc: dict[str, Any] = {"label": args.label, "git": _git(), "command": " ".join(
        ["python -m bench.scale"] + (sys.argv[1:] if argv is None else argv)), "rows": [],
        "waiting": [], "torch": torch.__version__}
    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    seq = 0
    try:
        for world, tensors in rows:
            for pattern in patterns:
                if world * tensors > args.max_entries and not explicit:
                    doc["rows"].append({"world": world, "tensors": tensors, "pattern": pattern,
                                        "skipped": f"{world * tensors:,} entries > --max-entries"})
                    continue
                seq += 1
                root = os.path.join(tmp, f"{world}x{tensors}-{pattern}")
                t0 = time.perf_counter()
                row = run_row(master, root, world, tensors, pattern, seq)
                row["row_s"] = round(time.perf_counter() - t0, 1)
                doc["rows"].append(row)
                shutil.rmtree(root, ignore_errors=True)
                print(json.dumps({k: v for k, v in row.items() if k != "store_ops"}), flush=True)
        worlds = ([int(x) for x in args.waiting.split(",") if x] if args.waiting else
                  sorted({w for w, _ in rows if w <= 512}))
        for world in worlds:
            waiting = run_waiting(master, world, args.waiters, 1.5 if args.quick else args.window_s)
            doc["waiting"].append(waiting)
            print(json.dumps(waiting), flush=True)
        if args.s3:
            from .scale_s3 import run_s3        # imports this module: loaded only when asked
            doc["s3"] = run_s3(args.s3, master)
            print(json.dumps(doc["s3"]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = markdown(doc)
    doc["markdown"] = text
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
