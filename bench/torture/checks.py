"""The checks after every kill, shared by all kill modes (`Tracker.after_kill`), in a process
that did not save:

1. every listed step loads, bit-exactly (the deterministic state of that step); the newest is
   what ``load()`` and ``latest_step()`` pick; a step folder without manifest is not loadable;
2. retention kept exactly what ``keep_last`` promises: the listed steps are the newest of every
   step ever committed, ``keep_last`` of them, plus only the old ones a retention pass cut short
   by the kill had not removed yet; nothing listed was never saved;
3. nothing a kill left survives the next commit (which a later saver makes; "survives" once that
   commit's sweep has run, i.e. the saver's checkpointer.wait() returned): step folders without
   manifest, files a manifest does not list, unfinished multipart uploads, /dev/shm buffers of
   dead ranks; scratch objects (``.tmp-*``, ``.write-probe-*``) once they are older than the
   engine's grace period (``SCRATCH_GRACE_S``) when a later saver's first commit sweeps.
   A leftover is known by its path *and* the trial that last saved its step: when a later run
   saves that step again (a resumed run re-saves the step a kill cut short), whatever is in the
   step's folder afterwards is that run's own (the folder may have been removed and created
   anew, e.g. then emptied by a kill inside retention), and the count starts again there;
4. reading changed nothing in the root.
"""
from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field
from typing import Callable

from async_ckpt import AsyncCheckpointer, CheckpointNotFoundError, SharingPattern, StateComponent
from async_ckpt.save.commit import SCRATCH_GRACE_S

from .observe import Snapshot, landing
from .state import TortureState, check_state

_STEP_PATH = re.compile(r"^step-(\d+)(?:/|#|$)")


def step_of(item: tuple[str, str]) -> int | None:
    """The step whose folder holds a garbage item (None: under the root, shared memory)."""
    match = _STEP_PATH.match(item[1])
    return int(match.group(1)) if match else None


@dataclass
class Run:
    """What one saver run (a process, or a torchrun launch's rank 0) said it did."""
    started: list[tuple[int, float]] = field(default_factory=list)  # (step, wall time of "saving")
    committed: list[int] = field(default_factory=list)   # reported: handle.wait() returned
    retained: list[int] = field(default_factory=list)    # checkpointer.wait() returned after it:
    last_line: str = ""                                  # the sweep and retention have run

    @property
    def inflight(self) -> int | None:
        """The step whose save was running at the kill (None: no save was)."""
        if not self.started or (self.committed and self.committed[-1] == self.started[-1][0]):
            return None
        return self.started[-1][0]

    def saving_time(self, step: int) -> float | None:
        return next((t for s, t in self.started if s == step), None)


@dataclass
class Component:
    """A component the checker loads: registered with `pattern`, content `check_state(.., mib, salt)`."""
    key: str
    pattern: SharingPattern
    mib: int
    salt: int = 0


@dataclass
class Verdict:
    landing: str
    problems: list[str]
    listed: list[int]
    garbage: int        # leftovers on storage right now
    loads: int          # steps loaded and compared
    cleaned: int        # leftovers seen earlier and gone now


