"""The rank worker: one background thread per rank, the only resolver of this rank's handles.

Call sequence (who calls what):

1. training thread: ``submit(job)`` for each save (never blocks);
2. worker thread, for each save, in order: announce what this rank resolved (``vh/<rank>``:
   patterns, groups, REPLICATED shapes and, where asked, the digests of its replicas, computed
   here, off the training thread) -> wait for the coordinator's `Outcome`, answering a FULL
   validation request meanwhile -> give the staging buffer back to the pool (on a node writer,
   once the node writer is done with it) -> resolve the save's `Settlement` with the verdict
   every rank gets -> on the coordinator's rank, settle it once retention has run;
3. training thread: ``stop()`` drains the queue, then ends the thread.

Every wait has a deadline: a coordinator that never starts the save fails the handle after
``timeout_s``, one that stops beating after ``liveness_s``. On the coordinator's own rank the
outcome is awaited on ``job.published`` instead of polling the Store.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from ..dist.link import LinkTimeout, RemoteFailure, StoreLink
from ..dist.liveness import CallerWatch
from ..dist.messages import (Announcement, BoardName, FullAnswer, FullItem, FullRequest, FullResult,
                             Outcome, layout_hash)
from ..dist.relay import POLL_S, STORE_CHECK_S, BoardReader, BoardWriter
from ..dist.topology import Topology
from ..errors import CheckpointError, ReplicationError, SaveFailedError, translate_storage_error
from ..format.manifest import ShardEntry, TensorEntry
from ..format.metrics_file import decode
from ..format.names import step_dir
from ..load.reader import read_tensors
from ..storage import Storage
from ..sharing import stages_every_replica
from ..types import CheckpointInfo, SharingPattern, ValidationLevel
from .job import SaveJob
from .replicas import compare_full, digest, digest_chunks
from .staging import BufferPool

log = logging.getLogger("async_ckpt")


class RankWorker:
    """Owns the worker thread; see the module docstring for the sequence it runs."""

    def __init__(self, link: StoreLink, topo: Topology, storage: Storage, pool: BufferPool):
        self.link, self.topo, self.storage, self.pool = link, topo, storage, pool
        self._queue: queue.Queue[SaveJob | None] = queue.Queue()
        self._answered: set[int] = set()      # saves whose FULL request this rank answered
        # dist.relay: local rank 0 writes its node's outcome board, the node's other ranks read it
        self.board: BoardWriter | None = None
        self._board_reader: BoardReader | None = None
        self._no_board = False
        self._thread = threading.Thread(target=self._loop, name="ckpt-rank-worker", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._board_reader is not None:
            self._board_reader.close()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - never leave a handle unresolved
                log.exception("[rank %d step %d] rank worker failed", self.topo.rank, job.step)
                if not job.settlement.done:
                    job.settlement.fail(SaveFailedError(f"saving step {job.step} failed on rank "
                                                        f"{self.topo.rank}: {exc!r}", {self.topo.rank: exc}))

    # -- one save ---------------------------------------------------------------------------------
    def _run(self, job: SaveJob) -> None:
        link, rank = self.link, self.topo.rank
        try:
            link.post(job.seq, f"vh/{rank}", self._announce(job))
            outcome = self._wait_outcome(job)
        except (LinkTimeout, RemoteFailure, CheckpointError, OSError) as exc:
            if isinstance(exc, RemoteFailure):
                causes = dict(exc.causes)
            elif isinstance(exc, LinkTimeout):          # the ranks that did not answer
                causes = {int(r): str(exc) for r in exc.missing} or {rank: str(exc)}
            else:
                causes = {rank: str(exc)}
                job.local_errors.setdefault(rank, exc)
            outcome = Outcome(ok=False, message=str(exc), causes=causes)
        except RuntimeError as exc:   # torch.distributed.DistError: the Store itself is gone
            message = (f"lost the connection to the torch.distributed Store ({exc}); the process "
                       "hosting it (rank 0's node) has probably died")
            outcome = Outcome(ok=False, message=message, causes={rank: message})
        # The node writer may still read a failed save's buffer; never hand it out before.
        if self.topo.is_node_writer:
            job.written.wait()
        self.pool.release(job.buffer)
        self._retire(job)
        self._resolve(job, outcome)

    def _retire(self, job: SaveJob) -> None:
        """Delete this rank's keys of the save: once its outcome is out, the coordinator has read
        every one of them (job/<r> went to the node writer before its report). Each rank deletes
        its own two to four keys, so no rank deletes W keys per save (the coordinator removes
        the save's few shared keys once every rank has announced the next save)."""
        topo = self.topo
        names = [f"vh/{topo.rank}"] + ([f"full/{topo.rank}"] if job.seq in self._answered else [])
        self._answered.discard(job.seq)
        if not topo.is_node_writer:
            names.append(f"job/{topo.rank}")
        elif topo.node != 0:
            names += [f"begun/{topo.node}", f"node/{topo.node}"]
        self.link.retire(job.seq, names)

    def _resolve(self, job: SaveJob, outcome: Outcome) -> None:
        settlement = job.settlement
        if outcome.ok and outcome.info is not None:
            info = outcome.info
            timings = {**info.timings, "blocking_s": job.timings.get("blocking_s")}
            settlement.succeed(CheckpointInfo(job.step, info.url, decode(info.metrics), info.nbytes,
                                              info.stored_nbytes, info.created, timings))
            if self.topo.rank == 0:
                job.retained.wait()
            settlement.settle()
            return
        # Causes raised in this process keep their exception objects; peers' are their messages.
        local = {r: translate_storage_error(exc) for r, exc in job.local_errors.items()}
        causes: dict[int, BaseException | str] = {int(r): m for r, m in outcome.causes.items()}
        for r, exc in local.items():
            if r in causes or not causes:
                causes[r] = exc
        err = SaveFailedError(f"saving step {job.step} to {self.storage.child_url(step_dir(job.step))} "
                              f"failed, nothing was committed: {outcome.message}", causes)
        if outcome.replication:
            err.__cause__ = ReplicationError(outcome.message)
        elif local:
            err.__cause__ = next(iter(local.values()))
        settlement.fail(err)

    def _announce(self, job: SaveJob) -> Announcement:
        patterns, digests, groups = {}, {}, {}
        views = job.buffer.views(job.plan)
        job.buffer.wait_copied()
        for shard, tree, comp, shard_views in zip(job.plan.shards, job.trees, job.components, views, strict=True):
            patterns[comp.key] = (shard.pattern.value, comp.validation_level)
            if comp.members and shard.pattern is SharingPattern.PER_GROUP:
                groups[comp.key] = tuple(comp.members)
            level = ValidationLevel(comp.validation_level)
            if shard.chunked and level is not ValidationLevel.NONE:
                digests[comp.key] = digest_chunks(shard, shard_views)
            elif stages_every_replica(shard.pattern, level, self.topo, comp.members):
                digests[comp.key] = digest(shard, shard_views, tree, level)
        # The coordinator has rank 0's layouts in process: every rank sends only their hashes.
        hashes = {key: layout_hash(shapes) for key, shapes in job.replicated_shapes.items()}
        return Announcement(patterns, {}, digests, groups, layout_hashes=hashes)

    def _wait_outcome(self, job: SaveJob) -> Outcome:
        """The coordinator's verdict. Rank 0 must enter this save within timeout_s; after that
        the wait lasts as long as the save takes, unless rank 0 stops beating (it died).

        No polling of the Store: a blocking Store wait for ``outcome`` (rank 0: the in-process
        ``job.published``), and every ``wake_s`` one request reading rank 0's heartbeat and
        progress and the save's event counter ``nev`` (failures, a FULL request); the keys
        behind the counter are read only when it moved. A rank that is not its node's writer
        reads its node's outcome board instead (`dist.relay`: local rank 0's worker copies
        what it learns there) and, once rank 0 has entered the save, checks the Store only
        every ``STORE_CHECK_S``."""
        link, seq = self.link, job.seq
        last = link.events(seq)          # creates the counter read with the heartbeat below
        changed, answered = last > 0, False
        watch = None if self.topo.rank == 0 else _CoordinatorWatch(link, job)
        reader = self._reader() if watch is not None and not self.topo.is_node_writer else None
        waits = None if watch is None or reader is not None else link.outcome_wait(seq)
        store_check = time.monotonic() + link.wake_s
        outcome: Outcome | None = None
        try:
            while True:
                if changed:
                    if link.has(seq, "outcome"):
                        break
                    if errors := link.errors(seq):
                        outcome = Outcome(ok=False, message="; ".join(
                            f"rank {r}: {m}" for r, m in sorted(errors.items())), causes=errors)
                        return outcome
                    if not answered and link.has(seq, "fullreq"):
                        request = link.get(seq, "fullreq", FullRequest)
                        if any(p[0] == self.topo.rank for item in request.items for p in item.pairs):
                            self._answer_full(job, request)
                        answered = True
                if reader is not None:   # the node writer's process relays; the Store, rarely
                    assert watch is not None
                    seen = reader.read(seq)
                    if seen is not None and seen.outcome is not None:
                        return seen.outcome
                    if seen is not None and seen.in_store:
                        break
                    events = max(last, seen.events) if seen is not None else last
                    if time.monotonic() >= store_check:
                        events = max(events, watch.check())
                        # every wake until rank 0 has entered the save (so one that never calls
                        # save() is named as fast as before), then every STORE_CHECK_S
                        store_check = time.monotonic() + (STORE_CHECK_S if watch.entered else link.wake_s)
                        if link.has(seq, "outcome"):
                            break
                    else:
                        time.sleep(POLL_S)
                elif waits is None:      # the coordinator is in this process
                    if job.published.wait(link.wake_s):
                        break
                    events = link.events(seq)
                else:
                    assert watch is not None
                    if waits.wait(link.wake_s):
                        break
                    events = watch.check()
                if self.board is not None:
                    self.board.publish(seq, events)
                changed, last = events != last, events
            outcome = link.get(seq, "outcome", Outcome)
            if reader is None and watch is not None and not self.topo.is_node_writer:
                self._reader(settled=outcome.ok)   # found now if local rank 0 has one: next save uses it
            return outcome
        finally:
            link.end_save(seq)
            if self.board is not None and outcome is not None:
                self.board.publish(seq, last, outcome)

    def _reader(self, settled: bool = False) -> BoardReader | None:
        """This node's outcome board (`dist.relay`), once local rank 0 has posted its name.
        `settled`: a save of this node has completed, so local rank 0 has posted it if it has
        one; none then (ranks in containers that do not share /dev/shm, say) means the Store for
        good, without looking again."""
        if self._board_reader is None and not self._no_board and self.topo.local_world_size > 1:
            key = f"{self.topo.node}"
            if self.link.has("board", key):
                self._board_reader = BoardReader.attach(self.link.get("board", key, BoardName).name)
            if self._board_reader is None and settled:
                self._no_board = True
                log.info("[rank %d] no outcome board from this node's local rank 0 can be read here; "
                         "this rank waits in the Store", self.topo.rank)
        return self._board_reader

    def _answer_full(self, job: SaveJob, request: FullRequest) -> None:
        views = dict(zip((s.component for s in job.plan.shards), job.buffer.views(job.plan), strict=True))
        shards = {shard.component: shard for shard in job.plan.shards}
        results = [self._compare_one(job, item, shards, views, report_as)
                   for item in request.items for compare_rank, report_as in item.pairs
                   if compare_rank == self.topo.rank]
        self.link.post(job.seq, f"full/{self.topo.rank}", FullAnswer(tuple(results)))
        self._answered.add(job.seq)

    def _compare_one(self, job: SaveJob, item: FullItem, shards: dict, views: dict, report_as: int
                     ) -> FullResult:
        shard = shards[item.component]
        position = next(i for i, s in enumerate(shard.slots) if s.index == item.tensor)
        r = item.record
        entry = TensorEntry(r.dtype, tuple(r.shape), r.file, r.offset, r.length, r.nbytes, r.codec,
                            r.hash, tuple(r.frames))
        reference = read_tensors(self.storage, step_dir(job.step), ShardEntry(None, (entry,), ()),
                                 f"written copy of {item.component!r}")[0]
        result = compare_full(views[item.component][position], reference)
        return FullResult(item.component, item.tensor, report_as, result["max_abs_diff"],
                          result["differing"])


class _CoordinatorWatch:
    """What a rank worker checks about rank 0 while it waits for the outcome: that rank 0 entered
    the save within timeout_s (it called save(), or announced), that it called it at all
    (`CallerWatch`), and that it keeps beating. One request per check: rank 0's heartbeat key and
    the save's event counter, whose value `check` returns."""

    def __init__(self, link: StoreLink, job: SaveJob):
        self.link, self.job = link, job
        self.deadline = time.monotonic() + link.timeout_s
        self.entered = False
        self.caller = CallerWatch(link, job.seq, job.step, {0: 0})
        self.last_beat = (-1, time.monotonic())

    def check(self) -> int:
        link, job = self.link, self.job
        states, events = link.peer_states([0], (job.seq, "nev"))
        beat, progress = states[0]
        now = time.monotonic()
        self.entered = self.entered or progress >= job.seq or link.has(job.seq, "vh/0")
        if not self.entered:
            self.caller.see(states)
            self.caller(set())
            if now > self.deadline:
                raise LinkTimeout(f"rank 0 did not start saving step {job.step} within "
                                  f"{link.timeout_s:g} s of this rank (crashed, hung, or far behind?)", [0])
        if beat != self.last_beat[0]:
            self.last_beat = (beat, now)
        elif now - self.last_beat[1] > link.liveness_s:
            raise LinkTimeout(f"the coordinator (rank 0) stopped answering (no heartbeat for "
                              f"{link.liveness_s:g} s) before publishing the outcome of step "
                              f"{job.step}: it died or hangs", [0])
        return events
