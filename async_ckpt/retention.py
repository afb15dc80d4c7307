"""Which committed checkpoints retention keeps: a pure function of (steps, metrics, policy).

Being pure is what makes the decision survive restarts: a new process that sees the same committed
steps and the same (durably stored) metrics keeps exactly the same set. Tested by tables.
"""
from __future__ import annotations

import math
from typing import Mapping


def lower_is_better(metric: str, greater_is_better: bool | None) -> bool:
    """Direction of `metric`: explicit when `greater_is_better` is given, otherwise lower is
    better exactly when the name contains "loss" (case-insensitive)."""
    if greater_is_better is None:
        return "loss" in metric.lower()
    return not greater_is_better


def rank_key(value: float, lower: bool) -> float:
    """Sort key, smaller = better. NaN ranks after every real value (it is a value, just the
    worst one); 0.0 is an ordinary value."""
    if math.isnan(value):
        return math.inf
    return value if lower else -value


def best_steps(steps: list[int], metrics: Mapping[int, Mapping[str, float]], metric: str,
               greater_is_better: bool | None, n: int) -> list[int]:
    """The `n` best steps that have `metric`, best first. Ties go to the newer step, so the
    choice is deterministic whatever order the metrics arrived in."""
    lower = lower_is_better(metric, greater_is_better)
    scored = []
    for step in steps:
        value = metrics.get(step, {}).get(metric)
        if value is not None:
            scored.append((rank_key(float(value), lower), -step))
    return [-neg_step for _, neg_step in sorted(scored)[:n]]


def pending_metric_window(keep_last: int | None) -> int:
    """How many newer checkpoints that have the metric a metric-less one waits for: keep_last +
    1. Evaluations lag behind saves and may report out of order (a newer step's eval can finish
    first), so one newer scored checkpoint proves nothing; once more newer checkpoints than
    keep_last asks to keep have their metric, this one's was lost (a crash between save() and
    report_metrics()) and it is ranked as a checkpoint without the metric."""
    return (keep_last or 0) + 1


def steps_to_keep(steps: list[int], metrics: Mapping[int, Mapping[str, float]], *,
                  keep_last: int | None, keep_best: int = 0, best_metric: str | None = None,
                  greater_is_better: bool | None = None, keep_every: int | None = None) -> set[int]:
    """The union of: the newest step, the last `keep_last`, the best `keep_best` by
    `best_metric`, (while keep_best > 0) every step whose metric has not arrived yet while fewer
    than `pending_metric_window(keep_last)` newer steps have theirs (its evaluation may still be
    running), and every step that is a multiple of `keep_every` (kept for good).
    `keep_last=None` keeps everything. A metric that no step ever reports keeps every step (the
    checkpointer warns about that).
    NaN metrics rank last; ties go to the newer step."""
    ordered = sorted(steps)
    if keep_last is None:
        return set(ordered)
    keep = set(ordered[-1:]) | (set(ordered[-keep_last:]) if keep_last > 0 else set())
    if keep_every:
        keep |= {step for step in ordered if step % keep_every == 0}
    if keep_best > 0 and best_metric:
        # A checkpoint whose eval has not finished may turn out to be the best: keep it until
        # its metric arrives (report_metrics), then rank it like the others; but not for ever.
        window, scored_after = pending_metric_window(keep_last), 0
        for step in reversed(ordered):
            if metrics.get(step, {}).get(best_metric) is not None:
                scored_after += 1
            elif scored_after < window:
                keep.add(step)
        keep |= set(best_steps(ordered, metrics, best_metric, greater_is_better, keep_best))
    return keep
