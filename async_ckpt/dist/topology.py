"""Where this process sits: rank, world, node. Read from torch.distributed and torchrun's env.

Nodes are told apart by torchrun's ``GROUP_RANK`` (falling back to ``rank // LOCAL_WORLD_SIZE``),
so two torchrun launchers with ``--nnodes=2`` on one machine are two nodes. Ranks of a node are
assumed contiguous (``node * local_world_size + local_rank``), which is how torchrun numbers them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InvalidArgumentError


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

    @property
    def is_node_writer(self) -> bool:
        """The process that hosts this node's writer thread."""
        return self.local_rank == 0

    def node_of(self, rank: int) -> int:
        return rank // self.local_world_size

    def node_writer_of(self, node: int) -> int:
        return node * self.local_world_size

    def node_ranks(self, node: int | None = None) -> range:
        node = self.node if node is None else node
        return range(node * self.local_world_size, (node + 1) * self.local_world_size)

    def as_json(self) -> dict:
        return {"world_size": self.world_size, "local_world_size": self.local_world_size,
                "num_nodes": self.num_nodes}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise InvalidArgumentError(f"environment variable {name}={value!r} is not an integer; "
                                   "unset it or launch with torchrun") from None


def current_topology() -> Topology:
    """The topology of the default process group, or a world of one without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Topology()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    local_rank = _env_int("LOCAL_RANK", rank % local_world)
    node = _env_int("GROUP_RANK", rank // local_world)
    if local_world < 1 or world % local_world or not 0 <= local_rank < local_world:
        raise InvalidArgumentError(
            f"inconsistent topology: world size {world}, LOCAL_WORLD_SIZE={local_world}, "
            f"LOCAL_RANK={local_rank}; every node must run the same number of ranks (use torchrun)")
    if rank != node * local_world + local_rank:
        raise InvalidArgumentError(
            f"rank {rank} is not node {node} x {local_world} + local rank {local_rank}; async_ckpt "
            "needs torchrun's contiguous rank numbering per node (GROUP_RANK, LOCAL_RANK)")
    return Topology(rank, world, local_rank, local_world, node)
