"""The save plan: a pure function of (state layout, topology, patterns).

Every rank derives the same plan without collectives; it is cached while the layout is unchanged.
A plan fixes which tensors this rank stages, which of those it writes, where each sits in this
rank's staging buffer, and which copy (shard) of its component it belongs to.

Who writes what is `sharing`'s to say (its table); the plan applies it to this rank's tensors.
With validation, every replica of a REPLICATED component (and every member's copy of a PER_GROUP
one) stages all its tensors (they are hashed off the training thread) but still writes only its
own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dist.topology import Topology
from .chunking import ChunkMeta
from ..format.codec import align_up
from ..sharing import copy_name, replica_owners, writer_rank
from ..types import SharingPattern


@dataclass(frozen=True)
class TensorSlot:
    index: int           # position in the component's tensor list
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int          # in the staging buffer
    write: bool          # this rank writes it (else staged only to be validated)
    chunk: ChunkMeta | None = None   # SHARDED: which box of which global tensor it is


@dataclass(frozen=True)
class ShardPlan:
    component: str
    pattern: SharingPattern
    shard: str           # which copy this is: "global", "rank3", "node1", "group0", "replicated"
    slots: tuple[TensorSlot, ...]
    num_tensors: int     # in the whole component (REPLICATED: over all ranks)
    tree_source: bool    # this rank's skeleton goes into the manifest
    chunked: bool = False   # written as chunks of global tensors (SHARDED; split REPLICATED)


@dataclass(frozen=True)
class RankPlan:
    shards: tuple[ShardPlan, ...]
    buffer_nbytes: int


# ((component, pattern, members, stage_all, ((dtype, shape), ...), chunks, label), ...): what a
# plan depends on (chunks: SHARDED components' ChunkMeta per tensor, else None; label: a
# PER_GROUP group's mesh coordinate, sharing.group_label)
StateLayout = tuple


def state_layout(components: list[tuple]) -> StateLayout:
    """The cache key of a plan: per component its pattern, group, staging rule and tensor metas."""
    # (chunks and label may be left out: a component with neither)
    full = [(*entry, None, None)[:7] for entry in components]
    return tuple((key, pattern, members, validate, tuple((t.dtype, tuple(t.shape)) for t in tensors),
                  chunks, label) for key, pattern, members, validate, tensors, chunks, label in full)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * torch.empty((), dtype=dtype).element_size()


class Planner:
    """Caches the last plan; a new layout (shapes, dtypes, patterns, groups) makes a new one."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self._cache: tuple[StateLayout, RankPlan] | None = None

    def plan(self, key: StateLayout) -> RankPlan:
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        topo, offset, shards = self.topo, 0, []
        for component, pattern, members, validate, metas, chunks, label in key:
            sizes = [_nbytes(dtype, shape) for dtype, shape in metas]
            if chunks is not None:
                # SHARDED: every rank's chunks and skeleton go into the manifest; replicated
                # chunks are written by one holder and staged by the others only to be digested
                # (a split REPLICATED component: the same, with rank 0's skeleton)
                writes = [c.write for c in chunks]
                staged = [c.write or (validate and c.replicated) for c in chunks]
                tree_source = pattern is SharingPattern.SHARDED or topo.rank == 0
            elif pattern is SharingPattern.REPLICATED:
                owners = replica_owners(sizes, topo)
                writes = [o == topo.rank for o in owners]
                staged = [w or validate for w in writes]
                tree_source = topo.rank == 0
            else:
                mine = writer_rank(pattern, component, topo, members) == topo.rank
                writes = [mine] * len(metas)
                staged = [mine or validate] * len(metas)     # validated PER_GROUP: every member
                tree_source = mine
            slots = []
            for index, ((dtype, shape), nbytes) in enumerate(zip(metas, sizes, strict=True)):
                if staged[index]:
                    slots.append(TensorSlot(index, dtype, shape, nbytes, offset, writes[index],
                                            chunks[index] if chunks else None))
                    offset = align_up(offset + nbytes)
            shards.append(ShardPlan(component, pattern, copy_name(pattern, topo, members, label),
                                    tuple(slots), len(metas), tree_source, chunks is not None))
        plan = RankPlan(tuple(shards), offset)
        self._cache = (key, plan)
        return plan
