"""The single-process kill modes: local raw, local zstd, S3. One saver process at a time (the
next one imports torch while the current one runs), SIGKILLed at a random instant of its save
cycle, then checked by `checks.Tracker` in this process."""
from __future__ import annotations

import json
import random
import shutil
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent

from .checks import Component, Run, Tracker
from .observe import local_snapshot, s3_snapshot
from .proc import Saver, TrialError
from .results import ModeResult, Progress
from .state import TortureState

STARTUP_TIMEOUT = 180.0
KEEP_LAST = 2
COMPONENT = "state"
# A request the killed saver had sent completely may still be applied by the S3 server right
# after the kill (a write probe appearing during the checks was seen): let those land first.
SETTLE_S = 1.0


@dataclass(frozen=True)
class SingleMode:
    name: str
    compression: str | None
    s3: bool
    save_s: float           # first guess of one save's duration (refined from the trials)


class Target:
    """Where a mode's checkpoints go: fresh roots (a new one after a failure), raw views."""

    def __init__(self, mode: SingleMode, workdir: Path, server=None):
        self.mode, self.workdir, self.server = mode, workdir, server
        self.client = server.client() if server is not None else None
        self.root = ""

    def fresh_root(self) -> str:
        if self.server is not None:
            self.root = f"s3://{self.server.make_bucket('torture')}/{self.mode.name}-{uuid.uuid4().hex[:8]}"
        else:
            self.root = str(self.workdir / f"{self.mode.name}-{uuid.uuid4().hex[:8]}")
        return self.root

    @property
    def options(self) -> dict | None:
        return self.server.storage_options() if self.server is not None else None

    def snapshot(self):
        root = self.root
        return s3_snapshot(self.client, root) if self.server is not None else local_snapshot(root)

    def remove(self, root: str) -> None:
        if self.server is None or self.client is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            bucket, prefix = root[len("s3://"):].split("/", 1)
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
                for obj in page.get("Contents", []):
                    self.client.delete_object(Bucket=bucket, Key=obj["Key"])
            for up in self.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/").get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])


def run_single(mode: SingleMode, kills: int, rng: random.Random, workdir: Path, mib: int,
               progress: Progress, server=None) -> ModeResult:
    result = ModeResult(mode.name, kind="kills")
    target = Target(mode, workdir, server)
    logs = workdir / f"{mode.name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tracker = _new_tracker(target, mib)
    save_s = mode.save_s
    warm: deque[Saver] = deque()

    def start(i: int) -> Saver:
        args = ["--keep-last", str(KEEP_LAST), "--idle", "0.05", "--mib", str(mib)]
        if mode.compression:
            args += ["--compression", mode.compression]
        if target.options:
            args += ["--storage-options", json.dumps(target.options)]
        # the root comes with "go": a failure may switch roots while this one imports torch
        return Saver(args, logs / f"saver-{i}.stderr")

    try:
        for trial in range(kills):
            while len(warm) < 2 and trial + len(warm) < kills:
                warm.append(start(trial + len(warm)))
            saver = warm.popleft()
            plan = ""
            try:
                saver.expect("loaded", STARTUP_TIMEOUT)
                first = saver.go(target.root, STARTUP_TIMEOUT)
                want = 0 if tracker.latest is None else tracker.latest + 1
                problems = [] if first == want else [
                    f"resumed at step {first}, the newest committed is {tracker.latest}"]
                plan = _kill_when_planned(saver, rng, save_s)
                saver.kill()
            except TrialError as exc:
                saver.stop()
                problems = [f"trial could not run: {exc}"]
                verdict = tracker.after_kill(trial, saver.run())
                result.record_failure(trial, verdict.landing, problems + verdict.problems, target.root,
                                      saver.lines, plan)
                _quarantine(result, target, tracker)
                tracker = _new_tracker(target, mib)
                progress.trial(result, trial, kills, "trial error")
                continue
            saver.stop()
            if server is not None:
                time.sleep(SETTLE_S)
            run = saver.run()
            save_s = _refine(save_s, saver.lines)
            verdict = tracker.after_kill(trial, run)
            result.record_kill(verdict, run, plan)
            if problems or verdict.problems:
                result.record_failure(trial, verdict.landing, problems + verdict.problems, target.root,
                                      saver.lines, plan)
                _quarantine(result, target, tracker)
                tracker = _new_tracker(target, mib)
            progress.trial(result, trial, kills, verdict.landing)
        _final_save(target, tracker, mode, mib, result, kills)
    finally:
        for saver in warm:
            saver.stop()
    result.seconds = time.monotonic() - started
    if not result.failures:
        target.remove(target.root)
    return result


def _new_tracker(target: Target, mib: int) -> Tracker:
    target.fresh_root()
    return Tracker(target.root, KEEP_LAST, [Component(COMPONENT, SharingPattern.GLOBAL, mib)],
                   target.snapshot, target.options)


def _quarantine(result: ModeResult, target: Target, tracker: Tracker) -> None:
    """Leave the root of a failed trial as it is (evidence); the next trial starts a fresh one."""
    result.kept_roots.append(tracker.root)


def _kill_when_planned(saver: Saver, rng: random.Random, save_s: float) -> str:
    """Sleep until the planned instant: anywhere in the first cycles after the saver opened the
    root, or inside its n-th save (from its "saving" line to about its expected end)."""
    if rng.random() < 0.45:
        delay = rng.uniform(0.0, 3 * (save_s + 0.05))
        time.sleep(delay)
        return f"{delay:.3f}s after ready"
    nth = rng.randint(1, 3)
    deadline = time.monotonic() + 60 + 10 * save_s * nth
    while saver.pending_saves() < nth:
        if time.monotonic() > deadline or saver.proc.poll() is not None:
            return f"save {nth} never started"
        time.sleep(0.002)
    delay = rng.uniform(0.0, 1.15 * save_s)
    time.sleep(delay)
    return f"{delay:.3f}s into save {nth}"


def _refine(save_s: float, lines: list[tuple[float, str]]) -> float:
    """A running estimate of one save's duration, from this saver's saving -> committed lines."""
    began = {}
    for t, line in lines:
        word, _, step = line.partition(" ")
        if word == "saving":
            began[step] = t
        elif word == "committed" and step in began:
            save_s = 0.8 * save_s + 0.2 * (t - began[step])
    return save_s


def _final_save(target: Target, tracker: Tracker, mode: SingleMode, mib: int, result: ModeResult,
                trials: int) -> None:
    """The next run after the last kill: resume, commit one step; then nothing any kill left may
    remain (scratch younger than the sweep's grace period excepted)."""
    step = 0 if tracker.latest is None else tracker.latest + 1
    state = TortureState(mib)
    state.set_step(step)
    run = Run(started=[(step, time.time())])
    try:
        with AsyncCheckpointer(target.root, [StateComponent(COMPONENT, state, SharingPattern.GLOBAL)],
                               storage_options=target.options, compression=mode.compression,
                               keep_last=KEEP_LAST) as ckpt:
            ckpt.save(step).wait()
            run.committed.append(step)
        run.retained.append(step)         # close() waited for its retention
    except Exception as exc:  # noqa: BLE001 - a save after the kills that fails is a finding
        result.record_failure(trials, "final save", [f"the save after the last kill failed: {exc!r}"],
                              target.root, [], "")
        return
    verdict = tracker.after_kill(trials, run, final=True)
    result.final_checked = True
    if verdict.problems:
        result.record_failure(trials, "final save", verdict.problems, target.root, [], "")
