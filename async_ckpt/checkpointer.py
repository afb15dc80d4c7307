"""AsyncCheckpointer: the one orchestrator. It validates calls, snapshots state into staging
buffers on the caller's thread, hands the rest to the node writer, and loads checkpoints back."""
from __future__ import annotations

import atexit
import logging
import os
import weakref
import platform
import threading
import time
from typing import Callable, Mapping, Sequence

import torch

from . import __version__
from . import metrics_store
from .datafile import DataFileWriter
from .codec import Compressor
from .errors import (CheckpointError, CheckpointNotFoundError, InvalidArgumentError,
                     storage_errors_translated)
from .handle import SaveHandle
from .layout import committed_steps, manifest_path, step_dir, step_dirs
from .components import group_members, resolve_pattern, validate_components
from .loader import read_manifest
from .link import Heartbeat, StoreLink, namespace
from .manifest import MANIFEST_NAME
from .node_save import describe_job
from .plan import Planner, layout_key
from .restore import list_infos, restore
from .retention import steps_to_keep
from .staging import BufferPool, stage, sweep_dead_buffers
from .storage import StorageError, open_storage
from .topology import current_topology
from .tree import flatten
from .types import CheckpointInfo, SharingPattern, StateComponent, ValidationLevel
from .worker import RankWorker
from .writer import ComponentInfo, NodeWriter, SaveJob

log = logging.getLogger("async_ckpt")

_OPTIONS = {"allow_pickle": False, "verify": True, "compression_level": 1,
            "overlap_staging": False, "encode_threads": 2, "timeout_s": 600.0, "keep_every": None}


def _close_at_exit(ref: "weakref.ref[AsyncCheckpointer]") -> None:
    """The writer is a daemon thread: without this, exiting the interpreter with saves still in
    flight would silently drop them (never corrupt anything, but lose the newest checkpoint)."""
    ckpt = ref()
    if ckpt is None or ckpt._closed:
        return
    pending = [h.step for h in ckpt._pending if not h._settled.is_set()]
    if pending:
        log.warning("[rank %d] interpreter exiting: finishing pending saves of steps %s "
                    "(call close() or use `with` to do this explicitly)", ckpt.topo.rank, pending)
    try:
        ckpt.close()
    except CheckpointError as exc:
        log.error("[rank %d] a save failed while closing at exit: %s", ckpt.topo.rank, exc)


