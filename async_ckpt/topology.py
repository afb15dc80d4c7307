"""Where this process sits: rank, world, node. Read from torch.distributed and torchrun's env."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node: int = 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def as_json(self) -> dict:
        return {"world_size": self.world_size, "local_world_size": self.local_world_size,
                "num_nodes": self.num_nodes}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def current_topology() -> Topology:
    """The topology of the default process group, or a world of one without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Topology()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    local_rank = _env_int("LOCAL_RANK", rank % local_world)
    node = _env_int("GROUP_RANK", rank // local_world)
    return Topology(rank, world, local_rank, local_world, node)
