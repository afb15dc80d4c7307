"""DivergenceMonitor: feeds a detector every step and carries out the chosen action.

Actions, decided when the monitor is built:
- ``stop``: the event tells the loop to finish; it should save the current state and exit.
- ``abort``: the loop should exit without saving (the state is presumed damaged).
- ``rollback``: the monitor restores a committed checkpoint from before the divergence (the newest
  one, or the best by the checkpointer's ``best_metric``), discards the committed checkpoints made
  after it (they belong to the diverged trajectory, and their steps will be saved anew), and the
  loop continues from the restored step. ``max_rollbacks`` bounds how often; past it the event
  escalates to ``abort``.

The monitor is Stateful: register it as a component so its statistics travel with the checkpoint.
In a multi-rank job feed it a value that is identical on every rank (an all-reduced loss), so
every rank takes the same decision and enters the same rollback.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .errors import CheckpointNotFoundError, InvalidArgumentError, storage_errors_translated
from .layout import manifest_path, step_dir
from .retention import best_steps
from .types import CheckpointInfo

log = logging.getLogger("async_ckpt")
ACTIONS = ("stop", "abort", "rollback")


@dataclass(frozen=True)
class DivergenceEvent:
    """What the monitor saw at `step` and what it did.

    `action` is what the loop must do now: ``"stop"`` (save, then finish), ``"abort"`` (finish
    without saving) or ``"rollback"`` (already done: continue from ``restored.step``; rebuild
    iterators over restored dataloaders). `discarded` lists the committed steps removed by the
    rollback."""

    step: int
    value: float
    reason: str
    action: str
    restored: CheckpointInfo | None = None
    discarded: tuple[int, ...] = ()

    @property
    def stop(self) -> bool:
        """True when training must end (stop or abort)."""
        return self.action in ("stop", "abort")

    @property
    def save(self) -> bool:
        """True when the loop should save the current state before ending."""
        return self.action == "stop"


class DivergenceMonitor:
    """Runs `detector` (EMADetector or WindowDetector) on one metric and acts when it fires.

    `checkpointer` (required for ``rollback``) is the AsyncCheckpointer whose checkpoints are
    restored. `rollback_to`: ``"newest"`` or ``"best"`` by `best_metric` (default: the
    checkpointer's; `greater_is_better` likewise, None inferring from the name as retention
    does); the newest is used when no candidate has that metric. Only checkpoints at least `lookback`
    steps older than the step that fired qualify (default: the detector's short scale, the steps
    that already moved its short statistic).
    """

    def __init__(self, detector, action: str = "stop", *, checkpointer=None, rollback_to: str = "newest",
                 lookback: int | None = None, max_rollbacks: int = 3, best_metric: str | None = None,
                 greater_is_better: bool | None = None) -> None:
        if not all(hasattr(detector, name) for name in ("update", "state_dict", "load_state_dict", "lookback")):
            raise InvalidArgumentError("DivergenceMonitor needs a detector such as EMADetector or "
                                       f"WindowDetector, got {type(detector).__name__}")
        if action not in ACTIONS:
            raise InvalidArgumentError(f"DivergenceMonitor: action must be one of {ACTIONS}, got {action!r}")
        if action == "rollback" and checkpointer is None:
            raise InvalidArgumentError("DivergenceMonitor: action='rollback' needs checkpointer=, the "
                                       "AsyncCheckpointer to restore from")
        if rollback_to not in ("newest", "best"):
            raise InvalidArgumentError(f"DivergenceMonitor: rollback_to must be 'newest' or 'best', got {rollback_to!r}")
        if best_metric is None and checkpointer is not None:
            best_metric = getattr(checkpointer, "best_metric", None)
            if greater_is_better is None:
                greater_is_better = getattr(checkpointer, "greater_is_better", None)
        if action == "rollback" and rollback_to == "best" and not best_metric:
            raise InvalidArgumentError("DivergenceMonitor: rollback_to='best' needs best_metric= (or a "
                                       "checkpointer created with best_metric=) to rank checkpoints by")
        self.best_metric, self.greater_is_better = best_metric, greater_is_better
        for name, value in (("lookback", lookback), ("max_rollbacks", max_rollbacks)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidArgumentError(f"DivergenceMonitor: {name} must be an integer >= 0, got {value!r}")
        self.detector, self.action, self.checkpointer = detector, action, checkpointer
        self.rollback_to, self.max_rollbacks = rollback_to, max_rollbacks
        self.lookback = detector.lookback if lookback is None else lookback
        self.rollbacks = 0
        self.events: list[dict] = []     # the last few events, saved with the state
        self._loaded = False

    # -- per step ------------------------------------------------------------------------------
    @storage_errors_translated
    def update(self, step: int, value) -> DivergenceEvent | None:
        """Feed the metric of `step`. Returns None while training is healthy, else the event
        (after carrying out a rollback)."""
        if not self.detector.update(value):
            return None
        value = float(value)
        reason = self.detector.last_reason
        action = self.action
        if action == "rollback" and self.rollbacks >= self.max_rollbacks:
            reason += f"; already rolled back {self.rollbacks} time(s) (max_rollbacks), aborting"
            action = "abort"
        log.warning("divergence at step %d (value %s): %s -> %s", step, value, reason, action)
        if action != "rollback":
            return self._record(DivergenceEvent(step, value, reason, action))
        restored, discarded = self._rollback(step)
        return self._record(DivergenceEvent(step, value, reason, "rollback", restored, discarded))

    def _record(self, event: DivergenceEvent) -> DivergenceEvent:
        entry = {"n": self.events[-1]["n"] + 1 if self.events else 1, "step": event.step,
                 "value": event.value if math.isfinite(event.value) else str(event.value),
                 "reason": event.reason, "action": event.action,
                 "restored": event.restored.step if event.restored else None}
        self.events = (self.events + [entry])[-16:]
        return event

    # -- rollback ------------------------------------------------------------------------------
    def choose_target(self, step: int) -> CheckpointInfo:
        """The committed checkpoint a divergence detected at `step` rolls back to."""
        ckpt = self.checkpointer
        limit = step - self.lookback
        candidates = [i for i in ckpt.list_checkpoints() if i.step <= limit]
        if not candidates:
            raise CheckpointNotFoundError(
                f"divergence at step {step}: no committed checkpoint at or before step {limit} "
                f"(lookback {self.lookback}) under {ckpt.storage.url} to roll back to; save more "
                "often, lower lookback, or use action='stop'")
        if self.rollback_to == "best":
            metrics = {i.step: i.metrics for i in candidates}
            best = best_steps([i.step for i in candidates], metrics, self.best_metric,
                              self.greater_is_better, 1)
            if best:
                return next(i for i in candidates if i.step == best[0])
            log.warning("no checkpoint before step %d has metric %r; rolling back to the newest",
                        limit, self.best_metric)
        return candidates[-1]

    def _rollback(self, step: int) -> tuple[CheckpointInfo, tuple[int, ...]]:
        ckpt = self.checkpointer
        ckpt.wait()                      # a save still in flight would commit after the discard
        target = self.choose_target(step)
        discarded = tuple(i.step for i in ckpt.list_checkpoints() if i.step > target.step)
        rank, world = _rank_and_world()
        if rank == 0:
            # No public delete in the checkpointer API yet: uncommit first, then free the data,
            # exactly as retention does (the writer is idle after wait()).
            for s in discarded:
                ckpt.storage.delete(manifest_path(s))
                ckpt.storage.delete_dir(step_dir(s))
        if world > 1:                    # no rank may load or save before the discard is done
            import torch.distributed as dist
            dist.barrier()
        self._loaded = False
        rollbacks = self.rollbacks + 1
        info = ckpt.load(target.step)
        self.rollbacks = max(self.rollbacks, rollbacks)
        if not self._loaded:
            # Not registered as a component: the statistics still hold the spike.
            self.detector.reset()
        log.warning("rolled back to step %d (%s); discarded steps %s", info.step, info.url, list(discarded))
        return info, discarded

    # -- Stateful ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "rollbacks": self.rollbacks, "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.detector.load_state_dict(state["detector"])
        # The rollback count only grows: restoring an older checkpoint during a rollback must not
        # give the run its rollbacks back (that would allow an endless spike/rollback loop).
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))
        # Events only grow too: a rollback restores an older list, the newer events stay known.
        known = {e.get("n") for e in self.events}
        merged = self.events + [e for e in state.get("events", []) if e.get("n") not in known]
        self.events = sorted(merged, key=lambda e: e.get("n", 0))[-16:]
        self._loaded = True


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
