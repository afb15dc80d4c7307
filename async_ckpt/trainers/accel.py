"""AccelTrainer: data parallel on Hugging Face Accelerate (model and optimizer REPLICATED, data
PER_RANK).

The Accelerator prepares the model (DDP in a multi-process launch) and the optimizer; what is
saved is unwrapped (`ModelState`/`OptimizerState` of the inner objects), so the checkpoint loads
with or without Accelerate. Two departures from ``accelerator.prepare(everything)``, both for a
bit-exact resume:

- the data loader is *not* prepared: each rank draws its share through a ``ResumableSampler`` in a
  ``StatefulDataLoader`` (a prepared loader would shard it a second time, and its position needs
  ``use_stateful_dataloader``); batches are moved to ``accelerator.device``;
- the LR scheduler is not prepared either: Accelerate's wrapper steps a scheduler once per process
  per step (``num_processes`` times) unless ``split_batches``; ours steps once per optimizer step.

Launch with ``accelerate launch`` or torchrun (docs/training.md, "Accelerate launch"). Requires
``pip install async_ckpt[accelerate]``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from ..training.sampler import ResumableSampler
from ..types import SharingPattern
from .base import Trainer
from .ddp import agree
from .progress import make_loader


class AccelTrainer(Trainer):
    """REPLICATED model and optimizer, PER_RANK data, on `accelerator` (default: a new
    ``Accelerator()``; on a machine without GPUs pass ``Accelerator(cpu=True)``)."""

    patterns = {"model": SharingPattern.REPLICATED, "optimizer": SharingPattern.REPLICATED,
                "data": SharingPattern.PER_RANK}

    def __init__(self, *args: Any, accelerator: Any = None, **kwargs: Any) -> None:
        from accelerate import Accelerator

        from ..integrations.accelerate import check_launch

        self.accelerator = accelerator if accelerator is not None else Accelerator()
        check_launch(self.accelerator)
        super().__init__(*args, **kwargs)
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.prepare_model(model)

    def make_loader(self, dataset: Any, collate_fn: Callable | None) -> tuple[Any, Any]:
        sampler = ResumableSampler(dataset, num_replicas=self.world, rank=self.rank, seed=self.args.seed)
        return make_loader(dataset, sampler, self.args, self.loader_generator, collate_fn)

    def train_step(self, batch: Any) -> torch.Tensor:
        inputs, target = (t.to(self.accelerator.device) for t in batch)
        loss = self.loss_fn(self.model(inputs), target)
        self.optimizer.zero_grad()
        self.accelerator.backward(loss)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return loss.detach()

    def reduce_loss(self, loss: torch.Tensor) -> float:
        return float(self.accelerator.reduce(loss.detach().clone(), reduction="mean"))

    def agree(self, flags: list[bool]) -> list[bool]:
        return agree(flags) if dist.is_initialized() and self.world > 1 else flags
