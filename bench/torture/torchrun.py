"""The torchrun kill modes: 2 x 2 runs (two ``--nnodes=2`` launchers on this machine, two ranks
each) saving a REPLICATED and a PER_RANK state in a loop, and one of three kills:

- ``group``: every rank and both launchers at once (a whole job lost);
- ``rank``: one random rank; torchrun then tears down its node, so the ranks of the other node
  are the survivors (and with a rank of node 0 the Store's host goes too);
- ``launcher``: node 0's torchrun agent, which hosts the TCPStore; its workers live on.

After ``rank`` and ``launcher`` kills every survivor's save()/wait() must raise a CheckpointError
and the process exit within ``min(timeout_s, 30) + MARGIN_S`` of the kill (the expectation of
tests/test_distributed.py's agent kill). Then the root gets `checks.Tracker`'s checks here (the
shared state loaded at world size 1), and the next launch's ranks load every listed step, their
own PER_RANK shares included, before they save again. Launches are started one trial ahead, so
imports overlap the checks.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from async_ckpt import SharingPattern

from .checks import Component, Run, Tracker
from .observe import local_snapshot
from .proc import REPO, TrialError, child_env, kill_pid, pid_alive
from .results import ModeResult, Progress

RANK_SCRIPT = str(Path(__file__).with_name("rank.py"))
NNODES, NPROC = 2, 2
WORLD = NNODES * NPROC
TIMEOUT_S = 10.0         # the checkpointer's timeout_s in the ranks
MARGIN_S = 10.0          # as tests/test_distributed.py allows
BOUND_S = min(TIMEOUT_S, 30.0) + MARGIN_S
KEEP_LAST = 2
MIB = 8                  # per component and rank
STARTUP_TIMEOUT = 420.0
SAVE_S = 1.5             # first guess of one save's duration


class Launch:
    """One 2 x 2 torchrun run: two launchers, four ranks known by the pids they write."""

    def __init__(self, out: Path):
        from async_ckpt.storage.testing.servers import free_port
        self.root, self.out = "", out
        out.mkdir(parents=True)
        port = free_port()
        self.launchers: list[subprocess.Popen] = []
        self.logs = []
        for node in range(NNODES):
            log = out / f"node{node}.log"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NNODES}",
                   f"--node-rank={node}", f"--nproc-per-node={NPROC}", "--rdzv-backend=static",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "--monitor-interval=0.2",
                   RANK_SCRIPT, str(out), str(TIMEOUT_S), str(KEEP_LAST), str(MIB)]
            with open(log, "wb") as fh:
                self.launchers.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                                       env=child_env(PYTHONUNBUFFERED="1"), cwd=REPO,
                                                       start_new_session=True))
            self.logs.append(log)

    def go(self, root: str, phase: str) -> None:
        """Let the ranks open `root`: "loop" saves until killed, "final" saves once and closes."""
        self.root = root
        tmp = self.out / "go.tmp"
        tmp.write_text(json.dumps({"root": root, "phase": phase}))
        tmp.rename(self.out / "go")

    def wait_files(self, pattern: str, timeout: float) -> None:
        """Until every rank wrote `pattern` (with {} for the rank)."""
        deadline = time.monotonic() + timeout
        while not all((self.out / pattern.format(r)).exists() for r in range(WORLD)):
            if time.monotonic() > deadline:
                raise TrialError(f"ranks did not write {pattern} within {timeout:.0f} s\n{self.log_text()}")
            if any(p.poll() is not None for p in self.launchers):
                time.sleep(1.0)      # let a dying launch finish writing its log
                raise TrialError(f"a launcher exited (rc {[p.poll() for p in self.launchers]}) "
                                 f"before {pattern}\n{self.log_text()}")
            time.sleep(0.05)

    def pids(self) -> dict[int, int]:
        found = {}
        for r in range(WORLD):
            try:
                found[r] = int((self.out / f"pid-r{r}").read_text())
            except (FileNotFoundError, ValueError):
                pass
        return found

    def events(self, rank: int) -> list[tuple[str, int, float]]:
        try:
            text = (self.out / f"events-r{rank}.log").read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append((parts[0], int(parts[1]), float(parts[2])))
        return out

    def saves_started(self) -> int:
        return sum(1 for word, _, _ in self.events(0) if word == "saving")

    def verify(self, latest: int | None) -> list[str]:
        """What the ranks found loading every listed step; each must resume after `latest`."""
        problems = []
        for r in range(WORLD):
            doc = json.loads((self.out / f"verify-r{r}.json").read_text())
            problems += doc["problems"]
            if doc["newest"] != latest:
                problems.append(f"rank {r} resumes from step {doc['newest']}, the newest committed is {latest}")
        return problems

    def raised(self, rank: int) -> dict | None:
        try:
            return json.loads((self.out / f"raised-r{rank}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def run(self) -> Run:
        """Rank 0's commits and retentions (its coordinator runs them); saves any rank started."""
        run = Run()
        first: dict[int, float] = {}
        for r in range(WORLD):
            for word, step, t in self.events(r):
                if word == "saving":
                    first[step] = min(t, first.get(step, t))
        run.started = sorted(first.items())
        run.committed = [s for word, s, _ in self.events(0) if word == "committed"]
        run.retained = [s for word, s, _ in self.events(0) if word == "retained"]
        last = self.events(0)
        run.last_line = f"{last[-1][0]} {last[-1][1]}" if last else "ready"
        return run

    def kill_all(self) -> None:
        for pid in self.pids().values():
            kill_pid(pid)
        for proc in self.launchers:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, 9)
                except ProcessLookupError:
                    pass
        for proc in self.launchers:
            proc.wait()
        deadline = time.monotonic() + 30
        while any(pid_alive(p) for p in self.pids().values()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                         for p in self.logs if p.exists())