def _check_int(name: str, value, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {value!r}")


class AsyncCheckpointer:
    """Asynchronous checkpoints of registered StateComponents under one root (path or URL).

    ``save(step)`` returns once the state is copied into reusable host buffers; a background
    writer makes it durable and commits ``step-<N>/manifest.json`` atomically. A checkpoint exists
    if and only if its manifest does. Options beyond the named ones: ``allow_pickle`` (False: refuse
    non-JSON leaves on save and pickled leaves on load), ``verify`` (True: check hashes on load),
    ``compression_level`` (zstd level, 1), ``overlap_staging`` (False; True: with CUDA state,
    save() returns before the D2H copy lands, and ``SaveHandle.wait_staged()`` must return before
    the state is mutated),
    ``encode_threads`` (2: zstd threads), ``keep_every`` (None; N: retention keeps every step
    that is a multiple of N for good, in addition to keep_last/keep_best) and ``timeout_s`` (600:
    the longest a multi-rank save waits for another rank or node to reach the save; once there,
    a peer may work as long as it needs while its heartbeat goes on, and a dead one is noticed
    within min(timeout_s, 30) s).

    With several ranks (torch.distributed initialised), every rank constructs its checkpointer
    with the same root and components, in the same order, and calls ``save``/``load`` for the
    same steps in the same order; no call enters a collective.
    """

    @storage_errors_translated
    def __init__(self, root: str | os.PathLike,
                 components: Sequence[StateComponent] | Callable[[], Sequence[StateComponent]], *,
                 storage_options: dict | None = None, compression: str | None = None,
                 keep_last: int | None = None, keep_best: int = 0, best_metric: str | None = None,
                 greater_is_better: bool | None = None, max_pending: int = 1, **more_options) -> None:
        unknown = sorted(set(more_options) - set(_OPTIONS))
        if unknown:
            raise InvalidArgumentError(f"unknown option(s) {unknown}; valid extra options: {sorted(_OPTIONS)}")
        self.options = {**_OPTIONS, **more_options}
        if compression not in (None, "zstd"):
            raise InvalidArgumentError(f"compression must be None or 'zstd', got {compression!r}")
        _check_int("keep_last", keep_last, 0, allow_none=True)
        _check_int("keep_best", keep_best, 0)
        _check_int("max_pending", max_pending, 1)
        _check_int("compression_level", self.options["compression_level"], 1)
        _check_int("encode_threads", self.options["encode_threads"], 1)
        _check_int("keep_every", self.options["keep_every"], 1, allow_none=True)
        if keep_best and not best_metric:
            raise InvalidArgumentError("keep_best > 0 needs best_metric, the metric name to rank by")
        self.keep_last, self.keep_best, self.best_metric = keep_last, keep_best, best_metric
        self.greater_is_better, self.max_pending, self.compression = greater_is_better, max_pending, compression
        if not isinstance(root, (str, os.PathLike)):
            raise InvalidArgumentError(f"root must be a path or URL, got {type(root).__name__}")
        self.storage = open_storage(root, storage_options)
        try:
            self.storage.check_root()
        except StorageError:
            raise   # says what to fix; translated by the decorator
        except OSError as exc:
            raise InvalidArgumentError(f"checkpoint root {self.storage.url} is not a writable folder "
                                       f"({exc}); pass a folder this process can create and write") from exc
        timeout = self.options["timeout_s"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgumentError(f"timeout_s must be a number of seconds > 0, got {timeout!r}")
        self.topo = current_topology()
        self._components_source = components
        if not callable(components):
            validate_components(components)
        self._link = (StoreLink.from_default_group(namespace(self.storage.url), float(timeout))
                      if self.topo.world_size > 1 else None)
        self._heartbeat = Heartbeat(self._link, self.topo.rank) if self._link is not None else None
        # Other local ranks hand their buffers to the node writer through shared memory.
        self._pool = BufferPool(pin=torch.cuda.is_available(), shared=not self.topo.is_node_writer)
        self._planner = Planner(self.topo)
        self._writer: NodeWriter | None = None
        self._worker: RankWorker | None = None
        self._seq = 0
        self._load_seq = 0
        self._pending: list[SaveHandle] = []
        self._metrics_cache: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._writable_checked = False
        self._exit_hook = False

    # -- helpers ------------------------------------------------------------------------------
    def _components(self) -> list[StateComponent]:
        source = self._components_source
        return validate_components(source() if callable(source) else source)

    def _members(self, c: StateComponent, pattern: SharingPattern) -> tuple[int, ...] | None:
        return group_members(c, pattern, self.topo)

    def _ensure_writer(self) -> NodeWriter | None:
        if not self._writable_checked:
            try:
                self.storage.check_writable()
            except StorageError:
                raise   # says what to fix; translated by the public method's decorator
            except OSError as exc:
                raise InvalidArgumentError(f"checkpoint root {self.storage.url} is not a writable folder "
                                           f"({exc}); pass a folder this process can create and write") from exc
            self._writable_checked = True
        if self._link is not None and self._worker is None:
            self._worker = RankWorker(self._link, self.topo, self.storage, self._pool)
        if self._writer is None and self.topo.is_node_writer:
            sweep_dead_buffers()
            compressor = Compressor(self.options["compression_level"]) if self.compression else None
            versions = {"async_ckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}
            self._writer = NodeWriter(self.storage, self._pool, self.topo,
                                      DataFileWriter(compressor, self.options["encode_threads"]),
                                      "zstd" if self.compression else "raw", versions,
                                      self._retain, self._link)
        if not self._exit_hook:
            self._exit_hook = True
            # threading's exit hooks run before atexit's and before concurrent.futures refuses
            # new work, which the writer's hash/zstd pools still need.
            register = getattr(threading, "_register_atexit", atexit.register)
            register(_close_at_exit, weakref.ref(self))
        return self._writer

    def _raise_unreported(self) -> None:
        with self._lock:
            for h in self._pending:
                if h._settled.is_set() and (err := h._take_unreported_error()) is not None:
                    raise err
            self._pending = [h for h in self._pending if not h._settled.is_set()]

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
        _check_int("step", step, 0)
        metrics = metrics_store.check_metrics(metrics)
        seq = self._seq = self._seq + 1      # the same on every rank: a save's identity
        try:
            return self._save(step, metrics, seq, started)
        except BaseException as exc:
            if self._link is not None:
                try:
                    self._link.post_error(seq, self.topo.rank, f"save() raised {type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001 - the store may be gone; the original error matters
                    log.exception("[rank %d step %d] could not tell the other ranks", self.topo.rank, step)
            raise

    def _save(self, step: int, metrics: dict, seq: int, started: float) -> SaveHandle:
        writer = self._ensure_writer()
        while True:
            # Snapshot first: a handle seen done here is already settled, so its error is raised.
            in_flight = [h for h in self._pending if not h.done()]
            self._raise_unreported()
            if len(in_flight) < self.max_pending:
                break
            in_flight[0]._committed.wait()
        # Only the coordinator asks storage (one request, not one per rank); it tells the others.
        if any(h.step == step for h in self._pending) or (
                self.topo.rank == 0 and self.storage.exists(manifest_path(step))):
            raise CheckpointError(f"step {step} is already committed (or being saved) at "
                                  f"{self.storage.child_url(step_dir(step))}; save under a new step")
        validate_replicas = self.topo.world_size > 1
        shards, trees, infos, layouts = [], [], [], {}
        for c in self._components():
            pattern = resolve_pattern(c)
            members = self._members(c, pattern)
            # Every rank calls every state_dict(), whatever it writes: some run collectives.
            tree, tensors = flatten(c.stateful.state_dict(), c.key, self.options["allow_pickle"])
            stage_all = (validate_replicas and pattern is SharingPattern.REPLICATED
                         and c.validation_level is not ValidationLevel.NONE)
            shards.append((c.key, pattern, members, stage_all, tensors))
            trees.append(tree)
            infos.append(ComponentInfo(c.key, c.required, c.validation_level.value, c.metadata, members))
            if pattern is SharingPattern.REPLICATED:
                layouts[c.key] = [[str(t.dtype), list(t.shape)] for t in tensors]
        plan = self._planner.plan(layout_key(shards))
        buffer = self._pool.acquire(plan.buffer_nbytes)
        try:
            stage(plan, [t for *_, t in shards], buffer)
            if not self.options["overlap_staging"] or not self.topo.is_node_writer:
                buffer.wait_copied()
        except BaseException:
            self._pool.release(buffer)
            raise
        handle = SaveHandle(step, buffer.event)
        blocking = time.perf_counter() - started
        job = SaveJob(step, plan, buffer, trees, infos, metrics, handle, started,
                      {"blocking_s": round(blocking, 6)}, seq, layouts)
        with self._lock:
            self._pending.append(handle)
        if self._link is not None and not self.topo.is_node_writer:
            self._link.post(seq, f"job/{self.topo.rank}", describe_job(job, self.topo.rank))
        if self._worker is not None:
            self._worker.submit(job)
        if writer is not None:
            writer.submit(job)
        log.debug("[rank %d step %d] staged %d bytes in %.3f s", self.topo.rank, step, plan.buffer_nbytes, blocking)
        return handle

    @storage_errors_translated
    def report_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Attach metrics that arrive after `save(step)` (decoupled evaluation). Stored durably
        beside the checkpoint; retention (keep_best) reconsiders once they are written.

        With several ranks, rank 0's call is the one stored (others may call it too; their
        values are checked and otherwise ignored)."""
        self._check_open()
        _check_int("step", step, 0)
        values = metrics_store.check_metrics(metrics)
        if self.topo.rank != 0:
            return
        in_flight = any(h.step == step and not h._settled.is_set() for h in self._pending)
        if not in_flight and not self.storage.exists(manifest_path(step)):
            raise CheckpointNotFoundError(f"cannot report metrics for step {step}: it is not committed "
                                          f"at {self.storage.url} nor being saved")

        def task() -> None:
            if not self.storage.exists(manifest_path(step)):
                log.warning("[rank %d step %d] metrics %s dropped: the save of this step failed or "
                            "was removed by retention", self.topo.rank, step, values)
                return
            metrics_store.write_late(self.storage, step_dir(step), values)
            if step in self._metrics_cache:
                self._metrics_cache[step].update(values)
            self._retain(step)
        self._ensure_writer().submit(task)

    @storage_errors_translated
    def wait(self) -> None:
        """Block until every pending save is committed and its retention has run; raise the
        first failure not yet reported."""
        with self._lock:
            pending = list(self._pending)
        for h in pending:
            h._settled.wait()
        if self._writer is not None:   # late-metric tasks queued behind the saves
            done = threading.Event()
            self._writer.submit(done.set)
            done.wait()
        self._raise_unreported()

    @storage_errors_translated
    def close(self) -> None:
        """wait(), then stop the writer thread. Safe to call twice."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._writer is not None:
                self._writer.stop()
            if self._worker is not None:
                self._worker.stop()
            if self._heartbeat is not None:
                self._heartbeat.stop()
            self._pool.close()

    def __enter__(self) -> "AsyncCheckpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError as err:  # do not mask the exception already propagating
            log.error("[rank %d] while closing after an error: %s", self.topo.rank, err)

    # -- retention (writer thread) ------------------------------------------------------------
    def _metrics_of(self, step: int) -> dict:
        if step not in self._metrics_cache:
            folder = step_dir(step)
            manifest = read_manifest(self.storage, folder, step)
            self._metrics_cache[step] = {**metrics_store.decode(manifest.metrics),
                                         **metrics_store.read_late(self.storage, folder)}
        return self._metrics_cache[step]

    def _retain(self, committed_step: int) -> None:
        # A step can be committed anew after its folder was removed (e.g. a divergence rollback
        # discarded it): never rank it by the metrics cached for the old checkpoint.
        self._metrics_cache.pop(committed_step, None)
        folders = step_dirs(self.storage)
        committed = committed_steps(self.storage, folders)
        if self._link is None:
            for step, name in folders.items():      # leftovers of crashed saves: the writer is idle
                if step not in committed:
                    self.storage.delete_dir(name)
        else:
            # Other nodes may already be writing a later save, so only older folders are garbage;
            # files of an earlier failed attempt at this very step are not in its manifest.
            pending = {h.step for h in self._pending if not h._settled.is_set()}
            for step, name in folders.items():
                if step not in committed and step < committed_step and step not in pending:
                    self.storage.delete_dir(name)
            self._remove_unlisted(committed_step)
        if self.keep_last is None:
            return
        metrics = {s: self._metrics_of(s) for s in committed} if self.keep_best else {}
        keep = steps_to_keep(committed, metrics, keep_last=self.keep_last, keep_best=self.keep_best,
                             best_metric=self.best_metric, greater_is_better=self.greater_is_better,
                             keep_every=self.options["keep_every"])
        for step in committed:
            if step not in keep:
                self.storage.delete(manifest_path(step))   # uncommit first, then free the data
                self.storage.delete_dir(step_dir(step))
                self._metrics_cache.pop(step, None)
                log.info("[rank %d] retention removed step %d", self.topo.rank, step)

    def _remove_unlisted(self, step: int) -> None:
        folder = step_dir(step)
        listed = set(read_manifest(self.storage, folder, step).files) | {MANIFEST_NAME}
        for name in self.storage.list_dir(folder):
            if name not in listed and not name.startswith(metrics_store.PREFIX):
                self.storage.delete(f"{folder}/{name}")

    # -- reading ------------------------------------------------------------------------------
    @storage_errors_translated
    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = committed_steps(self.storage)
        return steps[-1] if steps else None

    @storage_errors_translated
    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first (unreadable manifests are logged and skipped)."""
        return list_infos(self.storage, self.topo.rank)

    @storage_errors_translated
    def load(self, step: int | None = None, *, strict: bool = True) -> CheckpointInfo | None:
        """Restore every registered component from `step` (default: the newest committed one).

        Returns None when nothing is committed yet. All data is read and verified before any
        component's load_state_dict is called, so a corrupt checkpoint changes nothing. With
        several ranks, each reads only its copies (GLOBAL/REPLICATED once per node).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        _check_int("step", step, 0)
        self._load_seq += 1
        return restore(self, step, strict, self._load_seq)
