"""Loading a committed checkpoint into the registered components, and listing checkpoints.

Which stored copy of a component this rank loads, and whether the topology allows it, is
`sharing.choose_copy`'s to say; a copy that belongs to another topology is refused under
``strict=True`` (the state would silently belong to someone else).
"""
from __future__ import annotations

import logging

from typing import Any, Callable

from ..dist.link import StoreLink
from ..dist.messages import LoadStep, LoadVerdict
from ..dist.topology import Topology
from ..errors import ERROR_CLASSES, CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..format import fragments, metrics_file
from ..format.manifest import ComponentEntry, Manifest
from ..format.names import committed_steps, read_manifest, step_dir
from ..options import CheckpointOptions
from ..sharing import NODE_SHARED, choose_copy, group_label, group_members
from ..storage import Storage
from ..types import CheckpointInfo, SharingPattern, StateComponent
from .checks import check_before_load, describe_partial
from .guard import as_checkpoint_error, checkpoint_errors_only
from .node_shared import read_shared
from .readbuf import ReadSession
from .reader import load_shard
from .reshard import by_key, load_sharded, load_whole

BY_KEY = "(by key)"      # a PER_RANK component loaded key by key (load.reshard.by_key)

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
            folder = step_dir(step)
            infos.append(info_of(storage, read_manifest(storage, folder, step, fragments=False), folder))
        except (CorruptCheckpointError, FileNotFoundError) as exc:
            log.warning("[rank %d] skipping step %d: %s", rank, step, exc)
    return infos


