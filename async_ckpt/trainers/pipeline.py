"""PipelineTrainer (torch.distributed.pipelining) and HybridPipelineTrainer (DP x PP).

The model is an ``nn.Sequential`` built identically on every rank; each pipeline stage keeps its
contiguous run of layers and replaces the others with ``nn.Identity``, so parameter names stay
those of the whole model (``4.weight`` on the stage that owns layer 4) and a checkpoint says which
layer every tensor belongs to. A GPipe schedule with ``n_microbatches`` runs each step.

- PipelineTrainer (``dp=1``, world = stages): model and optimizer PER_RANK (each stage its own),
  data GLOBAL (every stage walks the same loader in lock step: stage 0 needs the inputs, the last
  stage the targets; rank 0's position is saved once).
- HybridPipelineTrainer (``dp > 1``, world = dp x stages, rank = replica * stages + stage): model
  and optimizer PER_GROUP over the stage's data-parallel group (the replicas of one stage, checked
  for agreement by default), data PER_GROUP over each pipeline (its stages share one position;
  each pipeline draws its own shard). Gradients are averaged over the data-parallel group.

The loss every rank reports is the last stages' loss averaged over the pipelines (one all-reduce).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import InvalidArgumentError
from ..training.sampler import ResumableSampler
from ..types import SharingPattern
from .base import Trainer
from .ddp import agree
from .progress import make_loader


class PipelineTrainer(Trainer):
    """Pipeline parallel over every rank; ``dp > 1`` is HybridPipelineTrainer."""

    patterns = {"model": SharingPattern.PER_RANK, "optimizer": SharingPattern.PER_RANK,
                "data": SharingPattern.GLOBAL}

    def __init__(self, *args: Any, n_microbatches: int = 2, dp: int = 1, **kwargs: Any) -> None:
        world = dist.get_world_size()
        if world % dp:
            raise InvalidArgumentError(f"{type(self).__name__}: world size {world} is not a multiple of dp={dp}")
        if kwargs.get("grad_scaler") is not None:
            raise InvalidArgumentError(f"{type(self).__name__}: grad_scaler is not supported with pipelining")
        self.dp, self.stages, self.n_microbatches = dp, world // dp, n_microbatches
        rank = dist.get_rank()
        self.replica, self.stage_index = divmod(rank, self.stages)
        # every rank creates every group, in the same order (torch.distributed requires it)
        self.pipe_group = self.dp_group = None
        for d in range(dp):
            g = dist.new_group(list(range(d * self.stages, (d + 1) * self.stages)))
            if d == self.replica:
                self.pipe_group = g
        for s in range(self.stages):
            g = dist.new_group(list(range(s, world, self.stages)))
            if s == self.stage_index:
                self.dp_group = g
        super().__init__(*args, **kwargs)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        if not isinstance(model, torch.nn.Sequential):
            raise InvalidArgumentError(f"{type(self).__name__} splits an nn.Sequential into stages; got "
                                       f"{type(model).__name__} (split it yourself and override prepare_model)")
        n = len(model)
        if n < self.stages:
            raise InvalidArgumentError(f"{type(self).__name__}: {n} layers cannot make {self.stages} stages")
        lo, hi = n * self.stage_index // self.stages, n * (self.stage_index + 1) // self.stages
        for i in range(n):
            if not lo <= i < hi:
                model[i] = torch.nn.Identity()
        self.stage = PipelineStage(model, self.stage_index, self.stages, torch.device("cpu"), group=self.pipe_group)
        self.pipe_schedule = ScheduleGPipe(self.stage, self.n_microbatches, loss_fn=self.loss_fn)
        return model

    def make_loader(self, dataset: Any, collate_fn: Callable | None) -> tuple[Any, Any]:
        sampler = ResumableSampler(dataset, num_replicas=self.dp, rank=self.replica, seed=self.args.seed)
        self.loader_generator = torch.Generator().manual_seed(self.args.seed + 7919 * self.replica)
        return make_loader(dataset, sampler, self.args, self.loader_generator, collate_fn)

    def train_step(self, batch: Any) -> torch.Tensor:
        inputs, target = batch
        first, last = self.stage_index == 0, self.stage_index == self.stages - 1
        losses: list[torch.Tensor] = []
        self.optimizer.zero_grad()
        if first and last:
            self.pipe_schedule.step(inputs, target=target, losses=losses)
        elif first:
            self.pipe_schedule.step(inputs)
        elif last:
            self.pipe_schedule.step(target=target, losses=losses)
        else:
            self.pipe_schedule.step()
        if self.dp > 1:
            for p in self.module.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.dp_group)
                    p.grad.div_(self.dp)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return torch.stack(losses).mean().detach() if losses else torch.zeros(())

    def reduce_loss(self, loss: torch.Tensor) -> float:
        total = loss.detach().clone().float()
        dist.all_reduce(total)          # only last stages contribute
        return float(total) / self.dp

    def agree(self, flags: list[bool]) -> list[bool]:
        return agree(flags)

    def evaluate(self) -> dict[str, float]:
        raise InvalidArgumentError(f"{type(self).__name__} does not evaluate (an eval_fn needs the whole "
                                   "model); evaluate from a checkpoint in a separate job")


class HybridPipelineTrainer(PipelineTrainer):
    """DP x PP: ``dp`` pipelines of world/dp stages; everything PER_GROUP (see the module)."""

    patterns = {"model": SharingPattern.PER_GROUP, "optimizer": SharingPattern.PER_GROUP,
                "data": SharingPattern.PER_GROUP}

    def __init__(self, *args: Any, dp: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, dp=dp, **kwargs)

    def component_groups(self) -> dict[str, Any]:
        return {"model": self.dp_group, "optimizer": self.dp_group, "data": self.pipe_group}
