"""Public value types of the API contract (DESIGN.md section 2)."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Callable

KEY_RE = re.compile(r"[A-Za-z0-9_.-]+")   # use with fullmatch


class SharingPattern(enum.Enum):
    """Which ranks write a component and which copy each rank reloads."""

    GLOBAL = "global"
    PER_RANK = "per_rank"
    REPLICATED = "replicated"
    PER_GROUP = "per_group"
    PER_NODE = "per_node"
    # DTensor state (FSDP2, tensor parallel, 2-D meshes): each rank writes its chunks once (one
    # holder of each replicated chunk), any topology reads them back (resharding on load)
    SHARDED = "sharded"


class ValidationLevel(enum.Enum):
    """How hard to check that replicas agree (REPLICATED: every rank's copy; PER_GROUP: every
    member's copy of its group; SHARDED: every holder's copy of each replicated chunk, compared
    chunk by chunk at QUICK and TENSOR, FULL not offered). QUICK: one hash of the whole state per rank; TENSOR: one per
    tensor (names the tensors that differ); FULL: TENSOR, then each odd replica compared element by
    element with the written copy (max |diff|)."""

    NONE = "none"
    QUICK = "quick"
    TENSOR = "tensor"
    FULL = "full"


@dataclass
class StateComponent:
    """One named piece of training state and how it is shared across ranks.

    `stateful` needs `state_dict()` and `load_state_dict(sd)` (nn.Module, Optimizer, RNGState,
    a dataloader, ...). `sharing_pattern` may be a callable, resolved at every save.
    `process_group`: PER_GROUP, the ranks sharing one copy; SHARDED (optional), the replica
    (data-parallel) group whose ranks hold the same DTensor state on meshes of their own, so each
    chunk is written once instead of once per mesh.
    `validation_level` None means the pattern's default: replicas (REPLICATED, PER_GROUP) are
    checked at least at QUICK level (SHARDED: its replicated chunks), other patterns have no
    replicas to check;
    ``ValidationLevel.NONE`` opts out.
    """

    key: str
    stateful: Any
    sharing_pattern: SharingPattern | Callable[[], SharingPattern]
    process_group: Any = None
    required: bool = True
    validation_level: ValidationLevel | None = None
    metadata: dict | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: where it is, what it holds and how long it took."""

    step: int
    url: str
    metrics: dict
    nbytes: int
    stored_nbytes: int
    created: str
    timings: dict = field(default_factory=dict)
