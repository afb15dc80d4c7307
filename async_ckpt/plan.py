"""The save plan: a pure function of (state layout, topology, patterns).

Every rank derives the same plan without collectives; it is cached while the layout is unchanged.
A plan fixes where each tensor sits in this rank's staging buffer and which shard it belongs to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .codec import align_up
from .topology import Topology
from .types import SharingPattern


@dataclass(frozen=True)
class TensorSlot:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int          # in the staging buffer


@dataclass(frozen=True)
class ShardPlan:
    component: str
    pattern: SharingPattern
    shard: str           # which copy this is: "global", "rank3", "node1", "group0", "replicated"
    slots: tuple[TensorSlot, ...]


@dataclass(frozen=True)
class RankPlan:
    shards: tuple[ShardPlan, ...]
    buffer_nbytes: int


def shard_id(pattern: SharingPattern, topo: Topology, group_index: int = 0) -> str:
    """The name of the copy of a component that this rank writes and reads back."""
    return {
        SharingPattern.GLOBAL: "global",
        SharingPattern.PER_RANK: f"rank{topo.rank}",
        SharingPattern.REPLICATED: "replicated",
        SharingPattern.PER_GROUP: f"group{group_index}",
        SharingPattern.PER_NODE: f"node{topo.node}",
    }[pattern]


LayoutKey = tuple  # ((component, pattern, ((dtype, shape), ...)), ...)


def layout_key(components: list[tuple[str, SharingPattern, list[torch.Tensor]]]) -> LayoutKey:
    return tuple((key, pattern, tuple((t.dtype, tuple(t.shape)) for t in tensors))
                 for key, pattern, tensors in components)


class Planner:
    """Caches the last plan; a new layout (shapes, dtypes, patterns) makes a new one."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self._cache: tuple[LayoutKey, RankPlan] | None = None

    def plan(self, key: LayoutKey) -> RankPlan:
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        offset = 0
        shards = []
        for component, pattern, metas in key:
            slots = []
            for dtype, shape in metas:
                numel = 1
                for dim in shape:
                    numel *= dim
                nbytes = numel * torch.empty((), dtype=dtype).element_size()
                slots.append(TensorSlot(dtype, shape, nbytes, offset))
                offset = align_up(offset + nbytes)
            shards.append(ShardPlan(component, pattern, shard_id(pattern, self.topo), tuple(slots)))
        plan = RankPlan(tuple(shards), offset)
        self._cache = (key, plan)
        return plan
