"""The rank worker: one background thread per rank in a multi-rank run.

For each save of this rank, in order: announce what this rank resolved (patterns, groups,
REPLICATED layouts) and, where asked, digest its replicas off the training thread -> wait for the
coordinator's outcome, answering FULL validation requests meanwhile -> resolve the SaveHandle with
the same verdict every rank gets -> give the staging buffer back to the pool. Every wait has a
deadline, so a dead coordinator or node writer fails the handle instead of hanging it.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from ..errors import CheckpointError, ReplicationError, SaveFailedError
from ..format.names import step_dir
from ..dist.link import LinkTimeout, RemoteFailure, StoreLink
from ..load.reader import read_tensors
from ..format.manifest import ShardEntry, TensorEntry
from ..format.metrics_file import decode
from .replicas import compare_full, digest
from .staging import BufferPool
from ..dist.topology import Topology
from ..types import CheckpointInfo, SharingPattern, ValidationLevel
from .node_writer import SaveJob

log = logging.getLogger("async_ckpt")


class RankWorker:
    """Owns the worker thread; `submit` never blocks, `stop` drains the queue first."""

    def __init__(self, link: StoreLink, topo: Topology, storage, pool: BufferPool):
        self.link, self.topo, self.storage, self.pool = link, topo, storage, pool
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="ckpt-rank-worker", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - never leave a handle unresolved
                log.exception("[rank %d step %d] rank worker failed", self.topo.rank, job.step)
                if not job.handle.done():
                    job.handle._fail(SaveFailedError(f"saving step {job.step} failed on rank "
                                                     f"{self.topo.rank}: {exc!r}", {self.topo.rank: exc}))

    def _announce(self, job: SaveJob) -> dict:
        patterns, digests, groups = {}, {}, {}
        views = job.buffer.views(job.plan)
        job.buffer.wait_copied()
        for shard, tree, comp, shard_views in zip(job.plan.shards, job.trees, job.components, views):
            patterns[comp.key] = [shard.pattern.value, comp.validation_level]
            if comp.members:
                groups[comp.key] = list(comp.members)
            level = ValidationLevel(comp.validation_level)
            if shard.pattern is SharingPattern.REPLICATED and level is not ValidationLevel.NONE:
                digests[comp.key] = digest(shard, shard_views, tree, level)
        return {"patterns": patterns, "layouts": job.layouts, "digests": digests, "groups": groups}

    def _answer_full(self, job: SaveJob, request: list[dict]) -> None:
        answers = []
        index_of = {shard.component: shard for shard in job.plan.shards}
        views = dict(zip((s.component for s in job.plan.shards), job.buffer.views(job.plan)))
        for item in request:
            for compare_rank, report_as in item["pairs"]:
                if compare_rank == self.topo.rank:
                    answers.append(self._compare_one(job, item, index_of, views, report_as))
        self.link.post(job.seq, f"full/{self.topo.rank}", answers)

    def _compare_one(self, job: SaveJob, item: dict, index_of: dict, views: dict, report_as: int) -> list:
        shard = index_of[item["component"]]
        position = next(i for i, s in enumerate(shard.slots) if s.index == item["tensor"])
        dtype, shape, file, offset, length, nbytes, codec, digest_, frames = item["record"]
        entry = TensorEntry(dtype, tuple(shape), file, offset, length, nbytes, codec, digest_,
                            tuple(frames))
        reference = read_tensors(self.storage, step_dir(job.step), ShardEntry(None, (entry,), ()),
                                 f"written copy of {item['component']!r}")[0]
        return [item["component"], item["tensor"], report_as,
                compare_full(views[item["component"]][position], reference)]

    def _wait_outcome(self, job: SaveJob) -> dict:
        """The coordinator's verdict. Rank 0 must enter this save within timeout_s; after that
        the wait lasts as long as the save takes, unless rank 0 stops beating (it died)."""
        link, seq, world = self.link, job.seq, range(self.topo.world_size)
        deadline = time.monotonic() + link.timeout_s
        entered = self.topo.rank == 0
        answered, pause, last_beat = False, 0.002, (-1, time.monotonic())
        while True:
            if link.has(seq, "outcome"):
                return link.get(seq, "outcome")
            if errors := link.errors(seq, world):
                return {"ok": False, "message": "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items())),
                        "causes": errors}
            if not answered and link.has(seq, "fullreq"):
                request = link.get(seq, "fullreq")
                if any(p[0] == self.topo.rank for item in request for p in item["pairs"]):
                    self._answer_full(job, request)
                answered = True
            now = time.monotonic()
            entered = entered or link.has(seq, "vh/0")
            if not entered and now > deadline:
                raise LinkTimeout(f"rank 0 did not start saving step {job.step} within "
                                  f"{link.timeout_s:g} s of this rank (crashed, hung, or far behind?)", [0])
            beat = link.heartbeat_of(0)
            if beat != last_beat[0]:
                last_beat = (beat, now)
            elif now - last_beat[1] > link.liveness_s:
                raise LinkTimeout(f"the coordinator (rank 0) stopped answering (no heartbeat for "
                                  f"{link.liveness_s:g} s) before publishing the outcome of step "
                                  f"{job.step}: it died or hangs", [0])
            time.sleep(pause)
            pause = min(pause * 1.5, 0.01)

    def _run(self, job: SaveJob) -> None:
        link, rank, seq = self.link, self.topo.rank, job.seq
        try:
            link.post(seq, f"vh/{rank}", self._announce(job))
            outcome = self._wait_outcome(job)
        except (LinkTimeout, RemoteFailure, CheckpointError, OSError) as exc:
            causes = exc.causes if isinstance(exc, RemoteFailure) else {rank: str(exc)}
            outcome = {"ok": False, "message": str(exc), "causes": causes}
        except RuntimeError as exc:   # torch.distributed.DistError: the Store itself is gone
            message = (f"lost the connection to the torch.distributed Store ({exc}); the process "
                       "hosting it (rank 0's node) has probably died")
            outcome = {"ok": False, "message": message, "causes": {rank: message}}
        # The node writer may still read a failed save's buffer; never hand it out before.
        if self.topo.is_node_writer:
            job.written.wait()
        self.pool.release(job.buffer)
        if outcome["ok"]:
            info = outcome["info"]
            timings = {**info["timings"], "blocking_s": job.timings.get("blocking_s")}
            job.handle._succeed(CheckpointInfo(job.step, info["url"], decode(info["metrics"]),
                                               info["nbytes"], info["stored_nbytes"], info["created"],
                                               timings))
            if rank == 0:
                job.retained.wait()
            job.handle._settled.set()
        else:
            causes = {int(r): m for r, m in outcome.get("causes", {}).items()}
            err = SaveFailedError(f"saving step {job.step} failed, nothing was committed: "
                                  f"{outcome['message']}", causes)
            if outcome.get("replication"):
                err.__cause__ = ReplicationError(outcome["message"])
            job.handle._fail(err)
