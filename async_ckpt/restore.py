"""Which stored copy of a component this rank loads, and whether the topology allows it.

GLOBAL and REPLICATED copies load at any world size. PER_RANK, PER_NODE and PER_GROUP copies
belong to a rank, node or group of the topology that saved them; loading them under a different
topology is refused under ``strict=True`` (the state would silently belong to someone else).
"""
from __future__ import annotations

from .manifest import ComponentEntry
from .plan import group_shard
from .topology import Topology
from .types import SharingPattern


def choose_shard(entry: ComponentEntry, saved_topology: dict, topo: Topology,
                 members: tuple[int, ...] | None) -> tuple[str, str | None]:
    """(shard id this rank reads, a topology problem or None)."""
    pattern = SharingPattern(entry.sharing_pattern)
    saved_world = saved_topology.get("world_size", 1)
    saved_nodes = saved_topology.get("num_nodes", 1)
    if pattern is SharingPattern.GLOBAL:
        return "global", None
    if pattern is SharingPattern.REPLICATED:
        return "replicated", None
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
    shard = group_shard(members)
    saved = entry.shards.get(shard)
    if saved is not None and saved.members and tuple(saved.members) != tuple(members):
        return shard, (f"it is PER_GROUP and copy {shard!r} was saved for ranks "
                       f"{list(saved.members)}, this rank's group is {list(members)}")
    if saved is None:
        return shard, (f"it is PER_GROUP and no copy was saved for this rank's group "
                       f"{list(members)}; saved copies: {sorted(entry.shards)}")
    return shard, None
