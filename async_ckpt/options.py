"""The checkpointer's options: one frozen dataclass, validated once at construction.

The constructor keywords of `AsyncCheckpointer` (DESIGN.md section 2) map one to one onto these
fields; the ones DESIGN lists as ``**more_options`` are the fields after ``max_pending``. Every
module that needs an option receives this object (or the one value it needs), never the
checkpointer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError

COMPRESSIONS = (None, "zstd")


def _check_int(name: str, value: Any, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {value!r}")


def check_step(step: Any) -> int:
    """A step number: an integer >= 0."""
    _check_int("step", step, 0)
    return step


@dataclass(frozen=True)
class CheckpointOptions:
    """Everything configurable about a checkpointer except its root, storage and components.

    ``allow_pickle`` (False: refuse non-JSON leaves on save and pickled leaves on load),
    ``verify`` (True: check hashes on load), ``compression_level`` (zstd level), ``overlap_staging``
    (with CUDA state, save() returns before the D2H copy lands; ``SaveHandle.wait_staged()`` must
    return before the state is mutated), ``encode_threads`` (zstd threads), ``keep_every`` (N:
    retention keeps every step that is a multiple of N for good), ``timeout_s`` (the longest a
    multi-rank save waits for another rank or node to reach the save; once there, a peer may work
    as long as it needs while its heartbeat goes on, and a dead one is noticed within
    min(timeout_s, 30) s), ``node_object`` (True: a node's local ranks write one data object
    per save, each rank's records one segment of it; False: one data file per rank, as releases
    before it wrote: a benchmark and compatibility knob, both load alike).
    """

    compression: str | None = None
    keep_last: int | None = None
    keep_best: int = 0
    best_metric: str | None = None
    greater_is_better: bool | None = None
    max_pending: int = 1
    # -- **more_options ---------------------------------------------------------------------------
    allow_pickle: bool = False
    verify: bool = True
    compression_level: int = 1
    overlap_staging: bool = False
    encode_threads: int = 2
    timeout_s: float = 600.0
    keep_every: int | None = None
    node_object: bool = True

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise InvalidArgumentError(f"compression must be None or 'zstd', got {self.compression!r}")
        _check_int("keep_last", self.keep_last, 0, allow_none=True)
        _check_int("keep_best", self.keep_best, 0)
        _check_int("max_pending", self.max_pending, 1)
        _check_int("compression_level", self.compression_level, 1)
        _check_int("encode_threads", self.encode_threads, 1)
        _check_int("keep_every", self.keep_every, 1, allow_none=True)
        if not isinstance(self.node_object, bool):
            raise InvalidArgumentError(f"node_object must be True or False, got {self.node_object!r}")
        if self.keep_best and not self.best_metric:
            raise InvalidArgumentError("keep_best > 0 needs best_metric, the metric name to rank by")
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidArgumentError(f"timeout_s must be a number of seconds > 0, got {timeout!r}")

    @classmethod
    def extra_names(cls) -> list[str]:
        """The options passed as ``**more_options``."""
        names = [f.name for f in dataclasses.fields(cls)]
        return sorted(names[names.index("max_pending") + 1:])

    @classmethod
    def from_keywords(cls, more_options: dict[str, Any], **named: Any) -> "CheckpointOptions":
        """The options from the constructor's named keywords and its ``**more_options``."""
        unknown = sorted(set(more_options) - set(cls.extra_names()))
        if unknown:
            raise InvalidArgumentError(f"unknown option(s) {unknown}; valid extra options: "
                                       f"{cls.extra_names()}")
        return cls(**named, **more_options)

    def retention_policy(self) -> dict[str, Any]:
        """The retention options as recorded in each manifest, so tools can say why a checkpoint
        is kept; empty when this checkpointer never deletes (keep_last=None: e.g. an import)."""
        if self.keep_last is None:
            return {}
        return {"keep_last": self.keep_last, "keep_best": self.keep_best,
                "best_metric": self.best_metric, "greater_is_better": self.greater_is_better,
                "keep_every": self.keep_every}

    @property
    def retains(self) -> bool:
        """Whether retention ever removes a committed checkpoint."""
        return self.keep_last is not None