class Tracker:
    """What the checker knows about one root across the trials of a mode."""

    def __init__(self, root: str, keep_last: int, components: list[Component],
                 snapshot: Callable[[], Snapshot], storage_options: dict | None = None):
        self.root, self.keep_last, self.components = root, keep_last, components
        self.snapshot, self.storage_options = snapshot, storage_options
        self.history: set[int] = set()      # every step ever committed here
        self.extra = 0                      # old steps a cut-short retention left listed
        self.latest: int | None = None
        self.seen: dict[tuple[str, str], tuple[int, float | None]] = {}   # garbage -> (trial, time)
        self.sweeps: list[tuple[int, float]] = []    # (trial, "saving" time of a run's first commit)
        self.resaved: dict[int, int] = {}   # step -> the last trial whose run started saving it
        self._loads = self._cleaned = 0

    # -- one trial ----------------------------------------------------------------------------
    def after_kill(self, trial: int, run: Run, final: bool = False) -> Verdict:
        problems: list[str] = []
        self._loads = self._cleaned = 0
        snap = self.snapshot()
        where = landing(snap, run.inflight, set(self.seen), run.last_line)
        listed: list[int] = []
        try:
            listed = self._load_everything(snap, problems)
        except Exception as exc:  # noqa: BLE001 - anything a load raises is a finding
            problems.append(f"checking the root raised {type(exc).__name__}: {exc}\n"
                            f"{traceback.format_exc(limit=6)}")
        after = self.snapshot()
        if (after.files, after.uploads) != (snap.files, snap.uploads):
            problems.append(f"the root changed while it was read: appeared "
                            f"{sorted(set(after.files) - set(snap.files))}, vanished "
                            f"{sorted(set(snap.files) - set(after.files))}, uploads "
                            f"{sorted(after.uploads.values())} (were {sorted(snap.uploads.values())})")
        self._check_retention(run, listed, problems)
        garbage = self._check_garbage(trial, run, snap, problems, final)
        if listed:
            self.latest = listed[-1]
        return Verdict(where, problems, listed, garbage, self._loads, self._cleaned)

    def _load_everything(self, snap: Snapshot, problems: list[str]) -> list[int]:
        sinks = [TortureState(c.mib, c.salt) for c in self.components]
        comps = [StateComponent(c.key, sink, c.pattern) for c, sink in zip(self.components, sinks, strict=True)]
        with AsyncCheckpointer(self.root, comps, storage_options=self.storage_options) as ckpt:
            listed = [info.step for info in ckpt.list_checkpoints()]
            if listed != sorted(set(listed)):
                problems.append(f"list_checkpoints() is not ascending and unique: {listed}")
            if set(listed) != snap.committed():
                problems.append(f"listed {listed}, but manifests on storage for {sorted(snap.committed())}")
            latest = ckpt.latest_step()
            if latest != (listed[-1] if listed else None):
                problems.append(f"latest_step() is {latest}, listed {listed}")
            info = ckpt.load()                       # the newest, as a resuming run would
            if (info.step if info else None) != (listed[-1] if listed else None):
                problems.append(f"load() loaded {info and info.step}, newest listed {listed[-1:]}")
            if info is not None:
                self._check_content(sinks, info.step, "newest", problems)
            for step in listed[:-1]:                 # every other listed step
                info = ckpt.load(step=step)
                self._check_content(sinks, step, "listed", problems)
            for step in sorted(set(snap.step_folders()) - snap.committed()):
                loads = [s.loads for s in sinks]
                try:
                    ckpt.load(step=step)
                    problems.append(f"uncommitted step {step} loaded")
                except CheckpointNotFoundError:
                    pass
                if [s.loads for s in sinks] != loads:
                    problems.append(f"the failed load of uncommitted step {step} called load_state_dict")
        return listed

    def _check_content(self, sinks: list[TortureState], step: int, what: str, problems: list[str]) -> None:
        self._loads += 1
        for c, sink in zip(self.components, sinks, strict=True):
            if sink.loaded is None:
                problems.append(f"{what} step {step}: component {c.key!r} was not restored")
                continue
            wrong = check_state(sink.loaded, step, c.mib, c.salt)
            if wrong:
                problems.append(f"{what} step {step}: component {c.key!r} loaded wrong content: {wrong}")
            sink.loaded = None

    def _check_retention(self, run: Run, listed: list[int], problems: list[str]) -> None:
        inflight = run.inflight
        committed_now = set(run.committed) | ({inflight} if inflight in listed else set())
        # a commit whose sweep and retention may not have finished (killed before "retained")
        unsettled = any(s > max(run.retained, default=-1) for s in committed_now)
        history = sorted(self.history | committed_now)
        started = {s for s, _ in run.started}
        never = [s for s in listed if s not in history and s not in started]
        if never:
            problems.append(f"listed steps {never} were never saved")
        history = sorted(set(history) | set(listed))
        promised = history[-self.keep_last:]
        lost = [s for s in promised if s not in listed]
        if lost:
            problems.append(f"committed steps {lost} are gone; keep_last={self.keep_last} promised "
                            f"{promised} (listed {listed})")
        if listed and listed != history[-len(listed):]:
            problems.append(f"listed {listed} is not the newest of the committed steps {history[-8:]}")
        extra = max(0, len(listed) - len(promised))
        allowed = (0 if run.retained else self.extra) + (1 if unsettled else 0)
        if extra > allowed:
            problems.append(f"retention (keep_last={self.keep_last}) left {extra} old step(s) too many "
                            f"(listed {listed}; a kill mid-retention excuses {allowed})")
        elif not committed_now and extra != self.extra:
            problems.append(f"steps disappeared without a commit: listed {listed}, before {self.extra} extra")
        self.extra = extra
        self.history = set(history)

    def _check_garbage(self, trial: int, run: Run, snap: Snapshot, problems: list[str],
                       final: bool) -> int:
        now = snap.garbage()
        for step, _ in run.started:
            self.resaved[step] = trial
        if run.retained:            # the first commit's sweep ran (the one over every folder)
            first = run.saving_time(run.retained[0])
            self.sweeps.append((trial, first if first is not None else 0.0))
        for item, ts in now.items():
            step = step_of(item)
            if item in self.seen and step is not None and self.resaved.get(step, -1) > self.seen[item][0]:
                self.seen[item] = (trial, ts)   # same path, but the step was saved anew since
            elif item in self.seen:
                seen_trial, ts = self.seen[item]
                if ts is None:
                    stale = any(t > seen_trial for t, _ in self.sweeps)
                else:
                    stale = any(t > seen_trial and at > ts + SCRATCH_GRACE_S + 1 for t, at in self.sweeps)
                if stale:
                    problems.append(f"{item[0]} {item[1]} (left by trial {seen_trial}) survived a later commit")
                    self.seen[item] = (trial, ts)     # reported once
            elif final and (ts is None or (run.started and ts < run.started[-1][1] - SCRATCH_GRACE_S - 1)):
                problems.append(f"{item[0]} {item[1]} survived the final commit")
            else:
                self.seen[item] = (trial, ts)
        for item in [i for i in self.seen if i not in now]:
            del self.seen[item]
            self._cleaned += 1
        return len(now)
