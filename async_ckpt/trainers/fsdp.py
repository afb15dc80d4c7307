"""FSDP2Trainer: fully sharded data parallel (``torch.distributed.fsdp.fully_shard``) over every
rank, on a 1-D device mesh.

Every child of the model that holds parameters is wrapped with ``fully_shard``, then the root, so
each parameter and each optimizer moment is a DTensor sharded over the ranks. Model and optimizer
are saved through ``ModelState``/``OptimizerState`` as SHARDED: each rank writes its own shards
once, and a checkpoint reloads at another world size (resharded). The data is PER_RANK (each rank
loads its share through ``ResumableSampler(rank=r, num_replicas=world)``, as ``DDPTrainer``); RNG
PER_RANK; progress, schedule and divergence GLOBAL. FSDP2 averages the gradients itself
(reduce-scatter); the loss every rank reports is averaged over the ranks (one all-reduce).

Call sequence: as every trainer (`base.Trainer`), under torchrun with a process group initialised
before the trainer is built; every rank calls ``train()``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import InvalidArgumentError
from ..training.sampler import ResumableSampler
from ..types import SharingPattern
from .base import Trainer
from .ddp import AllRanks
from .progress import make_loader


class FSDP2Trainer(AllRanks, Trainer):
    """SHARDED model and optimizer (FSDP2 over every rank); data PER_RANK."""

    patterns = {"model": SharingPattern.SHARDED, "optimizer": SharingPattern.SHARDED,
                "data": SharingPattern.PER_RANK}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("grad_scaler") is not None:
            raise InvalidArgumentError("FSDP2Trainer: grad_scaler is not supported (use bf16 mixed precision "
                                       "through fully_shard's MixedPrecisionPolicy instead)")
        super().__init__(*args, **kwargs)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """fully_shard each child with parameters, then the root (in place: `self.module` is the
        sharded model, which is what ModelState saves)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.mesh = init_device_mesh("cpu", (self.world,))
        for child in model.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        return model

    def make_loader(self, dataset: Any, collate_fn: Callable | None) -> tuple[Any, Any]:
        sampler = ResumableSampler(dataset, num_replicas=self.world, rank=self.rank, seed=self.args.seed)
        return make_loader(dataset, sampler, self.args, self.loader_generator, collate_fn)

