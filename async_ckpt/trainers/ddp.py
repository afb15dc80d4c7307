"""DDPTrainer: data parallel with torch's DistributedDataParallel (model and optimizer
REPLICATED, checked for agreement at every save by default).

Two ways to feed the ranks, as in the seed:
- ``dispatch_batches=True``: rank 0 alone draws global batches (``batch_size * world`` samples)
  and scatters one slice to each rank; the data position is rank 0's, so the dataset is GLOBAL
  (one copy, reloaded by every rank; only rank 0 ever iterates its loader). The loss curve is the
  same at any world size with the same global batch.
- ``dispatch_batches=False`` (default): each rank loads its own share through a
  ``ResumableSampler(rank=r, num_replicas=world)``; the dataset is PER_RANK.

The loss each rank sees is averaged over the ranks (one all-reduce) so that divergence decisions
and logs are the same everywhere. Run it under torchrun (or spawn) with a gloo/NCCL process group
initialised before the trainer is built.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ..training.sampler import ResumableSampler
from ..types import SharingPattern
from .base import Trainer
from .progress import make_loader


class AllRanks:
    """Collectives of a trainer whose every rank holds a data-parallel replica of the step (DDP,
    FSDP2): the loss averaged over the world, flags OR-ed over it. Mixed in before `Trainer`."""
    world: int

    def reduce_loss(self, loss: torch.Tensor) -> float:
        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total) / self.world

    def agree(self, flags: list[bool]) -> list[bool]:
        return agree(flags)


class DDPTrainer(AllRanks, Trainer):
    """REPLICATED model and optimizer; data GLOBAL (dispatch_batches) or PER_RANK."""

    def __init__(self, *args: Any, dispatch_batches: bool = False, **kwargs: Any) -> None:
        self.dispatch_batches = dispatch_batches
        data = SharingPattern.GLOBAL if dispatch_batches else SharingPattern.PER_RANK
        self.patterns = {"model": SharingPattern.REPLICATED, "optimizer": SharingPattern.REPLICATED,
                         "data": data}
        super().__init__(*args, **kwargs)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.parallel.DistributedDataParallel(model)

    def make_loader(self, dataset: Any, collate_fn: Callable | None) -> tuple[Any, Any]:
        if self.dispatch_batches:     # every rank builds rank 0's loader; only rank 0 iterates it
            sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=self.args.seed)
            gen = torch.Generator().manual_seed(self.args.seed)
            self.loader_generator = gen
            return make_loader(dataset, sampler, self.args, gen, collate_fn,
                               batch_size=self.args.batch_size * self.world)
        sampler = ResumableSampler(dataset, num_replicas=self.world, rank=self.rank, seed=self.args.seed)
        return make_loader(dataset, sampler, self.args, self.loader_generator, collate_fn)

    def next_batch(self, batches: Iterator[Any]) -> Any:
        if not self.dispatch_batches:
            return next(batches)
        chunks: list[Any] = [None] * self.world
        if self.rank == 0:
            batch = next(batches)
            parts = [torch.chunk(t, self.world) for t in batch]
            chunks = [tuple(p[r] for p in parts) for r in range(self.world)]
        out: list[Any] = [None]
        dist.scatter_object_list(out, chunks if self.rank == 0 else None, src=0)
        return out[0]


def agree(flags: list[bool], group: Any = None) -> list[bool]:
    """OR over every rank of `group` (one all-reduce of a few bytes)."""
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]
