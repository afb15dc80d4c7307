"""The sharing patterns, in one place: what each one means for saving and for loading.

Every rule below is a pure function of (component, pattern, topology); every rank derives the
same answers without talking to the others.

=============  ===============================  ==========================  ======================
pattern        who writes (``writer_rank``)     the copy (``copy_name``)    who loads it
=============  ===============================  ==========================  ======================
GLOBAL         rank 0                           ``global``                  every rank
PER_RANK       every rank, its own              ``rank<r>``                 the same rank
REPLICATED     each tensor by one rank,         ``replicated``              every rank
               balanced over ranks and nodes
               (``replica_owners``)
PER_GROUP      one member, chosen by the        ``group<lowest rank>``      every member
               component key                    (``group_copy_name``)
PER_NODE       each node's writer               ``node<n>``                 every rank of node n
SHARDED        each chunk by one of the ranks   ``sharded`` (chunks of      every rank: the boxes
               holding it (``chunk_writer``)    global tensors)             its live state covers
=============  ===============================  ==========================  ======================

GLOBAL and REPLICATED copies are the same for every rank of a node, so a load reads them once
per node (``NODE_SHARED``). Every rank still calls every component's ``state_dict()``, whatever it
writes, so a state_dict that runs collectives is entered by all ranks alike. Replicas of a
REPLICATED component are digested on every rank (``stages_every_replica``) and compared by the
coordinator; see `save.replicas`.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterable

from .dist.topology import Topology
from .errors import InvalidArgumentError
from .types import KEY_RE, SharingPattern, StateComponent, ValidationLevel

NODE_SHARED = ("global", "replicated")   # copies every rank of a node reads alike
# patterns whose ranks may hold replicas (validated, QUICK by default)
REPLICA_PATTERNS = (SharingPattern.REPLICATED, SharingPattern.PER_GROUP, SharingPattern.SHARDED)
# levels each replica pattern can check (SHARDED compares chunk digests; FULL's element-wise
# report against the written copy exists for whole copies only)
CHECKABLE = {SharingPattern.SHARDED: (ValidationLevel.NONE, ValidationLevel.QUICK, ValidationLevel.TENSOR)}


# -- the registered components --------------------------------------------------------------------
def validate_components(components: Iterable[Any]) -> list[StateComponent]:
    """The components as a list, or InvalidArgumentError naming the first one that is wrong."""
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
        if c.validation_level is not None and not isinstance(c.validation_level, ValidationLevel):
            raise InvalidArgumentError(f"component {c.key!r}: validation_level must be a ValidationLevel or None")
        if (isinstance(c.sharing_pattern, SharingPattern) and c.sharing_pattern not in REPLICA_PATTERNS
                and c.validation_level not in (None, ValidationLevel.NONE)):
            raise InvalidArgumentError(
                f"component {c.key!r} is {c.sharing_pattern.name}, which keeps no replicas to compare, "
                f"so validation_level={c.validation_level.name} can never be checked; replicas exist "
                "for REPLICATED and PER_GROUP (leave validation_level unset here)")
        check_level(c, c.sharing_pattern if isinstance(c.sharing_pattern, SharingPattern) else None)
        if c.sharing_pattern is SharingPattern.PER_GROUP and c.process_group is None:
            raise InvalidArgumentError(f"component {c.key!r} is PER_GROUP and needs a process_group "
                                       "(the ranks that share one copy)")
    return comps


def check_level(c: StateComponent, pattern: SharingPattern | None) -> None:
    """Refuse a validation level the pattern cannot check (never accept and ignore one)."""
    levels = CHECKABLE.get(pattern) if pattern is not None else None
    if levels is not None and c.validation_level is not None and c.validation_level not in levels:
        raise InvalidArgumentError(
            f"component {c.key!r} is {pattern.name if pattern else None}, whose replicas are compared "
            f"chunk by chunk: validation_level={c.validation_level.name} cannot be checked there; use "
            f"one of {[v.name for v in levels]}")


def resolve_pattern(c: StateComponent) -> SharingPattern:
    """The component's pattern for this save (a callable is asked every time)."""
    pattern = c.sharing_pattern() if callable(c.sharing_pattern) else c.sharing_pattern
    if not isinstance(pattern, SharingPattern):
        raise InvalidArgumentError(f"component {c.key!r}: its sharing_pattern callable returned {pattern!r}")
    if callable(c.sharing_pattern):
        check_level(c, pattern)
    return pattern


