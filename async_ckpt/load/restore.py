"""Loading a committed checkpoint into the registered components, and listing checkpoints.

Which stored copy of a component this rank loads, and whether the topology allows it:

GLOBAL and REPLICATED copies load at any world size. PER_RANK, PER_NODE and PER_GROUP copies
belong to a rank, node or group of the topology that saved them; loading them under a different
topology is refused under ``strict=True`` (the state would silently belong to someone else).
"""
from __future__ import annotations

import logging

from ..format import metrics_file
from ..sharing import group_members
from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..format.names import committed_steps, step_dir
from .reader import load_shard, read_manifest
from ..format.manifest import ComponentEntry, Manifest
from .node_shared import read_shared
from ..save.plan import group_shard
from .readbuf import ReadSession
from ..dist.topology import Topology
from ..types import CheckpointInfo, SharingPattern, StateComponent

log = logging.getLogger("async_ckpt")


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


def info_of(storage, manifest: Manifest, folder: str) -> CheckpointInfo:
    metrics = {**metrics_file.decode(manifest.metrics), **metrics_file.read_late(storage, folder)}
    return CheckpointInfo(manifest.step, storage.child_url(folder), metrics, manifest.nbytes,
                          manifest.stored_nbytes, manifest.created, dict(manifest.timings))


def list_infos(storage, rank: int) -> list[CheckpointInfo]:
    infos = []
    for step in committed_steps(storage):
        try:
            infos.append(info_of(storage, read_manifest(storage, step_dir(step), step), step_dir(step)))
        except (CorruptCheckpointError, FileNotFoundError) as exc:
            log.warning("[rank %d] skipping step %d: %s", rank, step, exc)
    return infos


def _plan_reads(ckpt, manifest: Manifest, step: int, where: str, strict: bool
                ) -> list[tuple[StateComponent, str]]:
    topo, plan = ckpt.topo, []
    for c in ckpt._components():
        entry = manifest.components.get(c.key)
        if entry is None:
            what = f"component {c.key!r} is not in the checkpoint at {where}"
            if c.required and strict:
                raise CheckpointNotFoundError(f"{what}; pass strict=False or mark it required=False to skip it")
            log.warning("[rank %d step %d] %s; skipped", topo.rank, step, what)
            continue
        members = group_members(c, SharingPattern(entry.sharing_pattern), topo) if c.process_group else None
        shard, problem = choose_shard(entry, manifest.topology, topo, members)
        if problem and strict:
            raise CheckpointError(f"cannot load component {c.key!r} of {where} on rank {topo.rank}: "
                                  f"{problem}; load it with the saving topology, or pass strict=False "
                                  "to skip it")
        if shard not in entry.shards:
            what = f"component {c.key!r} has no copy {shard!r} for rank {topo.rank} in {where}"
            if c.required and strict:
                raise CheckpointNotFoundError(f"{what}; pass strict=False or mark it required=False to skip it")
            log.warning("[rank %d step %d] %s; skipped", topo.rank, step, what)
            continue
        if problem:
            log.warning("[rank %d step %d] loading component %r although %s", topo.rank, step, c.key, problem)
        plan.append((c, shard))
    return plan


def restore(ckpt, step: int, strict: bool, load_seq: int) -> CheckpointInfo:
    """The body of AsyncCheckpointer.load for one committed step."""
    session = ReadSession()
    try:
        return _restore(ckpt, step, strict, load_seq, session)
    finally:
        # After _restore's frame (and its references to the loaded states) is gone: whatever a
        # component kept is moved off the checkpoint's files (readbuf.ReadSession).
        session.finish()


def _restore(ckpt, step: int, strict: bool, load_seq: int, session: ReadSession) -> CheckpointInfo:
    storage, topo, options = ckpt.storage, ckpt.topo, ckpt.options
    folder = step_dir(step)
    try:
        manifest = read_manifest(storage, folder, step)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no committed checkpoint for step {step} at {storage.url}; "
                                      f"committed steps: {committed_steps(storage)[-5:]}") from None
    plan = _plan_reads(ckpt, manifest, step, storage.child_url(folder), strict)
    # GLOBAL/REPLICATED copies are the same for every rank of a node: read them once per node.
    shared = [(c.key, shard) for c, shard in plan if shard in ("global", "replicated")]
    try:
        states = read_shared(storage, folder, manifest, shared, topo, ckpt._link, load_seq,
                             options["allow_pickle"], options["verify"], session)
    except CheckpointError as exc:   # each rank reads (and judges) its copies itself
        log.warning("[rank %d step %d] node-shared read failed, reading per rank: %s", topo.rank, step, exc)
        states = {}
    staged = []
    for c, shard in plan:
        try:
            state = states[(c.key, shard)] if (c.key, shard) in states else load_shard(
                storage, folder, manifest, c.key, shard, options["allow_pickle"], options["verify"],
                session)
            staged.append((c, state))
        except CheckpointError as exc:
            if c.required:
                raise
            log.warning("[rank %d step %d] optional component %r skipped: %s", topo.rank, step, c.key, exc)
    info = info_of(storage, manifest, folder)
    for c, state in staged:
        try:
            c.stateful.load_state_dict(state)
        except Exception as exc:
            if c.required:
                raise
            log.warning("[rank %d step %d] optional component %r failed to load: %r",
                        topo.rank, step, c.key, exc)
    return info
