"""A save as it travels inside one process: from the training thread to the rank worker and, in
a node writer's process, to the node writer and the coordinator."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from ..dist.messages import ChunkInfo, JobDescriptor, ShardDescriptor, Slot
from ..format.tree import dtype_name
from ..handle import Settlement
from .plan import RankPlan
from .staging import HostBuffer


@dataclass(frozen=True)
class ComponentSpec:
    """What a registered component resolved to at one save (its pattern is in the plan)."""
    key: str
    required: bool
    validation_level: str
    metadata: dict | None
    members: tuple[int, ...] | None = None   # PER_GROUP: ranks of the component's group


@dataclass(eq=False)
class SaveJob:
    """One rank's staged save. Created by the training thread in ``save()``; the threads that
    handle it record timings in it and signal through its events:

    - ``written``: the node writer is done with the staged buffers (set on node writers only);
    - ``published``: the coordinator has published the outcome (set on the coordinator only);
      the coordinator's own rank worker waits on it instead of polling the Store;
    - ``retained``: the post-commit work (sweep, retention) has run (coordinator only).

    ``local_errors`` keeps exceptions raised in this process for this save, by rank, so that the
    SaveFailedError raised here carries the exception objects (peers only see their messages).
    """
    step: int
    seq: int                          # the save's number, the same on every rank
    plan: RankPlan
    buffer: HostBuffer
    trees: list[Any]                  # one skeleton per shard of the plan
    components: list[ComponentSpec]   # one per shard of the plan
    metrics: dict[str, float]
    settlement: Settlement
    started: float
    replicated_shapes: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    written: threading.Event = field(default_factory=threading.Event)
    published: threading.Event = field(default_factory=threading.Event)
    retained: threading.Event = field(default_factory=threading.Event)
    local_errors: dict[int, BaseException] = field(default_factory=dict)

    def descriptor(self, rank: int) -> JobDescriptor:
        """What a node writer needs to write this rank's staged buffer."""
        shards = []
        for shard, tree, comp in zip(self.plan.shards, self.trees, self.components, strict=True):
            shards.append(ShardDescriptor(
                component=comp.key, pattern=shard.pattern.value, shard=shard.shard,
                num_tensors=shard.num_tensors, tree_source=shard.tree_source,
                tree=tree if shard.tree_source else None, required=comp.required,
                validation=comp.validation_level, metadata=comp.metadata,
                members=tuple(comp.members or ()), chunked=shard.chunked,
                slots=tuple(Slot(s.index, dtype_name(s.dtype), s.shape, s.nbytes, s.offset,
                                 None if s.chunk is None else ChunkInfo(
                                     s.chunk.path, s.chunk.global_shape, s.chunk.offsets, s.chunk.layout))
                            for s in shard.slots if s.write)))
        return JobDescriptor(rank, self.step, self.buffer.name, self.buffer.capacity, tuple(shards))
