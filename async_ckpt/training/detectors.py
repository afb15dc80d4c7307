"""Divergence detectors: stateful comparisons of a short and a long view of one training metric.

A detector only answers "has the metric just jumped?"; what to do about it (stop, abort, roll back)
is DivergenceMonitor's job (divergence.py). Both detectors are Stateful, so their statistics are
saved and restored with the checkpoint and a resumed run detects exactly what the uninterrupted
one would have.

Each fires once per excursion: after firing it stays quiet until the gap falls below the
threshold again, so a long spike is one event, not one per step. A non-finite value (NaN/inf
loss) fires at once and is kept out of the statistics, which it would poison for good.
"""
from __future__ import annotations

import collections
import math

from ..errors import InvalidArgumentError


def _check_int(owner: str, name: str, value, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise InvalidArgumentError(f"{owner}: {name} must be an integer >= {lo}, got {value!r}")
    return value


def _check_threshold(owner: str, threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold) or threshold <= 0:
        raise InvalidArgumentError(f"{owner}: threshold must be a finite number > 0 (the rise of the "
                                   f"short statistic over the long one that counts as divergence), "
                                   f"got {threshold!r}")
    return float(threshold)


class _Detector:
    """Shared by both detectors: direction, threshold, once-per-excursion firing."""

    #: how many recent steps moved the short statistic; the monitor rolls back past them.
    lookback: int
    _config_keys: tuple[str, ...] = ()

    def __init__(self, threshold: float, greater_is_better: bool) -> None:
        self.threshold = _check_threshold(type(self).__name__, threshold)
        self.greater_is_better = bool(greater_is_better)
        self.armed = True            # False after firing, until the gap closes again
        self.count = 0               # finite values seen
        self.last_reason = ""

    def gap(self) -> float | None:
        """How much worse the short statistic is than the long one (None: not ready yet)."""
        short, long = self.short, self.long
        if short is None or long is None:
            return None
        return long - short if self.greater_is_better else short - long

    @property
    def short(self) -> float | None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def long(self) -> float | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _add(self, value: float) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def update(self, value: float) -> bool:
        """Feed the metric of one step; True when divergence starts at this step."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)         # 0-dim tensors, NumPy scalars
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"{type(self).__name__}.update needs a number, got "
                                           f"{type(value).__name__}") from None
        value = float(value)
        if not math.isfinite(value):
            self.last_reason = f"non-finite value {value}"
            return True
        self._add(value)
        self.count += 1
        gap = self.gap()
        if gap is None or gap < self.threshold:
            self.armed = True
            return False
        if not self.armed:
            return False
        self.armed = False
        self.last_reason = (f"short {self.short:.6g} vs long {self.long:.6g}: gap {gap:.6g} >= "
                            f"threshold {self.threshold:.6g}")
        return True

    def _config(self) -> dict:
        return {k: getattr(self, k) for k in self._config_keys}

    def _check_config(self, state: dict) -> None:
        saved = state.get("config", {})
        if saved != self._config():
            raise InvalidArgumentError(
                f"{type(self).__name__}: the saved state was made with {saved}, this detector has "
                f"{self._config()}; construct it with the saved parameters to resume its "
                "statistics, or do not load its state to start them afresh")


class EMADetector(_Detector):
    """Dual time-scale detector: a short and a long exponential moving average of the metric.

    Fires when ``short - long >= threshold`` (``long - short`` with ``greater_is_better=True``,
    e.g. accuracy). Spans are in steps (``alpha = 2 / (span + 1)``); both averages start at the
    first value, and nothing fires before ``warmup`` values (default: ``long_span``) were seen.
    A converging curve keeps ``short <= long`` (the long average lags behind, higher), so noise
    must exceed the threshold on its own to fire.
    """

    _config_keys = ("short_span", "long_span", "threshold", "warmup", "greater_is_better")

    def __init__(self, short_span: int = 10, long_span: int = 100, *, threshold: float,
                 warmup: int | None = None, greater_is_better: bool = False) -> None:
        owner = "EMADetector"
        self.short_span = _check_int(owner, "short_span", short_span, 1)
        self.long_span = _check_int(owner, "long_span", long_span, 2)
        if self.short_span >= self.long_span:
            raise InvalidArgumentError(f"{owner}: short_span ({short_span}) must be smaller than "
                                       f"long_span ({long_span})")
        self.warmup = _check_int(owner, "warmup", long_span if warmup is None else warmup, 0)
        super().__init__(threshold, greater_is_better)
        self.lookback = self.short_span
        self._short: float | None = None
        self._long: float | None = None

    @property
    def short(self) -> float | None:
        return self._short if self.count >= max(1, self.warmup) else None

    @property
    def long(self) -> float | None:
        return self._long if self.count >= max(1, self.warmup) else None

    def _add(self, value: float) -> None:
        if self._short is None or self._long is None:
            self._short = self._long = value
            return
        self._short += (value - self._short) * 2.0 / (self.short_span + 1)
        self._long += (value - self._long) * 2.0 / (self.long_span + 1)

    def reset(self) -> None:
        """Forget everything seen (the configuration stays)."""
        self._short = self._long = None
        self.count, self.armed = 0, True

    def state_dict(self) -> dict:
        return {"config": self._config(), "short": self._short, "long": self._long,
                "count": self.count, "armed": self.armed}

    def load_state_dict(self, state: dict) -> None:
        self._check_config(state)
        self._short, self._long = state["short"], state["long"]
        self.count, self.armed = int(state["count"]), bool(state["armed"])


class WindowDetector(_Detector):
    """Dual-window detector: the mean of the last ``short_window`` values against the mean of the
    ``long_window`` values just before them (disjoint windows, so a spike cannot raise its own
    reference). Fires when ``short_mean - long_mean >= threshold`` (reversed with
    ``greater_is_better=True``), once both windows are full.
    """

    _config_keys = ("short_window", "long_window", "threshold", "greater_is_better")

    def __init__(self, short_window: int = 10, long_window: int = 100, *, threshold: float,
                 greater_is_better: bool = False) -> None:
        owner = "WindowDetector"
        self.short_window = _check_int(owner, "short_window", short_window, 1)
        self.long_window = _check_int(owner, "long_window", long_window, 1)
        if self.short_window >= self.long_window:
            raise InvalidArgumentError(f"{owner}: short_window ({short_window}) must be smaller than "
                                       f"long_window ({long_window})")
        super().__init__(threshold, greater_is_better)
        self.lookback = self.short_window
        self._values: collections.deque[float] = collections.deque(maxlen=self.short_window + self.long_window)

    @property
    def short(self) -> float | None:
        if len(self._values) < self.short_window + self.long_window:
            return None
        recent = list(self._values)[-self.short_window:]
        return math.fsum(recent) / len(recent)

    @property
    def long(self) -> float | None:
        if len(self._values) < self.short_window + self.long_window:
            return None
        older = list(self._values)[:self.long_window]
        return math.fsum(older) / len(older)

    def _add(self, value: float) -> None:
        self._values.append(value)

    def reset(self) -> None:
        """Forget everything seen (the configuration stays)."""
        self._values.clear()
        self.count, self.armed = 0, True

    def state_dict(self) -> dict:
        return {"config": self._config(), "values": list(self._values), "count": self.count,
                "armed": self.armed}

    def load_state_dict(self, state: dict) -> None:
        self._check_config(state)
        self._values.clear()
        self._values.extend(float(v) for v in state["values"])
        self.count, self.armed = int(state["count"]), bool(state["armed"])