def run_torchrun(name: str, kind: str, kills: int, rng: random.Random, workdir: Path,
                 progress: Progress) -> ModeResult:
    mode = _TorchrunMode(name, kind, rng, workdir, progress)
    started = time.monotonic()
    try:
        mode.run(kills)
    finally:
        mode.nxt.kill_all()
    mode.result.seconds = time.monotonic() - started
    return mode.result


class _TorchrunMode:
    """The trials of one torchrun mode; one launch runs while the next one imports."""

    def __init__(self, name: str, kind: str, rng: random.Random, workdir: Path, progress: Progress):
        self.name, self.kind, self.rng, self.workdir, self.progress = name, kind, rng, workdir, progress
        self.result = ModeResult(name, kind="kills")
        self.result.notes.update({"timeout_s": TIMEOUT_S, "bound_s": BOUND_S,
                                  "survivor_raise_s": [], "survivor_exit_s": []})
        self.rank_pids: set[int] = set()
        self.tracker = _new_tracker(workdir, name, self.rank_pids)
        self.save_s = SAVE_S
        self.nxt = self._launch()

    def _launch(self) -> Launch:
        return Launch(self.workdir / f"{self.name}-run-{uuid.uuid4().hex[:6]}")

    def run(self, kills: int) -> None:
        result = self.result
        for trial in range(kills + 1):          # the last launch saves once and exits cleanly
            launch, final = self.nxt, trial == kills
            plan, problems = "", []
            try:
                launch.wait_files("loaded-r{}", STARTUP_TIMEOUT)
                self.rank_pids.update(launch.pids().values())
                launch.go(self.tracker.root, "final" if final else "loop")
                launch.wait_files("verify-r{}.json", STARTUP_TIMEOUT)
                problems += [f"at the start of the next launch: {p}" for p in launch.verify(self.tracker.latest)]
                if final:
                    codes = [p.wait(timeout=STARTUP_TIMEOUT) for p in launch.launchers]
                    if codes != [0] * NNODES:
                        problems.append(f"the final launch exited with {codes}\n{launch.log_text()}")
                else:
                    plan = _wait_planned(launch, self.rng, self.save_s)
                    problems += _kill(self.kind, launch, self.rng, result)
            except (TrialError, subprocess.TimeoutExpired) as exc:
                problems.append(f"trial could not run: {exc}")
            launch.kill_all()
            self.rank_pids.update(launch.pids().values())
            if not final:                        # its imports overlap the checks
                self.nxt = self._launch()
            run = launch.run()
            self.save_s = _refine(self.save_s, launch)
            verdict = self.tracker.after_kill(trial, run, final=final)
            if final:
                result.final_checked = not (problems or verdict.problems)
            else:
                result.record_kill(verdict, run, plan)
            if problems or verdict.problems:
                result.record_failure(trial, verdict.landing if not final else "final launch",
                                      problems + verdict.problems, self.tracker.root,
                                      [(0.0, f"{w} {s}") for w, s, _ in launch.events(0)], plan)
                result.kept_roots += [self.tracker.root, str(launch.out)]
                self.tracker = _new_tracker(self.workdir, self.name, self.rank_pids)  # evidence stays
            else:
                shutil.rmtree(launch.out, ignore_errors=True)
            if not final:
                self.progress.trial(result, trial, kills, verdict.landing)
        if self.tracker.root not in result.kept_roots:
            shutil.rmtree(self.tracker.root, ignore_errors=True)


