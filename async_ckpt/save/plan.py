"""The save plan: a pure function of (state layout, topology, patterns).

Every rank derives the same plan without collectives; it is cached while the layout is unchanged.
A plan fixes which tensors this rank stages, which of those it writes, where each sits in this
rank's staging buffer, and which copy (shard) of its component it belongs to.

Who writes what (every rank still calls every component's ``state_dict()``, so a state_dict that
runs collectives is entered by all ranks alike):
- GLOBAL: rank 0. PER_RANK: every rank its own. PER_NODE: each node writer (local rank 0).
- PER_GROUP: one member of the group, chosen by the component key so components spread out.
- REPLICATED: every tensor by one rank, balanced by bytes over ranks interleaved across nodes,
  so no rank or node carries it all. With validation, every replica stages all tensors (they are
  hashed off the training thread) but still writes only its own.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..format.codec import align_up
from ..dist.topology import Topology
from ..types import SharingPattern


@dataclass(frozen=True)
class TensorSlot:
    index: int           # position in the component's tensor list
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int          # in the staging buffer
    write: bool          # this rank writes it (else staged only to be validated)


@dataclass(frozen=True)
class ShardPlan:
    component: str
    pattern: SharingPattern
    shard: str           # which copy this is: "global", "rank3", "node1", "group0", "replicated"
    slots: tuple[TensorSlot, ...]
    num_tensors: int     # in the whole component (REPLICATED: over all ranks)
    tree_source: bool    # this rank's skeleton goes into the manifest


@dataclass(frozen=True)
class RankPlan:
    shards: tuple[ShardPlan, ...]
    buffer_nbytes: int


def group_shard(members: tuple[int, ...]) -> str:
    return f"group{min(members)}"


def shard_id(pattern: SharingPattern, topo: Topology, members: tuple[int, ...] | None = None) -> str:
    """The name of the copy of a component that this rank writes and reads back."""
    if pattern is SharingPattern.PER_GROUP:
        return group_shard(members or (topo.rank,))
    return {
        SharingPattern.GLOBAL: "global",
        SharingPattern.PER_RANK: f"rank{topo.rank}",
        SharingPattern.REPLICATED: "replicated",
        SharingPattern.PER_NODE: f"node{topo.node}",
    }[pattern]


def shard_writer(pattern: SharingPattern, key: str, topo: Topology,
                 members: tuple[int, ...] | None = None) -> int | None:
    """The rank that writes this rank's copy of a component (None: REPLICATED, split by tensor)."""
    if pattern is SharingPattern.GLOBAL:
        return 0
    if pattern is SharingPattern.PER_RANK:
        return topo.rank
    if pattern is SharingPattern.PER_NODE:
        return topo.node_writer_of(topo.node)
    if pattern is SharingPattern.PER_GROUP:
        ordered = sorted(members or (topo.rank,))
        return ordered[zlib.crc32(key.encode()) % len(ordered)]
    return None


def replica_owners(sizes: list[int], topo: Topology) -> list[int]:
    """Owner rank of each REPLICATED tensor: largest first onto the least-loaded rank, ties going
    to the rank that comes first when ranks are interleaved across nodes (n0l0, n1l0, n0l1...)."""
    order = [node * topo.local_world_size + local
             for local in range(topo.local_world_size) for node in range(topo.num_nodes)]
    load = {r: 0 for r in order}
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(order, key=lambda r: load[r])
        owners[index] = rank
        load[rank] += max(sizes[index], 1)
    return owners


# ((component, pattern, members, stage_all, ((dtype, shape), ...)), ...)
LayoutKey = tuple


def layout_key(components: list[tuple[str, SharingPattern, tuple | None, bool, list[torch.Tensor]]]
               ) -> LayoutKey:
    return tuple((key, pattern, members, validate, tuple((t.dtype, tuple(t.shape)) for t in tensors))
                 for key, pattern, members, validate, tensors in components)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * torch.empty((), dtype=dtype).element_size()


class Planner:
    """Caches the last plan; a new layout (shapes, dtypes, patterns, groups) makes a new one."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self._cache: tuple[LayoutKey, RankPlan] | None = None

    def plan(self, key: LayoutKey) -> RankPlan:
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        topo, offset, shards = self.topo, 0, []
        for component, pattern, members, validate, metas in key:
            sizes = [_nbytes(dtype, shape) for dtype, shape in metas]
            if pattern is SharingPattern.REPLICATED:
                owners = replica_owners(sizes, topo)
                writes = [o == topo.rank for o in owners]
                staged = [w or validate for w in writes]
                tree_source = topo.rank == 0
            else:
                mine = shard_writer(pattern, component, topo, members) == topo.rank
                writes = staged = [mine] * len(metas)
                tree_source = mine
            slots = []
            for index, ((dtype, shape), nbytes) in enumerate(zip(metas, sizes)):
                if staged[index]:
                    slots.append(TensorSlot(index, dtype, shape, nbytes, offset, writes[index]))
                    offset = align_up(offset + nbytes)
            shards.append(ShardPlan(component, pattern, shard_id(pattern, topo, members),
                                    tuple(slots), len(metas), tree_source))
        plan = RankPlan(tuple(shards), offset)
        self._cache = (key, plan)
        return plan
