"""Which committed checkpoints retention keeps: a pure function, tested by tables."""
from __future__ import annotations

import math
from typing import Mapping


def lower_is_better(metric: str, greater_is_better: bool | None) -> bool:
    if greater_is_better is None:
        return "loss" in metric.lower()
    return not greater_is_better


def steps_to_keep(steps: list[int], metrics: Mapping[int, Mapping[str, float]], *,
                  keep_last: int | None, keep_best: int = 0, best_metric: str | None = None,
                  greater_is_better: bool | None = None) -> set[int]:
    """The union of: the newest step, the last `keep_last`, the best `keep_best` by
    `best_metric`, and (while keep_best > 0) every step whose metric has not arrived yet.
    `keep_last=None` keeps everything. NaN metrics rank last."""
    ordered = sorted(steps)
    if keep_last is None:
        return set(ordered)
    keep = set(ordered[-1:]) | (set(ordered[-keep_last:]) if keep_last > 0 else set())
    if keep_best > 0 and best_metric:
        lower = lower_is_better(best_metric, greater_is_better)
        scored = []
        for step in ordered:
            value = metrics.get(step, {}).get(best_metric)
            if value is None:
                keep.add(step)
                continue
            value = float(value)
            rank = math.inf if math.isnan(value) else (value if lower else -value)
            scored.append((rank, -step, step))   # ties: the newer checkpoint wins
        keep |= {step for _, _, step in sorted(scored)[:keep_best]}
    return keep
