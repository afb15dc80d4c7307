"""Crash safety: a process saving ~256 MiB checkpoints in a loop is SIGKILLed at random instants.

After every kill, a fresh AsyncCheckpointer in this process must see only whole checkpoints: each
listed step loads completely with exactly the content saved for it, every step the child reported
as committed is still listed, and folders of interrupted saves are invisible and never block a
later save of the same step. The child is tests/helpers/crash_saver.py. Kill instants scale with
the measured save duration, so a loaded machine still sees kills inside saves; 8 random kills in
CI, 20 with ASYNC_CKPT_TESTS=full (the torture suite, tests/test_torture.py, has many more).
"""
from __future__ import annotations

import collections
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from async_ckpt import AsyncCheckpointer, CheckpointNotFoundError, SharingPattern, StateComponent
from support.crash_state import COMPONENT, CrashState, check_state
from support.paths import HELPERS, child_env
from support.profile import pick
from support.stateful import Box

HELPER = HELPERS / "crash_saver.py"

pytestmark = pytest.mark.crash

STARTUP_TIMEOUT = 120.0
AHEAD = 2                  # children importing torch ahead of the running one


class Child:
    """One crash_saver.py process; stdout lines are collected by a thread with arrival times."""

    def __init__(self, root: Path, log_dir: Path, name: str, *, compression: str | None = None,
                 keep_last: int | None = None, idle: float = 0.1):
        cmd = [sys.executable, str(HELPER), str(root), "--idle", str(idle)]
        if compression:
            cmd += ["--compression", compression]
        if keep_last is not None:
            cmd += ["--keep-last", str(keep_last)]
        self.name = name
        self.compression = compression
        self.err_path = log_dir / f"{name}.stderr"
        self._err = open(self.err_path, "wb")
        env = child_env(OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, env=env)
        self.lines: list[tuple[float, str]] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._queue.put((time.monotonic(), raw.decode().strip()))
        self._queue.put(None)

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")[-4000:]

    def expect(self, prefix: str, timeout: float) -> tuple[float, str]:
        """Wait for the next line starting with `prefix`; return (arrival time, line)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"{self.name}: no {prefix!r} line within {timeout} s; "
                            f"lines so far {self.lines}; stderr:\n{self.stderr()}")
            if item is None:
                pytest.fail(f"{self.name} exited (rc={self.proc.wait()}) before printing {prefix!r}; "
                            f"lines {self.lines}; stderr:\n{self.stderr()}")
            self.lines.append(item)
            if item[1].startswith(prefix):
                return item

    def go(self) -> int:
        """Let the child open the root; return the first step it will save."""
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        self.ready_at, line = self.expect("ready", STARTUP_TIMEOUT)
        return int(line.split()[1])

    def sigkill(self) -> None:
        assert self.proc.poll() is None, (f"{self.name} died on its own (rc={self.proc.returncode}) "
                                          f"before the kill; lines {self.lines}; stderr:\n{self.stderr()}")
        os.kill(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait(timeout=60)
        assert rc == -signal.SIGKILL, f"{self.name} exited with {rc}, not by SIGKILL"
        self._reader.join(timeout=60)
        while (item := self._queue.get()) is not None:
            self.lines.append(item)
        self._err.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        if not self._err.closed:
            self._err.close()

    def steps(self, word: str) -> list[int]:
        return [int(line.split()[1]) for _, line in self.lines if line.startswith(word + " ")]


@pytest.fixture
def root(tmp_path):
    """The checkpoint root on the real disk; removed afterwards (hundreds of MiB)."""
    path = tmp_path / "ckpts"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def children():
    """Starts crash_saver children and SIGKILLs any still alive when the test ends."""
    started: list[Child] = []

    def start(*args, **kwargs) -> Child:
        child = Child(*args, **kwargs)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


def open_reader(root: Path) -> tuple[AsyncCheckpointer, Box]:
    sink = Box({})       # receives loaded state; never saved from
    return AsyncCheckpointer(root, [StateComponent(COMPONENT, sink, SharingPattern.GLOBAL)]), sink


def step_folders(root: Path) -> dict[int, Path]:
    out = {}
    for p in root.iterdir() if root.exists() else ():
        if p.is_dir() and p.name.startswith("step-"):
            out[int(p.name.split("-", 1)[1])] = p
    return out


def uncommitted(root: Path) -> set[int]:
    return {s for s, p in step_folders(root).items() if not (p / "manifest.json").exists()}


def load_and_check(ckpt: AsyncCheckpointer, sink: Box, step: int, context: str) -> None:
    loads = sink.loads
    info = ckpt.load(step=step)
    assert info is not None and info.step == step, f"{context}: load(step={step}) returned {info}"
    assert sink.loads == loads + 1, f"{context}: load(step={step}) did not call load_state_dict"
    problems = check_state(sink.loaded, step)
    assert not problems, f"{context}: step {step} loaded with wrong content: {problems}"
    sink.loaded = None


def prune_committed(root: Path, keep: set[int]) -> None:
    """The user deleting old checkpoints between runs: manifest first, then the data."""
    for step, folder in step_folders(root).items():
        manifest = folder / "manifest.json"
        if step not in keep and manifest.exists():
            manifest.unlink()
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()


def verify_after_kill(root: Path, child: Child, first: int, reported: set[int], pruned: set[int],
                      context: str) -> tuple[list[int], set[int]]:
    """Checks shared by every trial; returns (listed steps, half-written steps on disk)."""
    ckpt, sink = open_reader(root)
    listed = [info.step for info in ckpt.list_checkpoints()]
    assert listed == sorted(set(listed)), f"{context}: list_checkpoints not ascending/unique: {listed}"
    assert ckpt.latest_step() == (listed[-1] if listed else None), f"{context}: latest_step vs {listed}"
    missing = sorted((reported - pruned) - set(listed))
    assert not missing, f"{context}: steps reported committed are not listed: {missing} (listed {listed})"
    started = set(child.steps("saving"))
    never_saved = [s for s in listed if s >= first and s not in started]
    assert not never_saved, f"{context}: listed {listed} includes steps never saved: {never_saved}"
    half = uncommitted(root)
    assert not half & set(listed), f"{context}: half-written steps {half} are listed: {listed}"
    # no torn manifest either: every folder with a manifest is a readable, listed checkpoint
    with_manifest = set(step_folders(root)) - half
    assert set(listed) == with_manifest, f"{context}: manifests on disk {sorted(with_manifest)}, listed {listed}"
    for step in sorted(half):
        with pytest.raises(CheckpointNotFoundError):
            ckpt.load(step=step)
    assert sink.loads == 0, f"{context}: a failed load called load_state_dict"
    for step in listed:      # every listed checkpoint loads whole, with the content saved for it
        load_and_check(ckpt, sink, step, context)
    return listed, half


@pytest.mark.timeout(pick(300, 900))
def test_sigkill_at_random_instants_never_exposes_partial_checkpoints(tmp_path, root, children):
    rng = random.Random(1234)
    n_trials = pick(8, 20)
    zstd_trials = pick({5}, {6, 13})
    save_s = 1.0                   # one save's duration, measured (a loaded machine saves slower)
    reported: set[int] = set()     # every step a child printed "committed" for
    pruned: set[int] = set()       # committed steps this test deleted itself (to bound disk use)
    half_seen: set[int] = set()
    log = []
    warm: collections.deque = collections.deque()
    for trial in range(n_trials):
        # Keep two children importing torch ahead of time, so import time overlaps the trials.
        for i in range(trial + len(warm), min(trial + 1 + AHEAD, n_trials)):
            warm.append(children(root, tmp_path, f"child-{i}", idle=0.25,
                                 compression="zstd" if i in zstd_trials else None))
        child = warm.popleft()
        context = f"trial {trial} ({child.compression or 'raw'})"
        child.expect("loaded", STARTUP_TIMEOUT)
        latest = open_reader(root)[0].latest_step()
        first = child.go()
        assert first == (0 if latest is None else latest + 1), f"{context}: resumed at {first}, latest {latest}"
        if trial == 0:     # a commit first (so one is surely reported), then inside the next save
            child.expect("committed", STARTUP_TIMEOUT)
            save_s = _save_s(child, save_s)
            delay = rng.uniform(0.0, 1.2 * save_s)
            time.sleep(delay)
        else:              # anywhere in the first three save cycles
            delay = rng.uniform(0.0, 3.0 * save_s)
            time.sleep(max(0.0, child.ready_at + delay - time.monotonic()))
        child.sigkill()
        save_s = _save_s(child, save_s)
        committed = child.steps("committed")
        reported.update(committed)
        listed, half = verify_after_kill(root, child, first, reported, pruned, context)
        half_seen |= half
        log.append((trial, round(delay, 2), child.lines[-1][1], committed, listed, sorted(half)))
        if listed:
            pruned |= set(listed[:-1])
            prune_committed(root, {listed[-1]})
    # The random instants must have hit at least one save mid-write, or this test proved nothing.
    print(*log, sep="\n")
    assert half_seen, f"no kill landed mid-write; trials: {log}"
    assert reported, f"no child ever committed a step; trials: {log}"

    # Leftovers never block a later save: save the next step here (its folder may be half-written
    # by the last child); after the commit, no uncommitted folder is left behind.
    ckpt, sink = open_reader(root)
    step = ckpt.latest_step() + 1
    state = CrashState()
    state.set_step(step)
    with AsyncCheckpointer(root, [StateComponent(COMPONENT, state, SharingPattern.GLOBAL)]) as writer:
        writer.save(step).wait()
    assert uncommitted(root) == set(), f"leftovers not cleaned up: {sorted(uncommitted(root))}"
    load_and_check(ckpt, sink, step, "final save after the crashes")


def _save_s(child: Child, save_s: float) -> float:
    """A running estimate of one save's duration, from the child's saving -> committed lines."""
    began: dict[str, float] = {}
    for t, line in child.lines:
        word, _, step = line.partition(" ")
        if word == "saving":
            began[step] = t
        elif word == "committed" and step in began:
            save_s = 0.7 * save_s + 0.3 * (t - began[step])
    return save_s


def _kill_mid_write(root: Path, log_dir: Path, children, attempt: int):
    """SIGKILL a child while the data file of a step is being written (exists, no manifest yet).
    Returns (step, its folder, names left in it), or Nones if the save committed first."""
    child = children(root, log_dir, f"child-mid-write-{attempt}", idle=0.0)
    child.expect("loaded", STARTUP_TIMEOUT)
    first = child.go()
    child.expect(f"committed {first}", 60)
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        for step, folder in step_folders(root).items():
            try:
                if step > first and not (folder / "manifest.json").exists() and \
                        any(f.stat().st_size > 0 for f in folder.glob("data-*.bin")):
                    victim = step
                    break
            except FileNotFoundError:
                pass
        else:
            time.sleep(0.002)
    assert victim is not None, f"never caught a save mid-write; lines {child.lines}"
    child.sigkill()
    folder = step_folders(root)[victim]
    if (folder / "manifest.json").exists():
        return None, None, None
    leftovers = sorted(p.name for p in folder.iterdir())
    assert any(n.startswith("data-") for n in leftovers), leftovers
    return victim, folder, leftovers


@pytest.mark.timeout(180)
def test_half_written_step_is_invisible_and_can_be_saved_again(tmp_path, root, children):
    victim = None
    for attempt in range(3):      # a retry is needed only if the save won the race with the kill
        victim, folder, leftovers = _kill_mid_write(root, tmp_path, children, attempt)
        if victim is not None:
            break
    assert victim is not None, "three saves committed before the kill landed"

    ckpt, sink = open_reader(root)
    assert ckpt.latest_step() == victim - 1
    assert [i.step for i in ckpt.list_checkpoints()] == list(range(victim))
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(step=victim)
    assert sink.loads == 0
    info = ckpt.load()                               # newest committed: the one before the crash
    assert info.step == victim - 1
    assert not check_state(sink.loaded, victim - 1)
    sink.loaded = None

    # Another leftover, of a step no one is saving: garbage that a later commit cleans up.
    stray = root / f"step-{victim + 7:010d}"
    stray.mkdir()
    (stray / "data-r00000-deadbeef.bin").write_bytes(b"\0" * 4096)

    state = CrashState()
    state.set_step(victim)
    with AsyncCheckpointer(root, [StateComponent(COMPONENT, state, SharingPattern.GLOBAL)]) as writer:
        info = writer.save(victim).wait()
    assert info.step == victim
    names = sorted(p.name for p in folder.iterdir())
    assert "manifest.json" in names
    assert [n for n in names if n.startswith("data-")] and not set(names) & set(leftovers), \
        f"leftovers {leftovers} of the killed save survived the re-save: {names}"
    assert not stray.exists(), "an uncommitted leftover folder survived a later commit"
    assert uncommitted(root) == set()
    ckpt, sink = open_reader(root)
    assert ckpt.latest_step() == victim
    load_and_check(ckpt, sink, victim, "re-saved step")


@pytest.mark.timeout(180)
def test_sigkill_with_keep_last_keeps_the_newest_committed(tmp_path, root, children):
    """keep_last=1: kills may also land while retention deletes old checkpoints."""
    rng = random.Random(98765)
    last_reported = None
    retention_checked = 0
    log = []
    n_trials = 4
    warm: collections.deque = collections.deque()
    for trial in range(n_trials):
        for i in range(trial + len(warm), min(trial + 1 + AHEAD, n_trials)):
            warm.append(children(root, tmp_path, f"keep-{i}", keep_last=1, idle=0.05))
        child = warm.popleft()
        context = f"keep_last trial {trial}"
        child.expect("loaded", STARTUP_TIMEOUT)
        child.go()
        if trial < n_trials - 1:
            delay = rng.uniform(1.0, 3.5)
            time.sleep(max(0.0, child.ready_at + delay - time.monotonic()))
        else:   # make sure at least one trial sees two commits, so retention has surely run
            child.expect("committed", 60)
            child.expect("committed", 60)
            delay = rng.uniform(0.0, 0.3)
            time.sleep(delay)
        child.sigkill()
        committed = child.steps("committed")
        last_reported = committed[-1] if committed else last_reported
        ckpt, sink = open_reader(root)
        listed = [i.step for i in ckpt.list_checkpoints()]
        log.append((trial, round(delay, 2), child.lines[-1][1], committed, listed))
        if last_reported is not None:
            # The newest committed step is never retired; a newer commit that the child did not
            # get to report may already have retired the last reported one.
            assert listed and listed[-1] >= last_reported, f"{context}: step {last_reported} lost: {log}"
            assert last_reported in listed or listed[-1] == last_reported + 1, log
        if len(committed) >= 2:
            # Retention after committed[-2] finished before the save of committed[-1] began, so
            # only committed[-2], committed[-1] and one unreported newer step can remain.
            assert all(committed[-2] <= s <= committed[-1] + 1 for s in listed), f"{context}: {log}"
            assert len(listed) <= 2, f"{context}: keep_last=1 left {listed}: {log}"
            retention_checked += 1
        assert not uncommitted(root) & set(listed)
        for step in listed:
            load_and_check(ckpt, sink, step, context)
    print(*log, sep="\n")
    assert retention_checked, f"no trial committed twice, retention was never checked: {log}"