def group_members(c: StateComponent, pattern: SharingPattern, topo: Topology) -> tuple[int, ...] | None:
    """PER_GROUP: the sorted global ranks of the component's process_group; SHARDED: those of its
    optional replica group (the data-parallel ranks holding the same DTensor state on other
    meshes); None otherwise."""
    if pattern is SharingPattern.SHARDED and c.process_group is None:
        return None
    if pattern not in (SharingPattern.PER_GROUP, SharingPattern.SHARDED):
        return None
    if c.process_group is None:
        raise InvalidArgumentError(f"component {c.key!r} resolved to PER_GROUP but has no "
                                   "process_group; pass the group whose ranks share one copy")
    if topo.world_size == 1:
        return (0,)
    import torch.distributed as dist
    group = c.process_group
    if _is_mesh(group):
        if group.ndim != 1:
            raise InvalidArgumentError(f"component {c.key!r}: its process_group is a {group.ndim}-D "
                                       "DeviceMesh; pass a 1-D one (e.g. mesh['dp'])")
        group = group.get_group()
    members = tuple(sorted(dist.get_process_group_ranks(group)))
    if topo.rank not in members:
        raise InvalidArgumentError(f"component {c.key!r}: rank {topo.rank} is not a member "
                                   f"of its process_group {list(members)}")
    return members


def _is_mesh(group: Any) -> bool:
    return type(group).__name__ == "DeviceMesh"


def group_label(c: StateComponent, pattern: SharingPattern) -> str | None:
    """PER_GROUP: a stable identity for the component's group when its process_group is a 1-D
    slice of a named DeviceMesh (``mesh["dp"]`` of a ("pp", "dp") mesh): this rank's coordinate on
    the other dimensions ("pp1"). It names the copy, so a data-parallel degree change still finds
    each stage's copy. None for a plain ProcessGroup (copies are named after the lowest rank)."""
    group = c.process_group
    if pattern is not SharingPattern.PER_GROUP or not _is_mesh(group):
        return None
    root = group._get_root_mesh()
    names, own = root.mesh_dim_names, set(group.mesh_dim_names or ())
    coord = root.get_coordinate()
    if root is group or not names or coord is None:
        return None
    label = "-".join(f"{name}{coord[d]}" for d, name in enumerate(names) if name not in own)
    return label or None


# -- saving ---------------------------------------------------------------------------------------
def group_copy_name(members: tuple[int, ...], label: str | None = None) -> str:
    return f"group-{label}" if label else f"group{min(members)}"


def copy_name(pattern: SharingPattern, topo: Topology, members: tuple[int, ...] | None = None,
              label: str | None = None) -> str:
    """The name of the copy of a component that this rank writes and reads back."""
    if pattern is SharingPattern.PER_GROUP:
        return group_copy_name(members or (topo.rank,), label)
    if pattern is SharingPattern.SHARDED:
        return "sharded"
    return {
        SharingPattern.GLOBAL: "global",
        SharingPattern.PER_RANK: f"rank{topo.rank}",
        SharingPattern.REPLICATED: "replicated",
        SharingPattern.PER_NODE: f"node{topo.node}",
    }[pattern]


