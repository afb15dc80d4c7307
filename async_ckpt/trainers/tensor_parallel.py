"""TPTrainer: data parallel x tensor parallel on a ``(dp, tp)`` device mesh.

Rank r sits at ``(r // tp, r % tp)``: each row of the mesh (``mesh["tp"]``, tp ranks) is one model
replica whose layers are split by ``parallelize_module`` with the user's plan (default: the
``nn.Linear`` children of an ``nn.Sequential`` paired as column-wise then row-wise, the Megatron
MLP); each column (``mesh["dp"]``) holds the replicas of one shard, whose gradients are averaged
over it after every backward.

Patterns: model, optimizer (and LR scheduler, GLOBAL-like state on every rank) SHARDED with
``process_group=mesh["dp"]``: each DTensor chunk is written once, by one dp replica, and compared
with the other replicas' at every save (QUICK by default). Not the seed's PER_GROUP: TP state is
DTensors, which SHARDED stores by global coordinates, so a checkpoint reloads at another DP or TP
degree. The data position is PER_GROUP over ``mesh["tp"]``: the ranks of one replica draw the same
batches (tensor parallelism needs identical inputs), so one copy per replica, named by its dp
coordinate. RNG PER_RANK; progress, schedule, divergence GLOBAL.

Call sequence: as every trainer (`base.Trainer`), under torchrun with a process group initialised
before the trainer is built; every rank calls ``train()``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from ..errors import InvalidArgumentError
from ..training.sampler import ResumableSampler
from ..types import SharingPattern
from .base import Trainer
from .ddp import agree
from .progress import make_loader


def default_plan(model: torch.nn.Module) -> dict[str, Any]:
    """Column-wise then row-wise over the ``nn.Linear`` children of an ``nn.Sequential``, in pairs."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    linears = [name for name, child in model.named_children() if isinstance(child, torch.nn.Linear)]
    if not isinstance(model, torch.nn.Sequential) or not linears or len(linears) % 2:
        raise InvalidArgumentError(f"TPTrainer: the default plan pairs the Linear layers of an nn.Sequential "
                                   f"(column-wise, row-wise); got {type(model).__name__} with {len(linears)} "
                                   "Linear children: pass tp_plan={name: ParallelStyle}")
    return {name: (ColwiseParallel() if i % 2 == 0 else RowwiseParallel()) for i, name in enumerate(linears)}


class TPTrainer(Trainer):
    """DP x TP: SHARDED model and optimizer over ``mesh["dp"]``; data PER_GROUP over ``mesh["tp"]``."""

    patterns = {"model": SharingPattern.SHARDED, "optimizer": SharingPattern.SHARDED,
                "data": SharingPattern.PER_GROUP}

    def __init__(self, *args: Any, tp: int = 2, tp_plan: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if tp < 1 or world % tp:
            raise InvalidArgumentError(f"TPTrainer: world size {world} is not a multiple of tp={tp}")
        if kwargs.get("grad_scaler") is not None:
            raise InvalidArgumentError("TPTrainer: grad_scaler is not supported")
        self.tp, self.dp, self.tp_plan = tp, world // tp, tp_plan
        self.mesh = init_device_mesh("cpu", (self.dp, tp), mesh_dim_names=("dp", "tp"))
        self.replica = dist.get_rank() // tp
        self.dp_group = self.mesh["dp"].get_group()
        super().__init__(*args, **kwargs)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.tensor.parallel import parallelize_module

        plan = dict(self.tp_plan) if self.tp_plan is not None else default_plan(model)
        return parallelize_module(model, self.mesh["tp"], plan)

    def make_loader(self, dataset: Any, collate_fn: Callable | None) -> tuple[Any, Any]:
        sampler = ResumableSampler(dataset, num_replicas=self.dp, rank=self.replica, seed=self.args.seed)
        self.loader_generator = torch.Generator().manual_seed(self.args.seed + 7919 * self.replica)
        return make_loader(dataset, sampler, self.args, self.loader_generator, collate_fn)

    def component_groups(self) -> dict[str, Any]:
        dp_group = self.dp_group if self.dp > 1 else None
        return {"model": dp_group, "optimizer": dp_group, "data": self.mesh["tp"]}

    def train_step(self, batch: Any) -> torch.Tensor:
        inputs, target = batch
        loss = self.loss_fn(self.model(inputs), target)
        self.optimizer.zero_grad()
        loss.backward()
        if self.dp > 1:                     # average each shard's gradient over its replicas
            for p in self.module.parameters():
                if p.grad is not None:
                    g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    dist.all_reduce(g, group=self.dp_group)
                    g.div_(self.dp)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return loss.detach()

    def reduce_loss(self, loss: torch.Tensor) -> float:
        total = loss.detach().clone()
        dist.all_reduce(total)              # every tp rank of a replica holds the same loss
        return float(total) / dist.get_world_size()

    def agree(self, flags: list[bool]) -> list[bool]:
        return agree(flags)

    def _validation(self, pattern: SharingPattern) -> Any:
        return self.args.validation if pattern is SharingPattern.SHARDED else super()._validation(pattern)
