"""Save/eval scheduling for training loops, decoupled from each other and resumable.

A PeriodicTrigger fires at steps ``first, first + every, first + 2*every, ...``; its counters
are Stateful, so a resumed run fires at exactly the steps the uninterrupted run would have.
TrainingSchedule combines a save trigger and an eval trigger and answers both questions for a step
in one call, *before* the loop saves: the saved state then already knows that this step's save and
eval were done, and a run resumed from it neither repeats nor skips one.

``eval_on_save=True`` makes every save also an eval, so with ``keep_best`` each checkpoint gets
the metric retention ranks by (directly in ``save(metrics=...)`` or later through
``report_metrics``); otherwise checkpoints without a metric are kept until one arrives.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import InvalidArgumentError

log = logging.getLogger("async_ckpt")


def _check_int(owner: str, name: str, value, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise InvalidArgumentError(f"{owner}: {name} must be an integer >= {lo}, got {value!r}")
    return value


class PeriodicTrigger:
    """Fires at ``first`` (default: ``every``) and every ``every`` steps after it.

    ``trigger(step)`` returns True when `step` reached the next scheduled step, and then moves
    the schedule past `step`; steps may be skipped (a step that passes a scheduled one fires once,
    and the schedule stays on its grid). Register it (or the TrainingSchedule holding it) as a
    component so that ``fired``, ``last_step`` and ``next_step`` are saved.
    """

    def __init__(self, every: int, first: int | None = None) -> None:
        self.every = _check_int("PeriodicTrigger", "every", every, 1)
        self.first = _check_int("PeriodicTrigger", "first", every if first is None else first, 0)
        self.next_step = self.first
        self.fired = 0
        self.last_step: int | None = None

    def _grid_after(self, step: int) -> int:
        """The first scheduled step strictly after `step`."""
        if step < self.first:
            return self.first
        return self.first + ((step - self.first) // self.every + 1) * self.every

    def __call__(self, step: int) -> bool:
        _check_int("PeriodicTrigger", "step", step, 0)
        if step < self.next_step:
            return False
        self.fired += 1
        self.last_step = step
        self.next_step = self._grid_after(step)
        return True

    def state_dict(self) -> dict:
        return {"every": self.every, "first": self.first, "next_step": self.next_step,
                "fired": self.fired, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters. If `every`/`first` changed since the save, the new grid applies
        from the step after the last one that fired."""
        self.fired = int(state["fired"])
        self.last_step = state["last_step"]
        if (state["every"], state["first"]) == (self.every, self.first):
            self.next_step = int(state["next_step"])
            return
        self.next_step = self.first if self.last_step is None else self._grid_after(int(self.last_step))
        log.info("PeriodicTrigger: schedule changed from every %s (first %s) to every %s (first %s); "
                 "next firing at step %d", state["every"], state["first"], self.every, self.first,
                 self.next_step)


@dataclass(frozen=True)
class Due:
    """What a step has to do: save a checkpoint, run an evaluation, or both."""

    save: bool
    eval: bool


class TrainingSchedule:
    """Save every `save_every` steps (first at `first_save`) and evaluate every `eval_every`
    steps (first at `first_eval`; None: no periodic eval), with ``eval_on_save`` adding an eval
    to every save. Typical loop::

        due = schedule.due(step)            # once per step, before saving
        metrics = evaluate() if due.eval else None
        if due.save:
            ckpt.save(step, metrics=metrics)
        elif metrics:                       # an eval without a checkpoint of its own
            log_metrics(step, metrics)

    With decoupled evaluation, start the eval when ``due.eval`` and hand its result to
    ``ckpt.report_metrics(step, ...)`` when it finishes.
    """

    def __init__(self, *, save_every: int, eval_every: int | None = None, first_save: int | None = None,
                 first_eval: int | None = None, eval_on_save: bool = False) -> None:
        self.save = PeriodicTrigger(save_every, first_save)
        if eval_every is None and first_eval is not None:
            raise InvalidArgumentError("TrainingSchedule: first_eval needs eval_every")
        self.eval = PeriodicTrigger(eval_every, first_eval) if eval_every is not None else None
        self.eval_on_save = bool(eval_on_save)

    def due(self, step: int) -> Due:
        """Decide (and record) what `step` does. Call it once per step."""
        save = self.save(step)
        periodic = self.eval(step) if self.eval is not None else False
        return Due(save=save, eval=periodic or (save and self.eval_on_save))

    def state_dict(self) -> dict:
        return {"save": self.save.state_dict(),
                "eval": self.eval.state_dict() if self.eval is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.save.load_state_dict(state["save"])
        if self.eval is not None and state.get("eval") is not None:
            self.eval.load_state_dict(state["eval"])