def writer_rank(pattern: SharingPattern, key: str, topo: Topology,
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


def chunk_writer(ident: str, holders: tuple[int, ...], replicas: tuple[int, ...] | None,
                 rank: int) -> bool:
    """SHARDED: whether `rank` writes the chunk `ident` (its path and offsets).

    `holders`: the ranks of this rank's mesh that hold the chunk alike (sorted; for a plain
    tensor, every rank, or the replica group). `replicas`: the component's replica group (the
    data-parallel ranks holding the same state on meshes of their own), or None. One replica is
    chosen by a hash of the chunk, then one holder on its mesh, so every rank decides alike
    without talking and chunks spread over ranks and nodes."""
    h = zlib.crc32(ident.encode())
    others = tuple(r for r in (replicas or ()) if r != rank)
    if others and not set(others) & set(holders) - {rank}:
        group = sorted(replicas or ())
        if group[h % len(group)] != rank:
            return False
        h //= len(group)
    elif others and set(holders) <= set(replicas or ()):
        holders = tuple(sorted(replicas or ()))        # a plain tensor: its holders are the group
    return holders[h % len(holders)] == rank


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


def validation_level(c: StateComponent, pattern: SharingPattern) -> ValidationLevel:
    """The level a component's replicas are checked at this save: its own, or (None) the
    pattern's default, QUICK where ranks hold replicas. A level on a pattern without replicas
    (possible only through a callable pattern; the constructor refuses it otherwise) checks
    nothing, which the caller is told once."""
    if pattern not in REPLICA_PATTERNS:
        return ValidationLevel.NONE
    return ValidationLevel.QUICK if c.validation_level is None else c.validation_level


def stages_every_replica(pattern: SharingPattern, level: ValidationLevel, topo: Topology,
                         members: tuple[int, ...] | None = None) -> bool:
    """Whether every holder of a replica stages all of the component's tensors (to digest it off
    the training thread), not only the writer: REPLICATED on several ranks, PER_GROUP in a group
    of several, when validated."""
    if level is ValidationLevel.NONE or topo.world_size == 1:
        return False
    if pattern in (SharingPattern.REPLICATED, SharingPattern.SHARDED):
        return True
    return pattern is SharingPattern.PER_GROUP and members is not None and len(members) > 1


# -- loading --------------------------------------------------------------------------------------
def choose_copy(pattern: SharingPattern, copies: dict[str, tuple[int, ...]], saved_topology: dict,
                topo: Topology, members: tuple[int, ...] | None, label: str | None = None
                ) -> tuple[str, str | None]:
    """(copy this rank reads, a topology problem or None). `copies`: the saved copies of the
    component and, for PER_GROUP, the members each was saved for.

    GLOBAL and REPLICATED copies load at any world size. PER_RANK, PER_NODE and PER_GROUP copies
    belong to a rank, node or group of the topology that saved them; loading one under another
    topology is a problem the caller refuses under ``strict=True``.
    """
    saved_world = saved_topology.get("world_size", 1)
    saved_nodes = saved_topology.get("num_nodes", 1)
    if pattern is SharingPattern.GLOBAL:
        return "global", None
    if pattern is SharingPattern.REPLICATED:
        return "replicated", None
    if pattern is SharingPattern.SHARDED:
        return "sharded", None
    if pattern is SharingPattern.PER_RANK:
        problem = None if saved_world == topo.world_size else (
            f"it is PER_RANK and was saved by {saved_world} rank(s), this run has {topo.world_size}")
        return f"rank{topo.rank}", problem
    if pattern is SharingPattern.PER_NODE:
        problem = None if saved_nodes == topo.num_nodes else (
            f"it is PER_NODE and was saved on {saved_nodes} node(s), this run has {topo.num_nodes}")
        return f"node{topo.node}", problem
    if not members:
        return "", ("it is PER_GROUP but the registered component has no process_group; pass the "
                    "group whose ranks share one copy")
    name = group_copy_name(members, label)
    if name not in copies:
        return name, (f"it is PER_GROUP and no copy was saved for this rank's group "
                      f"{list(members)}{f' ({label})' if label else ''}; saved copies: {sorted(copies)}"
                      + ("" if label else "; pass the group as a slice of a named DeviceMesh "
                         "(mesh['dp']) to name copies by mesh coordinate"))
    saved_members = copies[name]
    if saved_members and tuple(saved_members) != tuple(members) and not label:
        return name, (f"it is PER_GROUP and copy {name!r} was saved for ranks "
                      f"{list(saved_members)}, this rank's group is {list(members)}")
    return name, None
