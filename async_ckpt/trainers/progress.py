"""The trainers' small state pieces: training progress, and the loader whose position is saved.

`Progress` is the step counter as a component (GLOBAL): the step a checkpoint was taken at is
also the checkpoint's step, but keeping it as state makes a checkpoint self-describing to tools
that read components (``async-ckpt inspect``) and lets subclasses add counters (tokens seen...).

`make_loader` builds the loader of a trainer: a ``ResumableSampler`` (seeded, sharded as the
trainer says) inside torchdata's ``StatefulDataLoader`` with the trainer's own generator, whose
state is the consumed position whatever ``num_workers``. Without torchdata it falls back to a
plain ``DataLoader`` with ``num_workers=0`` and saves the sampler (docs/training.md).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import InvalidArgumentError
from ..training.sampler import ResumableSampler


class Progress:
    """How far training got: ``step`` (and ``samples``, the batches times the global batch)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def make_loader(dataset: Any, sampler: ResumableSampler, args: Any, generator: torch.Generator,
                collate_fn: Callable | None, batch_size: int | None = None) -> tuple[Any, Any]:
    """(loader, the Stateful holding its position) for `dataset` drawn through `sampler`."""
    size = args.batch_size if batch_size is None else batch_size
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        if args.num_workers:
            raise InvalidArgumentError(
                "num_workers > 0 needs torchdata's StatefulDataLoader (pip install torchdata) so the "
                "saved data position is the consumed one, not the prefetched one") from None
        plain = torch.utils.data.DataLoader(dataset, batch_size=size, sampler=sampler, generator=generator,
                                            collate_fn=collate_fn)
        return plain, sampler
    loader = StatefulDataLoader(dataset, batch_size=size, sampler=sampler, num_workers=args.num_workers,
                                generator=generator, collate_fn=collate_fn,
                                persistent_workers=args.num_workers > 0)
    return loader, loader