class Loader:
    """Restores committed checkpoints into registered components; the body of
    ``AsyncCheckpointer.load``.

    Call sequence, on the caller's thread of every rank: ``load(step, strict)`` -> (newest:
    rank 0 says which step, ``step``) -> read and check the manifest -> decide which copy of
    each component this rank reads (`sharing.choose_copy`) -> read GLOBAL/REPLICATED copies once
    per node (`load.node_shared`), the rest per rank, every record verified -> check the restored
    states against the live objects (`load.checks`) -> post this rank's verdict and read every
    rank's (``verdict/<rank>``): if any rank failed, every rank raises, naming it, and none has
    restored anything -> only then call each component's ``load_state_dict``.
    """

    def __init__(self, storage: Storage, topo: Topology, link: StoreLink | None,
                 options: CheckpointOptions, components: Callable[[], list[StateComponent]]):
        self.storage, self.topo, self.link, self.options = storage, topo, link, options
        self.components = components
        self._seq = 0
        self._by_key: dict[str, ComponentEntry] = {}
        self._folder = ""

    def load(self, step: int | None, strict: bool) -> CheckpointInfo | None:
        """Restore `step` (None: the newest committed one; None returned when there is none)."""
        self._seq += 1
        if step is None:
            step = self._newest()
            if step is None:
                return None
        session = ReadSession()
        try:
            return self._load(step, strict, session)
        finally:
            # After _load's frame (and its references to the loaded states) is gone: whatever a
            # component kept is moved off the checkpoint's files (readbuf.ReadSession).
            session.finish()

    def _key(self) -> str:
        return f"load{self._seq}"

    @checkpoint_errors_only
    def _newest(self) -> int | None:
        """The newest committed step, the same on every rank: rank 0 lists, the others hear it
        (a commit landing between two ranks' listings must not make them load different steps)."""
        if self.link is None:
            steps = committed_steps(self.storage)
            return steps[-1] if steps else None
        if self.topo.rank == 0:
            steps = committed_steps(self.storage)
            newest = steps[-1] if steps else None
            self.link.post(self._key(), "step", LoadStep(-1 if newest is None else newest))
            return newest
        got = self.link.gather(self._key(), {0: "step"}, LoadStep, "rank", range(0),
                               alive={0: 0}, stop_on_outcome=False)[0]
        return None if got.step < 0 else got.step

    def _agree(self, step: int, error: BaseException | None) -> None:
        """Every rank's verdict before any load_state_dict: raise on every rank if any failed."""
        if self.link is None:
            if error is not None:
                raise error
            return
        topo, key = self.topo, self._key()
        verdict = (LoadVerdict(topo.rank, True) if error is None else
                   LoadVerdict(topo.rank, False, type(error).__name__, str(error)))
        try:
            self.link.post(key, f"verdict/{topo.rank}", verdict)
        except CheckpointError:
            if error is None:
                raise
            log.warning("[rank %d] could not tell the other ranks this load failed", topo.rank)
        if error is not None:
            raise error
        world = range(topo.world_size)
        verdicts = self.link.gather(key, {r: f"verdict/{r}" for r in world}, LoadVerdict, "rank(s)",
                                    range(0), alive={r: r for r in world if r != topo.rank},
                                    stop_on_outcome=False)
        failed = {r: v for r, v in sorted(verdicts.items()) if not v.ok}
        if failed:
            first = next(iter(failed.values()))
            kind = ERROR_CLASSES.get(first.error_type, CheckpointError)   # a peer's class, by name
            raise kind(f"loading step {step} failed on rank(s) {sorted(failed)}, so no rank restores "
                       f"anything: " + "; ".join(f"rank {r}: {v.error_type}: {v.message}"
                                                 for r, v in failed.items()))

    def _plan_reads(self, held: list[Manifest], step: int, where: str, strict: bool
                    ) -> list[tuple[StateComponent, str]]:
        """Which copy of each registered component this rank reads. `held[0]`: the manifest (a
        format_version 3 root gets the fragments merged in that a by-key load needs)."""
        topo, plan = self.topo, []
        manifest = held[0]
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
            copies = manifest.copies(c.key)
            shard, problem = choose_copy(pattern, copies, manifest.topology, topo, members,
                                         group_label(c, pattern))
            if problem and pattern is SharingPattern.PER_RANK and manifest.fragments_of(c.key):
                # a by-key load needs every copy's skeleton: all of the component's fragments
                held[0] = manifest = self._complete(manifest, manifest.fragments_of(c.key))
                entry = manifest.components[c.key]
            if problem and pattern is SharingPattern.PER_RANK and (merged := by_key(entry, where)):
                # the copies' keys are disjoint (pipeline stages): load each live key from the
                # rank that saved it, at any pipeline degree
                log.info("[rank %d step %d] component %r: %s; loading it by key", topo.rank, step,
                         c.key, problem)
                self._by_key[c.key] = merged
                plan.append((c, BY_KEY))
                continue
            if problem and strict and not c.required:
                # an optional component (a per-rank RNG) never stands in the way of a topology change
                log.warning("[rank %d step %d] component %r skipped (required=False): %s", topo.rank,
                            step, c.key, problem)
                continue
            if problem and strict:
                raise CheckpointError(f"cannot load component {c.key!r} of {where} on rank {topo.rank}: "
                                      f"{problem}; load it with the saving topology, or pass strict=False "
                                      "to skip it")
            if pattern is SharingPattern.SHARDED or entry.sharded is not None:
                if entry.sharded is None:
                    raise CorruptCheckpointError(f"component {c.key!r} of {where} is SHARDED but "
                                                 "has no chunk records")
                plan.append((c, shard))
                continue
            if shard not in copies:
                # Whatever `strict` says: skipping it would leave this rank's state as it was
                # while its peers restore theirs (ranks 2-3 of a 4-rank load of a 2-rank save).
                what = f"component {c.key!r} has no copy {shard!r} for rank {topo.rank} in {where}"
                if c.required:
                    raise CheckpointNotFoundError(
                        f"{what} ({problem or 'no rank of the saving run wrote one'}); a required "
                        "component needs a copy on every rank: load with the saving topology, or "
                        "mark it required=False to start it fresh where it has no copy")
                log.warning("[rank %d step %d] %s; skipped (required=False)", topo.rank, step, what)
                continue
            if problem:
                log.warning("[rank %d step %d] loading component %r although %s", topo.rank, step, c.key, problem)
            plan.append((c, shard))
        return plan

    def _complete(self, manifest: Manifest, names: list[str]) -> Manifest:
        if not names:
            return manifest
        return fragments.complete(self.storage, self._folder, manifest, names)

    def _load(self, step: int, strict: bool, session: ReadSession) -> CheckpointInfo:
        try:
            info, staged = self._read(step, strict, session)
        except Exception as exc:  # noqa: BLE001 - only CheckpointErrors leave reading (guard.py)
            error = as_checkpoint_error(exc, self.storage.url)
            self._agree(step, error)          # tells the others, then raises it here
            raise
        self._agree(step, None)
        restored: list[str] = []
        for i, (c, state) in enumerate(staged):
            try:
                c.stateful.load_state_dict(state)
            except Exception as exc:
                if c.required:
                    raise describe_partial(step, restored, c.key, [p.key for p, _ in staged[i + 1:]],
                                           exc) from exc
                log.warning("[rank %d step %d] optional component %r failed to load: %r",
                            self.topo.rank, step, c.key, exc)
                continue
            restored.append(c.key)
        return info

    def _read(self, step: int, strict: bool, session: ReadSession
              ) -> tuple[CheckpointInfo, list[tuple[StateComponent, Any]]]:
        """Everything that can fail before a component is touched: the manifest, the plan, every
        verified record, the checks against the live objects, the checkpoint's info."""
        storage, topo, options = self.storage, self.topo, self.options
        folder = step_dir(step)
        try:
            manifest = read_manifest(storage, folder, step, fragments=False)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint for step {step} at {storage.url}; "
                                          f"committed steps: {committed_steps(storage)[-5:]}") from None
        self._folder = folder
        held = [manifest]
        plan = self._plan_reads(held, step, storage.child_url(folder), strict)
        # format_version 3: only the fragments holding this rank's copies (every fragment holding
        # chunks of a component it reshards), each checked against the root before it is used
        needed = {name for c, shard in plan for name in held[0].fragments_of(
            c.key, None if shard == BY_KEY or held[0].components[c.key].sharded is not None else shard)}
        manifest = self._complete(held[0], sorted(needed))
        # GLOBAL/REPLICATED copies are the same for every rank of a node: read them once per node.
        shared = [(c.key, shard) for c, shard in plan if shard in NODE_SHARED]
        try:
            views = frozenset(c.key for c, _ in plan if getattr(c.stateful, "copies_on_load", False))
            states = read_shared(storage, folder, manifest, shared, topo, self.link, self._seq,
                                 options.allow_pickle, options.verify, session, views)
        except CheckpointError as exc:   # each rank reads (and judges) its copies itself
            log.warning("[rank %d step %d] node-shared read failed, reading per rank: %s", topo.rank, step, exc)
            states = {}
        staged = []
        for c, shard in plan:
            try:
                entry = manifest.components[c.key]
                if (c.key, shard) in states:
                    state = states[(c.key, shard)]
                elif shard == BY_KEY or (entry.sharded is not None
                                         and entry.sharing_pattern == SharingPattern.SHARDED.value):
                    # the live state is the target: each rank reads the boxes it covers
                    target = getattr(c.stateful, "load_target", None)   # see load.reshard
                    live = target() if callable(target) else c.stateful.state_dict()
                    state = load_sharded(storage, folder, manifest, c.key, live, options.verify, session,
                                         self._by_key.get(c.key) if shard == BY_KEY else None,
                                         options.allow_pickle)
                elif entry.sharded is not None:       # a REPLICATED component written in chunks
                    state = load_whole(storage, folder, manifest, c.key, options.allow_pickle,
                                       options.verify, session)
                else:
                    state = load_shard(storage, folder, manifest, c.key, shard, options.allow_pickle,
                                       options.verify, session)
                check_before_load(c, state)
                staged.append((c, state))
            except CheckpointError as exc:
                if c.required:
                    raise
                log.warning("[rank %d step %d] optional component %r skipped: %s", topo.rank, step, c.key, exc)
        return info_of(storage, manifest, folder), staged
