"""AsyncCheckpointer: the one orchestrator, and the public API of saving and loading.

It validates calls, snapshots state into staging buffers on the caller's thread and hands the
rest to the threads of the save path; it loads checkpoints back through `load.restore.Loader`.
The save path is the same at every world size (a world of one is a coordinator with no peers):

    training thread   save(): state_dict() -> plan -> stage -> SaveJob
                        |-> RankWorker (every rank): announce, await the verdict, resolve the handle
                        |-> NodeWriter (local rank 0): write the node's data files, report
                              |-> Coordinator (rank 0): validate, commit, publish, retention

Threads and their modules: `save.rank_worker`, `save.node_writer`, `save.coordinator`; what
"committed" means (commit, retention, delete) is `save.commit`.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import platform
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .dist.link import StoreLink, StoreLost, namespace
from .dist.liveness import Heartbeat, await_departures, depart, hosts_store
from .dist.messages import BoardName
from .dist.relay import BoardWriter
from .dist.shm import sweep_dead_buffers
from .dist.topology import Topology, current_topology
from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, InvalidArgumentError,
                     storage_errors_translated)
from .format import metrics_file
from .format.codec import Compressor
from .format.names import committed_steps, manifest_path, read_manifest, step_dir
from .format.tree import flatten
from .handle import SaveHandle, Settlement
from .load.guard import checkpoint_errors_only
from .load.restore import Loader, info_of
from .options import CheckpointOptions, check_step
from .save.commit import Committer
from .save.coordinator import Coordinator
from .save.chunking import chunk_layout, needs_split, split_replicated
from .save.datafile import DataFileStreamer
from .save.job import ComponentSpec, SaveJob
from .save.lease import LeaseKeeper
from .save.node_writer import NodeWriter
from .save.plan import Planner, state_layout
from .save.rank_worker import RankWorker
from .save.staging import BufferPool, stage
from .sharing import (group_label, group_members, resolve_pattern, stages_every_replica, validate_components,
                      validation_level)
from .storage import StorageError, open_storage
from .types import CheckpointInfo, SharingPattern, StateComponent, ValidationLevel
from .version import __version__

log = logging.getLogger("async_ckpt")


def probes_writability(topo: Topology) -> bool:
    """Whether this rank runs the storage's write probe on its first save: its node's writer."""
    return topo.is_node_writer


def _close_at_exit(ref: "weakref.ref[AsyncCheckpointer]") -> None:
    """The writer is a daemon thread: without this, exiting the interpreter with saves still in
    flight would silently drop them (never corrupt anything, but lose the newest checkpoint)."""
    ckpt = ref()
    if ckpt is None or ckpt._closed or ckpt._pid != os.getpid():
        return          # a forked child (a DataLoader worker) never closes its parent's checkpointer
    pending = [s.step for s in ckpt._pending if not s.settled]
    if pending:
        log.warning("[rank %d] interpreter exiting: finishing pending saves of steps %s "
                    "(call close() or use `with` to do this explicitly)", ckpt.topo.rank, pending)
    try:
        ckpt.close()
    except CheckpointError as exc:
        log.error("[rank %d] a save failed while closing at exit: %s", ckpt.topo.rank, exc)


class AsyncCheckpointer:
    """Asynchronous checkpoints of registered StateComponents under one root (path or URL).

    ``save(step)`` returns once the state is copied into reusable host buffers; background
    threads make it durable and commit ``step-<N>/manifest.json`` atomically. A checkpoint exists
    if and only if its manifest does. The keywords beyond DESIGN's named ones are the fields of
    `options.CheckpointOptions` after ``max_pending`` (``allow_pickle``, ``verify``,
    ``compression_level``, ``overlap_staging``, ``encode_threads``, ``timeout_s``,
    ``keep_every``); its docstring says what each does.

    With several ranks (torch.distributed initialised), every rank constructs its checkpointer
    with the same root and components, in the same order, and calls ``save``/``load`` for the
    same steps in the same order; no call enters a collective.
    """

    @storage_errors_translated
    def __init__(self, root: str | os.PathLike,
                 components: Sequence[StateComponent] | Callable[[], Sequence[StateComponent]], *,
                 storage_options: dict | None = None, compression: str | None = None,
                 keep_last: int | None = None, keep_best: int = 0, best_metric: str | None = None,
                 greater_is_better: bool | None = None, max_pending: int = 1, **more_options: Any) -> None:
        self.options = CheckpointOptions.from_keywords(
            more_options, compression=compression, keep_last=keep_last, keep_best=keep_best,
            best_metric=best_metric, greater_is_better=greater_is_better, max_pending=max_pending)
        if not isinstance(root, (str, os.PathLike)):
            raise InvalidArgumentError(f"root must be a path or URL, got {type(root).__name__}")
        self.storage = open_storage(root, storage_options)
        self._root, self._storage_options = os.fspath(root), dict(storage_options or {})
        self._check_root(self.storage.check_root)
        self.topo = current_topology()
        self._components_source = components
        if not callable(components):
            validate_components(components)
        timeout = float(self.options.timeout_s)
        self._link = (StoreLink.from_default_group(namespace(self.storage.url), timeout)
                      if self.topo.world_size > 1 else StoreLink.in_process("async_ckpt/local", timeout))
        self._seq = 0
        self._blocked = 0              # > 0 while the training thread waits on a save
        self._link.moved_on = lambda seq: self._seq > seq or self._blocked > 0
        self._heartbeat = (Heartbeat(self._link, self.topo.rank, lambda: self._seq)
                           if self.topo.world_size > 1 else None)
        # Other local ranks hand their buffers to the node writer through shared memory.
        self._pool = BufferPool(pin=torch.cuda.is_available(), shared=not self.topo.is_node_writer)
        self._planner = Planner(self.topo)
        self._loader = Loader(self.storage, self.topo, self._link if self.topo.world_size > 1 else None,
                              self.options, self._components)
        self._committer = (Committer(self.storage, self.options, self.topo.rank, self.topo.num_nodes > 1,
                                     self._pending_steps) if self.topo.rank == 0 else None)
        self._writer: NodeWriter | None = None
        self._lease: LeaseKeeper | None = None
        self._worker: RankWorker | None = None
        self._pending: list[Settlement] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()            # the process whose exit closes it (not a forked child)
        self._started = False
        self._deletes: dict[int, int] = {}
        self._warned_unchecked: set[str] = set()
        self._late_failures: list[CheckpointError] = []

    # -- DESIGN's named options, readable as attributes ----------------------------------------
    keep_last = property(lambda self: self.options.keep_last)
    keep_best = property(lambda self: self.options.keep_best)
    best_metric = property(lambda self: self.options.best_metric)
    greater_is_better = property(lambda self: self.options.greater_is_better)
    max_pending = property(lambda self: self.options.max_pending)
    compression = property(lambda self: self.options.compression)

    # -- helpers ------------------------------------------------------------------------------
    def _components(self) -> list[StateComponent]:
        source = self._components_source
        return validate_components(source() if callable(source) else source)

    def _warn_unchecked(self, c: StateComponent, pattern: SharingPattern) -> None:
        if c.key not in self._warned_unchecked:
            self._warned_unchecked.add(c.key)
            log.warning("[rank %d] component %r resolved to %s, which keeps no replicas: its "
                        "validation_level=%s checks nothing at such saves", self.topo.rank, c.key,
                        pattern.name, c.validation_level.name if c.validation_level else None)

    @contextlib.contextmanager
    def _blocking(self) -> Iterator[None]:
        """The training thread waits on saves: peers that never called them are named fast
        (`dist.liveness.CallerWatch`)."""
        self._blocked += 1
        try:
            yield
        finally:
            self._blocked -= 1

    def _check_root(self, check: Callable[[], None]) -> None:
        try:
            check()
        except StorageError:
            raise                 # it says what to fix; translated by the decorator
        except OSError as exc:
            raise InvalidArgumentError(f"checkpoint root {self.storage.url} is not a writable folder "
                                       f"({exc}); pass a folder this process can create and write") from exc

    def _pending_steps(self) -> set[int]:
        """Steps whose save is still in flight (not yet committed or failed)."""
        with self._lock:
            return {s.step for s in self._pending if not s.done}

    def _start(self) -> None:
        """The save path's threads, on the first save (a checkpointer that only loads has none)."""
        if self._started:
            return
        # One rank per node proves the root takes writes (on S3, 4 requests); the others only
        # read through this storage (their node writer writes their data), so a read-only check.
        self._check_root(self.storage.check_writable if probes_writability(self.topo)
                         else self.storage.check_root)
        self._worker = RankWorker(self._link, self.topo, self.storage, self._pool)
        if self.topo.is_node_writer and self.topo.world_size > 1 and self.topo.local_world_size > 1:
            # the node's other ranks learn their saves' outcomes from this board (dist.relay)
            self._worker.board = BoardWriter.create()
            self._link.post("board", str(self.topo.node), BoardName(self._worker.board.name))
        if self.topo.is_node_writer:
            sweep_dead_buffers()
            opts = self.options
            compressor = Compressor(opts.compression_level) if opts.compression else None
            coordinator = None
            if self._committer is not None:
                versions = {"async_ckpt": __version__, "torch": torch.__version__,
                            "python": platform.python_version()}
                coordinator = Coordinator(self.storage, self.topo, self._link, self._committer, versions)
            self._writer = NodeWriter(self.storage, self.topo, self._link,
                                      DataFileStreamer(compressor, opts.encode_threads),
                                      opts.compression is not None, coordinator, opts.node_object)
            # Tells `async-ckpt gc` this root has a live writer; written on the writer thread
            # ahead of the first save's data, refreshed by its own timer (save/lease.py).
            ref, root, options = weakref.ref(self), self._root, self._storage_options
            self._lease = LeaseKeeper(lambda: open_storage(root, options), self.topo.rank,
                                      lambda: ref() is not None)
            self._writer.submit(self._lease.acquire)
        # threading's exit hooks run before atexit's and before concurrent.futures refuses
        # new work, which the writer's hash/zstd pools still need.
        register = getattr(threading, "_register_atexit", atexit.register)
        register(_close_at_exit, weakref.ref(self))
        self._started = True

    def _raise_unreported(self) -> None:
        with self._lock:
            if self._late_failures:
                raise self._late_failures.pop(0)
            for s in self._pending:
                if s.settled and (err := s.take_unreported_error()) is not None:
                    raise err
            self._pending = [s for s in self._pending if not s.settled]

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed; create a new one")

    # -- saving -------------------------------------------------------------------------------
    @storage_errors_translated
    def save(self, step: int, metrics: Mapping[str, float] | None = None) -> SaveHandle:
        """Snapshot every component for `step` and return at once; the write goes on in the
        background. Raises an earlier save's unreported failure, or if `step` is committed.

        With several ranks every rank calls this for the same steps in the same order. A rank
        that raises here tells the others at once, so their handles fail too.
        """
        started = time.perf_counter()
        self._check_open()
        if self._link.lost is not None:
            raise StoreLost(f"cannot save step {step}: {self._link.lost}")
        check_step(step)
        values = metrics_file.check_metrics(metrics)
        seq = self._seq = self._seq + 1      # the same on every rank: a save's identity
        try:
            return self._save(step, values, seq, started)
        except BaseException as exc:
            if self.topo.world_size > 1:
                try:
                    self._link.post_error(seq, self.topo.rank, f"save() raised {type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001 - the store may be gone; the original error matters
                    log.exception("[rank %d step %d] could not tell the other ranks", self.topo.rank, step)
            raise

    def _save(self, step: int, metrics: dict[str, float], seq: int, started: float) -> SaveHandle:
        self._start()
        while True:
            # Snapshot first: a save seen done here is already settled, so its error is raised.
            in_flight = [s for s in self._pending if not s.done]
            self._raise_unreported()
            if len(in_flight) < self.options.max_pending:
                break
            with self._blocking():
                in_flight[0].wait_done()
        # Only the coordinator asks storage (one request, not one per rank); it tells the others.
        if any(s.step == step for s in self._pending) or (
                self.topo.rank == 0 and self.storage.exists(manifest_path(step))):
            raise CheckpointError(f"step {step} is already committed (or being saved) at "
                                  f"{self.storage.child_url(step_dir(step))}; save under a new step")
        shards, trees, specs, shapes = [], [], [], {}
        for c in self._components():
            pattern = resolve_pattern(c)
            members = group_members(c, pattern, self.topo)
            # Every rank calls every state_dict(), whatever it writes: some run collectives.
            sharded = pattern is SharingPattern.SHARDED
            tree, tensors = flatten(c.stateful.state_dict(), c.key, self.options.allow_pickle,
                                    dtensors=sharded)
            chunks = None
            if sharded:     # DTensors -> their local shards, each a box of its global tensor
                tensors, chunks = chunk_layout(tensors, tree, c.key, self.topo, members)
            elif pattern is SharingPattern.REPLICATED and needs_split(tensors, self.topo):
                tensors, chunks = split_replicated(tensors, tree, c.key, self.topo)
            level = validation_level(c, pattern)
            if level is ValidationLevel.NONE and c.validation_level not in (None, ValidationLevel.NONE):
                self._warn_unchecked(c, pattern)
            stage_all = stages_every_replica(pattern, level, self.topo, members)
            shards.append((c.key, pattern, members, stage_all, tensors, chunks, group_label(c, pattern)))
            trees.append(tree)
            specs.append(ComponentSpec(c.key, c.required, level.value, c.metadata, members))
            if pattern is SharingPattern.REPLICATED:
                shapes[c.key] = tuple((str(t.dtype), tuple(t.shape)) for t in tensors)
        plan = self._planner.plan(state_layout(shards))
        buffer = self._pool.acquire(plan.buffer_nbytes)
        try:
            stage(plan, [entry[4] for entry in shards], buffer)
            if not self.options.overlap_staging or not self.topo.is_node_writer:
                buffer.wait_copied()
        except BaseException:
            self._pool.release(buffer)
            raise
        settlement = Settlement(step, buffer.event)
        blocking = time.perf_counter() - started
        job = SaveJob(step, seq, plan, buffer, trees, specs, metrics, settlement, started,
                      replicated_shapes=shapes, timings={"blocking_s": round(blocking, 6)})
        if not self.topo.is_node_writer:
            # Before the save becomes pending: if the Store is gone here, save() raises and
            # no handle waits for a worker that never got the job (close() would block on it).
            try:
                self._link.post(seq, f"job/{self.topo.rank}", job.descriptor(self.topo.rank))
            except BaseException:
                self._pool.release(buffer)
                raise
        with self._lock:
            self._pending.append(settlement)
        assert self._worker is not None
        self._worker.submit(job)
        if self._writer is not None:
            self._writer.submit(job)
        log.debug("[rank %d step %d] staged %d bytes in %.3f s", self.topo.rank, step, plan.buffer_nbytes, blocking)
        return settlement.handle

    @storage_errors_translated
    def report_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Attach metrics that arrive after `save(step)` (decoupled evaluation). Stored durably
        beside the checkpoint; retention (keep_best) reconsiders once they are written. A later
        report for the same step updates it (the newest value of each metric wins). A report that
        could not be stored (a full disk) is raised once, by the next call of this checkpointer.

        With several ranks, rank 0's call is the one stored (others may call it too; their
        values are checked and otherwise ignored)."""
        self._check_open()
        check_step(step)
        values = metrics_file.check_metrics(metrics)
        with self._lock:
            if self._late_failures:
                raise self._late_failures.pop(0)
        if self._committer is None:
            return
        if step not in self._pending_steps() and not self.storage.exists(manifest_path(step)):
            raise CheckpointNotFoundError(f"cannot report metrics for step {step}: it is not committed "
                                          f"at {self.storage.url} nor being saved")
        committer = self._committer

        def task() -> None:
            if (error := committer.report_late(step, values)) is not None:
                with self._lock:
                    self._late_failures.append(error)     # raised once, by the next call
        self._start()
        assert self._writer is not None
        self._writer.submit(task)

    @storage_errors_translated
    def wait(self) -> None:
        """Block until every pending save is committed and its retention has run; raise the
        first failure not yet reported."""
        with self._lock:
            pending = list(self._pending)
        with self._blocking():
            for s in pending:
                s.wait_settled()
            if self._writer is not None:   # late-metric tasks queued behind the saves
                done = threading.Event()
                self._writer.submit(done.set)
                done.wait()
        self._raise_unreported()

    @storage_errors_translated
    def close(self) -> None:
        """wait(), then stop the threads; with several ranks, tell the peers this rank is done
        (the rank hosting the Store waits, briefly, for the others to be done too, so it never
        takes the Store away from a peer still reading a verdict). Raises StoreLost if the Store
        was lost. Safe to call twice."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.stop()
            if self._lease is not None:
                self._lease.release()
            if self._worker is not None:
                self._worker.stop()
                if self._worker.board is not None:
                    self._worker.board.close()
            if self.topo.world_size > 1 and self._link.lost is None:
                depart(self._link, self.topo.rank)
                if hosts_store(self.topo.rank):
                    with self._blocking():
                        await_departures(self._link, self.topo.rank, self.topo.world_size)
            if self._heartbeat is not None:
                self._heartbeat.stop()
            self._pool.close()
        if self._link.lost is not None:
            raise StoreLost(f"closed, but {self._link.lost}")

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as err:  # do not mask the exception already propagating
            log.error("[rank %d] while closing after an error: %s", self.topo.rank, err)

    # -- deleting -------------------------------------------------------------------------------
    @storage_errors_translated
    def delete(self, step: int) -> None:
        """Uncommit `step` (its manifest goes first), then free its data.

        Every rank may call it; only the coordinator (rank 0) acts, and a rank that calls it
        returns once rank 0 has deleted the step (through the Store, no collective; bounded by
        ``timeout_s``), so no rank can save that step anew before its old data is gone. Deleting
        a step that is being saved raises; one that does not exist raises
        CheckpointNotFoundError.
        """
        self._check_open()
        check_step(step)
        if step in self._pending_steps():
            raise CheckpointError(f"step {step} is being saved; wait() for it before deleting it")
        count = self._deletes[step] = self._deletes.get(step, 0) + 1
        key = f"deleted/{step}/{count}"          # the count-th delete(step) of this checkpointer
        if self._committer is not None:
            try:
                self._committer.delete_step(step, must_exist=True)
            finally:
                self._link.increment("delete", key)
            log.info("[rank %d] deleted step %d", self.topo.rank, step)
            return
        waits = self._link.waits("delete", [[key]], self._link.timeout_s)   # blocks in the Store
        try:
            if not waits.wait(self._link.timeout_s):
                raise CheckpointError(f"rank 0 did not delete step {step} within "
                                      f"{self._link.timeout_s:g} s; every rank must call delete(step) "
                                      "for the same steps (or only rank 0 does)")
        finally:
            waits.abandon()

    # -- reading ------------------------------------------------------------------------------
    @storage_errors_translated
    @checkpoint_errors_only
    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = committed_steps(self.storage)
        return steps[-1] if steps else None

    @storage_errors_translated
    @checkpoint_errors_only
    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first (unreadable manifests are logged and skipped)."""
        infos = []
        for step in committed_steps(self.storage):
            try:
                infos.append(info_of(self.storage, read_manifest(self.storage, step_dir(step), step, fragments=False),
                                     step_dir(step)))
            except (CorruptCheckpointError, FileNotFoundError) as exc:
                log.warning("[rank %d] skipping step %d: %s", self.topo.rank, step, exc)
        return infos

    @storage_errors_translated
    def load(self, step: int | None = None, *, strict: bool = True) -> CheckpointInfo | None:
        """Restore every registered component from `step` (default: the newest committed one).

        Returns None when nothing is committed yet. All data is read and verified before any
        component's load_state_dict is called, so a corrupt checkpoint changes nothing. With
        several ranks, each reads only its copies (GLOBAL/REPLICATED once per node).
        """
        if step is not None:
            check_step(step)
        info = self._loader.load(step, strict)
        if info is None:
            return None
        metric = self.options.best_metric
        if self.options.keep_best and metric and metric not in info.metrics:
            log.warning("[rank %d] loaded step %d has no %r metric (its evaluation never reported, "
                        "e.g. lost in a crash): keep_best cannot rank it; call report_metrics(%d, "
                        "{%r: ...}) if you re-evaluate it", self.topo.rank, step, metric, step, metric)
        return info
