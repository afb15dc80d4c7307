"""Registered StateComponents: checking them, and resolving what each one is at a save."""
from __future__ import annotations

from .errors import InvalidArgumentError
from .dist.topology import Topology
from .types import KEY_RE, SharingPattern, StateComponent, ValidationLevel


def validate_components(components) -> list[StateComponent]:
    comps = list(components)
    seen: set[str] = set()
    for c in comps:
        if not isinstance(c, StateComponent):
            raise InvalidArgumentError(f"components must be StateComponent objects, got {type(c).__name__}")
        if not isinstance(c.key, str) or not KEY_RE.fullmatch(c.key):
            raise InvalidArgumentError(f"component key {c.key!r} must match [A-Za-z0-9_.-]+")
        if c.key in seen:
            raise InvalidArgumentError(f"duplicate component key {c.key!r}; keys must be unique")
        seen.add(c.key)
        if not (hasattr(c.stateful, "state_dict") and hasattr(c.stateful, "load_state_dict")):
            raise InvalidArgumentError(f"component {c.key!r}: {type(c.stateful).__name__} lacks "
                                       "state_dict()/load_state_dict()")
        if not (isinstance(c.sharing_pattern, SharingPattern) or callable(c.sharing_pattern)):
            raise InvalidArgumentError(f"component {c.key!r}: sharing_pattern must be a SharingPattern or a callable")
        if not isinstance(c.validation_level, ValidationLevel):
            raise InvalidArgumentError(f"component {c.key!r}: validation_level must be a ValidationLevel")
        if c.sharing_pattern is SharingPattern.PER_GROUP and c.process_group is None:
            raise InvalidArgumentError(f"component {c.key!r} is PER_GROUP and needs a process_group "
                                       "(the ranks that share one copy)")
    return comps


def resolve_pattern(c: StateComponent) -> SharingPattern:
    """The component's pattern for this save (a callable is asked every time)."""
    pattern = c.sharing_pattern() if callable(c.sharing_pattern) else c.sharing_pattern
    if not isinstance(pattern, SharingPattern):
        raise InvalidArgumentError(f"component {c.key!r}: its sharing_pattern callable returned {pattern!r}")
    return pattern


def group_members(c: StateComponent, pattern: SharingPattern, topo: Topology) -> tuple[int, ...] | None:
    """PER_GROUP: the sorted global ranks of the component's process_group."""
    if pattern is not SharingPattern.PER_GROUP:
        return None
    if c.process_group is None:
        raise InvalidArgumentError(f"component {c.key!r} resolved to PER_GROUP but has no "
                                   "process_group; pass the group whose ranks share one copy")
    if topo.world_size == 1:
        return (0,)
    import torch.distributed as dist
    members = tuple(sorted(dist.get_process_group_ranks(c.process_group)))
    if topo.rank not in members:
        raise InvalidArgumentError(f"component {c.key!r}: rank {topo.rank} is not a member "
                                   f"of its process_group {list(members)}")
    return members
