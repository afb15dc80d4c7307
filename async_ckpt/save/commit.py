"""What "committed" means, in one place: creating a manifest, the clean-up and retention that
follow a commit, and deleting a step (uncommit first, then free the data).

All of it runs on the coordinator's process (node 0's writer thread for commits and retention,
the caller's thread for ``delete_step``); storage operations are idempotent, so retention and an
explicit delete of the same step may overlap.

Which leftovers are garbage after step S commits: files in S's folder that its manifest does not
list (a killed earlier attempt at S), and folders of other steps that hold no manifest and are not
being saved by this checkpointer. With several nodes, another node may already be writing a save
this coordinator has not reached yet, so only folders of steps older than S are removed then.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

from ..errors import CheckpointError, CheckpointNotFoundError, translate_storage_error
from ..format import metrics_file
from ..format.manifest import MANIFEST_NAME, Manifest
from ..format.names import committed_steps, manifest_path, read_manifest, step_dir, step_dirs
from ..options import CheckpointOptions
from ..retention import pending_metric_window, steps_to_keep
from ..storage import Storage, is_stale_scratch
from .lease import read_leases

log = logging.getLogger("async_ckpt")
SCRATCH_GRACE_S = 60.0   # a scratch object older than this is no live write's (clock skew included)


def unlisted(manifest: Manifest, names: list[str]) -> list[str]:
    """The names in a committed step's folder that are garbage: neither its manifest, a data file
    or fragment it lists, nor a late-metrics file (leftovers of a killed earlier attempt at the step, temp
    files of a killed commit). What `after_commit` removes, and what `async-ckpt gc` removes."""
    listed = set(manifest.files) | set(manifest.fragments) | {MANIFEST_NAME}
    return [n for n in names if n not in listed and not n.startswith(metrics_file.PREFIX)]


class CommitRaceLost(CheckpointError):
    """The manifest of the step appeared before ours: another writer committed it meanwhile."""


class Committer:
    """Commits, retention and deletion for one checkpointer's root (coordinator only)."""

    def __init__(self, storage: Storage, options: CheckpointOptions, rank: int, multi_node: bool,
                 pending_steps: Callable[[], set[int]]):
        self.storage, self.options, self.rank = storage, options, rank
        self.multi_node, self.pending_steps = multi_node, pending_steps
        self._metrics: dict[int, dict[str, float]] = {}
        self._swept_all = False
        self._warned_metricless = False

    # -- the commit point -----------------------------------------------------------------------
    def commit(self, manifest: Manifest) -> None:
        """Create the manifest with one exclusive create: the checkpoint exists from here on."""
        try:
            self.storage.create_exclusive(manifest_path(manifest.step), manifest.to_json())
        except FileExistsError:
            raise CommitRaceLost(f"step {manifest.step} was committed by someone else meanwhile") from None

    def discard_uncommitted(self, step: int) -> None:
        """Remove the folder of `step` unless it holds a manifest (never raises): what a failed
        save of it wrote, or a killed earlier attempt's leftovers (on S3 with their unfinished
        multipart uploads). Call only when no writer can be writing into the folder. A folder that
        holds a manifest is another writer's commit (or an earlier one of this step): left alone."""
        try:
            if self.storage.exists(manifest_path(step)):
                return
            self.storage.delete_dir(step_dir(step))
        except Exception:  # noqa: BLE001 - storage may be down; the next commit cleans up
            log.warning("[rank %d step %d] could not remove %s; a later commit will",
                        self.rank, step, step_dir(step))

    # -- after a commit -------------------------------------------------------------------------
    def after_commit(self, manifest: Manifest) -> None:
        """Remove garbage (see the module docstring), then apply retention."""
        step = manifest.step
        # Retention ranks the new checkpoint by the metrics it was just committed with (never by
        # ones cached for an earlier checkpoint of the step, e.g. one a rollback discarded), and
        # does not download the manifest it just wrote; late metrics update this cache.
        self._metrics[step] = metrics_file.decode(manifest.metrics)
        folders = step_dirs(self.storage)
        committed = committed_steps(self.storage, folders)
        pending = self.pending_steps()
        for other, name in folders.items():
            if other in committed or other in pending or other == step:
                continue
            if not self.multi_node or other < step:
                self.storage.delete_dir(name)
        self._remove_unlisted(manifest)
        # Scratch objects (temp files, write probes) a killed process left: under the root every
        # time, in every committed folder once per process (a kill between a temp file's link and
        # its unlink leaves one in a folder this process may never commit into again).
        swept = [""] + ([step_dir(s) for s in committed if s != step] if not self._swept_all else [])
        self._swept_all = True
        self.sweep_scratch(swept, time.time_ns() - int(SCRATCH_GRACE_S * 1e9))
        self._sweep_stale_leases()
        self.retain(committed)

    def _sweep_stale_leases(self) -> None:
        """Writer leases of processes that are gone (killed before close(): `save.lease`)."""
        for lease in read_leases(self.storage):
            if lease.stale_reason() is not None:
                self.storage.delete(lease.name)

    def sweep_scratch(self, folders: list[str], before_ns: int) -> None:
        """Remove backends' scratch objects created before `before_ns` in these folders."""
        for folder in folders:
            for name in self.storage.list_dir(folder):
                if is_stale_scratch(name, before_ns):
                    self.storage.delete(f"{folder}/{name}" if folder else name)

    def _remove_unlisted(self, manifest: Manifest) -> None:
        folder = step_dir(manifest.step)
        for name in unlisted(manifest, self.storage.list_dir(folder)):
            self.storage.delete(f"{folder}/{name}")
        # Object stores: an upload still unfinished in a committed folder is a killed earlier
        # attempt's (every writer of this save completed its files before the commit).
        list_uploads = getattr(self.storage, "list_uploads", None)
        abort_uploads = getattr(self.storage, "abort_uploads", None)
        if list_uploads is not None and abort_uploads is not None:
            for path in list_uploads(folder):
                abort_uploads(path)

    def retain(self, committed: list[int] | None = None) -> None:
        """Apply keep_last / keep_best / keep_every to the committed steps."""
        opts = self.options
        if opts.keep_last is None:
            return
        if committed is None:
            committed = committed_steps(self.storage)
        metrics = {s: self.metrics_of(s) for s in committed} if opts.keep_best else {}
        if opts.keep_best and opts.best_metric:
            self._warn_metricless(committed, metrics, opts.best_metric)
        keep = steps_to_keep(committed, metrics, keep_last=opts.keep_last, keep_best=opts.keep_best,
                             best_metric=opts.best_metric, greater_is_better=opts.greater_is_better,
                             keep_every=opts.keep_every)
        for step in committed:
            if step not in keep:
                self.delete_step(step)
                log.info("[rank %d] retention removed step %d", self.rank, step)

    def _warn_metricless(self, committed: list[int], metrics: Mapping[int, Mapping[str, float]],
                         metric: str) -> None:
        """Once per checkpointer: saves keep committing without the metric keep_best ranks by."""
        missing = [s for s in committed if metric not in metrics.get(s, {})]
        if self._warned_metricless or len(missing) <= pending_metric_window(self.options.keep_last) + 1:
            return
        self._warned_metricless = True
        log.warning("[rank %d] keep_best=%d ranks checkpoints by %r, but %d committed checkpoint(s) "
                    "have no such metric (steps %s%s): pass metrics={%r: ...} to save() or call "
                    "report_metrics(); a checkpoint without it is kept until %d newer ones have "
                    "it, so while none does, none is ever removed", self.rank,
                    self.options.keep_best, metric, len(missing), missing[:5],
                    "..." if len(missing) > 5 else "", metric,
                    pending_metric_window(self.options.keep_last))

    # -- metrics ------------------------------------------------------------------------------
    def metrics_of(self, step: int) -> dict[str, float]:
        if step not in self._metrics:
            folder = step_dir(step)
            manifest = read_manifest(self.storage, folder, step, fragments=False)
            self._metrics[step] = {**metrics_file.decode(manifest.metrics),
                                   **metrics_file.read_late(self.storage, folder)}
        return self._metrics[step]

    def report_late(self, step: int, values: Mapping[str, float]) -> CheckpointError | None:
        """Store late metrics and re-run retention (writer thread); the error to raise to the
        caller if they could not be stored."""
        try:
            if self.record_late_metrics(step, values):
                self.retain()
        except Exception as exc:  # noqa: BLE001 - handed back, raised once by the caller's next call
            log.error("[rank %d step %d] storing late metrics %s failed: %r", self.rank, step,
                      dict(values), exc)
            error = CheckpointError(f"report_metrics({step}, {dict(values)}) was not stored: {exc!r}; "
                                    "the checkpoint is intact, report the metrics again")
            error.__cause__ = translate_storage_error(exc)
            return error
        return None

    def record_late_metrics(self, step: int, values: Mapping[str, float]) -> bool:
        """Store metrics reported after the commit of `step`; False if it is gone."""
        if not self.storage.exists(manifest_path(step)):
            log.warning("[rank %d step %d] metrics %s dropped: the save of this step failed or "
                        "was removed by retention", self.rank, step, dict(values))
            return False
        metrics_file.write_late(self.storage, step_dir(step), dict(values))
        if step in self._metrics:
            self._metrics[step].update(values)
        return True

    # -- deleting ---------------------------------------------------------------------------------
    def delete_step(self, step: int, must_exist: bool = False) -> None:
        """Uncommit `step` (remove its manifest), then free its data. With `must_exist`, raise
        CheckpointNotFoundError if there is neither a manifest nor a folder for it."""
        if must_exist and not self.storage.exists(manifest_path(step)) and step not in step_dirs(self.storage):
            raise CheckpointNotFoundError(f"cannot delete step {step}: there is no checkpoint of it "
                                          f"at {self.storage.url}")
        self.storage.delete(manifest_path(step))     # uncommit first ...
        self.storage.delete_dir(step_dir(step))      # ... then free the data
        self._metrics.pop(step, None)