def _new_tracker(workdir: Path, name: str, rank_pids: set[int]) -> Tracker:
    root = str(workdir / f"{name}-{uuid.uuid4().hex[:8]}")

    def snapshot():
        snap = local_snapshot(root)
        snap.shm = {n for n in glob.glob("/dev/shm/async_ckpt-*") if _shm_pid(n) in rank_pids}
        return snap
    return Tracker(root, KEEP_LAST, [Component("shared", SharingPattern.REPLICATED, MIB)], snapshot)


def _shm_pid(path: str) -> int | None:
    try:
        return int(os.path.basename(path).split("-")[1])
    except (IndexError, ValueError):
        return None


def _wait_planned(launch: Launch, rng: random.Random, save_s: float) -> str:
    """Kill anywhere in the first cycles after the verify, or inside rank 0's n-th save."""
    if rng.random() < 0.4:
        delay = rng.uniform(0.0, 3 * (save_s + 0.05))
        time.sleep(delay)
        return f"{delay:.3f}s after the verify"
    nth = rng.randint(1, 3)
    deadline = time.monotonic() + 60 + 10 * save_s * nth
    while launch.saves_started() < nth:
        if time.monotonic() > deadline or any(p.poll() is not None for p in launch.launchers):
            return f"save {nth} never started"
        time.sleep(0.005)
    delay = rng.uniform(0.0, 1.15 * save_s)
    time.sleep(delay)
    return f"{delay:.3f}s into save {nth}"


def _kill(kind: str, launch: Launch, rng: random.Random, result: ModeResult) -> list[str]:
    pids = launch.pids()
    if kind == "group":
        for pid in pids.values():
            kill_pid(pid)
        for proc in launch.launchers:
            kill_pid(proc.pid)
        return []
    if kind == "launcher":
        victims, survivors = [launch.launchers[0].pid], list(range(WORLD))
    else:
        victim = rng.randrange(WORLD)
        victims = [pids[victim]]
        # torchrun tears down the victim's node-mates; the other node's ranks must fail in time
        survivors = [r for r in range(WORLD) if r // NPROC != victim // NPROC]
    killed_at = time.time()
    for pid in victims:
        kill_pid(pid)
    return _survivors_in_time(launch, survivors, pids, killed_at, result, kind)


def _survivors_in_time(launch: Launch, survivors: list[int], pids: dict[int, int], killed_at: float,
                       result: ModeResult, kind: str) -> list[str]:
    """Every survivor raises a CheckpointError and exits within BOUND_S of the kill."""
    problems = []
    deadline = killed_at + BOUND_S
    pending = set(survivors)
    exits: dict[int, float] = {}
    while pending and time.time() < deadline + 2:
        for r in list(pending):
            if not pid_alive(pids[r]):
                exits[r] = time.time() - killed_at
                pending.discard(r)
        time.sleep(0.02)
    for r in survivors:
        raised = launch.raised(r)
        if r in pending:
            problems.append(f"survivor rank {r} still running {time.time() - killed_at:.1f} s after the "
                            f"{kind} kill (bound {BOUND_S:g} s); raised: {raised}")
            continue
        if raised is None:
            problems.append(f"survivor rank {r} exited without raising (did it die? see node logs)\n"
                            f"{launch.log_text()}")
            continue
        took = raised["at"] - killed_at
        result.notes["survivor_raise_s"].append(round(took, 3))
        result.notes["survivor_exit_s"].append(round(exits[r], 3))
        if not raised["checkpoint_error"]:
            problems.append(f"survivor rank {r} raised {raised['type']}, not a CheckpointError: "
                            f"{raised['message']}\n{raised.get('traceback', '')}")
        if took > BOUND_S or exits[r] > BOUND_S:
            problems.append(f"survivor rank {r} raised after {took:.1f} s, exited after {exits[r]:.1f} s "
                            f"(bound {BOUND_S:g} s)")
        if kind == "launcher" and "torchrun agent of node 0" not in raised["message"]:
            problems.append(f"survivor rank {r} did not name the lost Store's host: {raised['message']}")
    return problems


def _refine(save_s: float, launch: Launch) -> float:
    """A running estimate of one save's duration, from rank 0's saving -> committed events."""
    began = {}
    for word, step, t in launch.events(0):
        if word == "saving":
            began[step] = t
        elif word == "committed" and step in began:
            save_s = 0.8 * save_s + 0.2 * (t - began[step])
    return save_s
