"""Loading a committed checkpoint into the registered components, and listing checkpoints.

Which stored copy of a component this rank loads, and whether the topology allows it, is
`sharing.choose_copy`'s to say; a copy that belongs to another topology is refused under
``strict=True`` (the state would silently belong to someone else).
"""
from __future__ import annotations

import logging

from typing import Callable

from ..dist.link import StoreLink
from ..dist.topology import Topology
from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..format import metrics_file
from ..format.manifest import Manifest
from ..format.names import committed_steps, read_manifest, step_dir
from ..options import CheckpointOptions
from ..sharing import NODE_SHARED, choose_copy, group_members
from ..storage import Storage
from ..types import CheckpointInfo, SharingPattern, StateComponent
from .guard import as_checkpoint_error
from .node_shared import read_shared
from .readbuf import ReadSession
from .reader import load_shard

log = logging.getLogger("async_ckpt")


def info_of(storage, manifest: Manifest, folder: str) -> CheckpointInfo:
    metrics = {**metrics_file.decode(manifest.metrics), **metrics_file.read_late(storage, folder)}
    return CheckpointInfo(manifest.step, storage.child_url(folder), metrics, manifest.nbytes,
                          manifest.stored_nbytes, manifest.created, dict(manifest.timings))


def list_infos(storage, rank: int) -> list[CheckpointInfo]:
    """Every committed checkpoint that can be read; the others are skipped with a warning (one
    hostile step folder never hides the rest). Storage outages still raise."""
    infos = []
    for step in committed_steps(storage):
        try:
            infos.append(info_of(storage, read_manifest(storage, step_dir(step), step), step_dir(step)))
        except (CorruptCheckpointError, FileNotFoundError) as exc:
            log.warning("[rank %d] skipping step %d: %s", rank, step, exc)
    return infos


class Loader:
    """Restores committed checkpoints into registered components; the body of
    ``AsyncCheckpointer.load``.

    Call sequence, on the caller's thread of every rank: ``load(step, strict)`` -> read and check
    the manifest -> decide which copy of each component this rank reads (`sharing.choose_copy`)
    -> read GLOBAL/REPLICATED copies once per node (`load.node_shared`), the rest per rank, every
    record verified -> only then call each component's ``load_state_dict``.
    """

    def __init__(self, storage: Storage, topo: Topology, link: StoreLink | None,
                 options: CheckpointOptions, components: Callable[[], list[StateComponent]]):
        self.storage, self.topo, self.link, self.options = storage, topo, link, options
        self.components = components
        self._seq = 0

    def load(self, step: int, strict: bool) -> CheckpointInfo:
        self._seq += 1
        session = ReadSession()
        try:
            return self._load(step, strict, session)
        finally:
            # After _load's frame (and its references to the loaded states) is gone: whatever a
            # component kept is moved off the checkpoint's files (readbuf.ReadSession).
            session.finish()

    def _plan_reads(self, manifest: Manifest, step: int, where: str, strict: bool
                    ) -> list[tuple[StateComponent, str]]:
        topo, plan = self.topo, []
        for c in self.components():
            entry = manifest.components.get(c.key)
            if entry is None:
                what = f"component {c.key!r} is not in the checkpoint at {where}"
                if c.required and strict:
                    raise CheckpointNotFoundError(f"{what}; pass strict=False or mark it required=False to skip it")
                log.warning("[rank %d step %d] %s; skipped", topo.rank, step, what)
                continue
            pattern = SharingPattern(entry.sharing_pattern)
            members = group_members(c, pattern, topo) if c.process_group else None
            copies = {name: tuple(e.members) for name, e in entry.shards.items()}
            shard, problem = choose_copy(pattern, copies, manifest.topology, topo, members)
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

    def _load(self, step: int, strict: bool, session: ReadSession) -> CheckpointInfo:
        try:
            staged, info = self._read(step, strict, session)
        except Exception as exc:  # noqa: BLE001 - only CheckpointErrors leave reading (guard.py)
            raise as_checkpoint_error(exc, self.storage.url) from exc
        for c, state in staged:
            try:
                c.stateful.load_state_dict(state)
            except Exception as exc:
                if c.required:
                    raise
                log.warning("[rank %d step %d] optional component %r failed to load: %r",
                            self.topo.rank, step, c.key, exc)
        return info

    def _read(self, step: int, strict: bool, session: ReadSession
              ) -> tuple[list[tuple[StateComponent, object]], CheckpointInfo]:
        """Every state this rank restores, read and verified, and the checkpoint's info."""
        storage, topo, options = self.storage, self.topo, self.options
        folder = step_dir(step)
        try:
            manifest = read_manifest(storage, folder, step)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint for step {step} at {storage.url}; "
                                          f"committed steps: {committed_steps(storage)[-5:]}") from None
        plan = self._plan_reads(manifest, step, storage.child_url(folder), strict)
        # GLOBAL/REPLICATED copies are the same for every rank of a node: read them once per node.
        shared = [(c.key, shard) for c, shard in plan if shard in NODE_SHARED]
        try:
            states = read_shared(storage, folder, manifest, shared, topo, self.link, self._seq,
                                 options.allow_pickle, options.verify, session)
        except CheckpointError as exc:   # each rank reads (and judges) its copies itself
            log.warning("[rank %d step %d] node-shared read failed, reading per rank: %s", topo.rank, step, exc)
            states = {}
        staged = []
        for c, shard in plan:
            try:
                state = states[(c.key, shard)] if (c.key, shard) in states else load_shard(
                    storage, folder, manifest, c.key, shard, options.allow_pickle, options.verify,
                    session)
                staged.append((c, state))
            except CheckpointError as exc:
                if c.required:
                    raise
                log.warning("[rank %d step %d] optional component %r skipped: %s", topo.rank, step, c.key, exc)
        return staged, info_of(storage, manifest, folder)
