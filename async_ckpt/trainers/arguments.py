"""TrainingArguments: everything a trainer is told, in one frozen dataclass validated once.

The seed's promise, ``TrainingArguments(save_strategy="steps", save_steps=1000,
resume_from_checkpoint=True)``: the trainers (`async_ckpt.trainers.base`) read nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import InvalidArgumentError
from ..types import ValidationLevel

SAVE_STRATEGIES = ("steps", "epochs", "seconds", "no")
DIVERGENCE_ACTIONS = (None, "stop", "abort", "rollback")


def _positive_int(name: str, value: Any, lo: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise InvalidArgumentError(f"TrainingArguments: {name} must be an integer >= {lo}, got {value!r}")


@dataclass(frozen=True)
class TrainingArguments:
    """What to train for, when to save and evaluate, what to keep and how to resume.

    - ``output_dir``: the checkpoint root, a local path or any URL the checkpointer takes
      (``file://``, ``s3://``, ``memory://``), with ``storage_options`` for fsspec.
    - ``save_strategy``: ``"steps"`` (every ``save_steps`` steps), ``"epochs"`` (every
      ``save_steps`` epochs, an epoch being one pass of the loader), ``"seconds"`` (when
      ``save_steps`` seconds passed since the last save; every rank follows rank 0's clock) or
      ``"no"``. Whatever the strategy, SIGTERM/SIGUSR1 saves and stops (``handle_signals``).
    - ``resume_from_checkpoint``: True (the newest committed checkpoint under ``output_dir``, or
      a fresh start when there is none), False, a step number (that step; an error if it is not
      committed) or a path/URL (the newest checkpoint under *that* root; saves still go to
      ``output_dir``).
    - retention: ``keep_last``, ``keep_best`` by ``best_metric`` (``greater_is_better`` as in
      AsyncCheckpointer); ``eval_steps``/``eval_on_save`` run the trainer's ``eval_fn``; its
      metrics are attached to a checkpoint late, with ``report_metrics``, after the save started.
    - divergence: ``divergence_action`` ("stop", "abort", "rollback" or None) on the training loss
      with an EMADetector(``divergence_spans``, ``divergence_threshold``).
    - ``validation``: the replica check of model and optimizer (None: the pattern's default,
      QUICK for replicas); ``compression``: None or "zstd"; ``checkpoint_options``: any further
      AsyncCheckpointer keyword (``timeout_s``, ``keep_every``, ...).
    """

    output_dir: str
    max_steps: int
    batch_size: int = 8                   # per rank (DDPTrainer with dispatch_batches: per rank too)
    seed: int = 0
    save_strategy: str = "steps"
    save_steps: int = 500
    resume_from_checkpoint: bool | int | str = True
    keep_last: int | None = 3
    keep_best: int = 0
    best_metric: str | None = None
    greater_is_better: bool | None = None
    eval_steps: int | None = None
    eval_on_save: bool = False
    divergence_action: str | None = None
    divergence_spans: tuple[int, int] = (10, 100)
    divergence_threshold: float = 1.0
    validation: ValidationLevel | None = None
    compression: str | None = None
    storage_options: Mapping[str, Any] | None = None
    num_workers: int = 0
    handle_signals: bool = True
    checkpoint_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise InvalidArgumentError("TrainingArguments: output_dir must be a path or URL (str)")
        _positive_int("max_steps", self.max_steps)
        _positive_int("batch_size", self.batch_size)
        _positive_int("seed", self.seed, 0)
        _positive_int("save_steps", self.save_steps)
        _positive_int("eval_steps", self.eval_steps, allow_none=True)
        _positive_int("num_workers", self.num_workers, 0)
        if self.save_strategy not in SAVE_STRATEGIES:
            raise InvalidArgumentError(f"TrainingArguments: save_strategy must be one of {SAVE_STRATEGIES}, "
                                       f"got {self.save_strategy!r}")
        if self.divergence_action not in DIVERGENCE_ACTIONS:
            raise InvalidArgumentError(f"TrainingArguments: divergence_action must be one of "
                                       f"{DIVERGENCE_ACTIONS}, got {self.divergence_action!r}")
        resume = self.resume_from_checkpoint
        if not isinstance(resume, (bool, int, str)) or (isinstance(resume, int) and not isinstance(resume, bool)
                                                        and resume < 0):
            raise InvalidArgumentError("TrainingArguments: resume_from_checkpoint must be True, False, a "
                                       f"step (int >= 0) or a checkpoint root (str), got {resume!r}")

    @property
    def resume_root(self) -> str | None:
        """Another root to resume from (resume_from_checkpoint given as a path), else None."""
        r = self.resume_from_checkpoint
        return r if isinstance(r, str) else None

    @property
    def resume_step(self) -> int | None:
        r = self.resume_from_checkpoint
        return r if isinstance(r, int) and not isinstance(r, bool) else None

    def checkpointer_keywords(self) -> dict[str, Any]:
        """The AsyncCheckpointer keywords these arguments give."""
        return {"storage_options": dict(self.storage_options) if self.storage_options else None,
                "compression": self.compression, "keep_last": self.keep_last, "keep_best": self.keep_best,
                "best_metric": self.best_metric, "greater_is_better": self.greater_is_better,
                **dict(self.checkpoint_options)}
