"""bench.torture: its checks have teeth (each kind of damage a kill could do is reported), and
the command runs end to end on a tiny profile. The kill trials themselves are tests/test_torture.py."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent
from bench.torture.__main__ import WEIGHTS, plan
from bench.torture.checks import Component, Run, Tracker
from bench.torture.observe import local_snapshot
from bench.torture.state import TortureState, check_state

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")     # the repository
MIB = 4
pytestmark = pytest.mark.bench


def save(root, steps, keep_last=None):
    state = TortureState(MIB)
    with AsyncCheckpointer(str(root), [StateComponent("state", state, SharingPattern.GLOBAL)],
                           keep_last=keep_last) as ckpt:
        for step in steps:
            state.set_step(step)
            ckpt.save(step).wait()
    return Run(started=[(s, time.time()) for s in steps], committed=list(steps), retained=list(steps))


def tracker(root, keep_last=2):
    return Tracker(str(root), keep_last, [Component("state", SharingPattern.GLOBAL, MIB)],
                   lambda: local_snapshot(str(root)))


def test_a_sound_root_passes_and_the_state_is_a_function_of_the_step(tmp_path):
    t = tracker(tmp_path)
    verdict = t.after_kill(0, save(tmp_path, [0, 1, 2], keep_last=2))
    assert verdict.problems == [] and verdict.listed == [1, 2] and verdict.loads == 2
    state = TortureState(MIB, salt=3)
    state.set_step(7)
    assert check_state(state.state_dict(), 7, MIB, 3) == []
    assert check_state(state.state_dict(), 6, MIB, 3) and check_state(state.state_dict(), 7, MIB, 2)


def test_a_corrupt_checkpoint_is_reported(tmp_path):
    run = save(tmp_path, [0, 1], keep_last=2)
    (data,) = (tmp_path / "step-0000000001").glob("data-*")
    with open(data, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    problems = tracker(tmp_path).after_kill(0, run).problems
    assert any("CorruptCheckpointError" in p for p in problems), problems


def test_a_lost_or_extra_checkpoint_is_reported(tmp_path):
    run = save(tmp_path, [0, 1, 2])                     # no retention ran: one step too many
    problems = tracker(tmp_path).after_kill(0, run).problems
    assert any("too many" in p for p in problems), problems
    shutil.rmtree(tmp_path / "step-0000000002")        # and the newest committed step is gone
    problems = tracker(tmp_path).after_kill(0, run).problems
    assert any("[2] are gone" in p for p in problems), problems


def _leave_garbage(root):
    stray = root / "step-0000000005"
    stray.mkdir(exist_ok=True)
    (stray / "data-n00000-r00000-0badf00d.bin").write_bytes(b"x" * 10)


def test_a_leftover_that_survives_a_later_commit_is_reported(tmp_path):
    t = tracker(tmp_path)
    assert t.after_kill(0, save(tmp_path, [0], keep_last=2)).problems == []
    _leave_garbage(tmp_path)
    assert t.after_kill(1, Run(started=[(5, time.time())])).problems == []   # no commit since: fine
    run = save(tmp_path, [1], keep_last=2)          # the engine removes it here ...
    assert not (tmp_path / "step-0000000005").exists()
    _leave_garbage(tmp_path)                        # ... had it not, this is what the checker sees
    problems = t.after_kill(2, run).problems
    assert any("0badf00d.bin (left by trial 1) survived a later commit" in p for p in problems), problems


def test_leftovers_removed_by_the_next_commit_pass(tmp_path):
    t = tracker(tmp_path)
    t.after_kill(0, save(tmp_path, [0], keep_last=2))
    _leave_garbage(tmp_path)
    t.after_kill(1, Run(started=[(5, time.time())]))
    verdict = t.after_kill(2, save(tmp_path, [1], keep_last=2))
    assert verdict.problems == [] and verdict.cleaned == 1 and verdict.garbage == 0


def test_a_folder_of_a_step_saved_anew_is_that_runs_own_leftover(tmp_path):
    """The full run's local-raw trial 360 (seed 0): trial 359 was killed staging step 5 (an empty
    folder); trial 360 resumed at 5, committed 5, 6, 7 and was killed inside the retention that
    removed 5, which left an empty folder of the same name. That folder is trial 360's leftover,
    not 359's surviving a commit; it must go with the next commit, and is reported if it does not."""
    t = tracker(tmp_path)
    assert t.after_kill(0, save(tmp_path, [3, 4], keep_last=2)).problems == []
    (tmp_path / "step-0000000005").mkdir()                  # trial 1: killed staging step 5
    assert t.after_kill(1, Run(started=[(5, time.time())])).problems == []
    run = save(tmp_path, [5, 6, 7], keep_last=2)            # trial 2 re-saves 5 ...
    run.retained.pop()                                       # ... killed in the retention of 7
    (tmp_path / "step-0000000005").mkdir()                  # which was removing step 5
    verdict = t.after_kill(2, run)
    assert verdict.problems == [] and verdict.garbage == 1, verdict
    run = save(tmp_path, [8], keep_last=2)                   # the next commit removes it ...
    assert not (tmp_path / "step-0000000005").exists()
    (tmp_path / "step-0000000005").mkdir()                  # ... had it not:
    problems = t.after_kill(3, run).problems
    assert problems == ["empty folder step-0000000005 (left by trial 2) survived a later commit"], problems


def test_the_full_profile_spreads_at_least_a_thousand_kills():
    counts = plan(",".join([*WEIGHTS, "disk-full"]), 1000)
    kills = sum(n for m, n in counts.items() if m != "disk-full")
    assert kills >= 1000 - len(WEIGHTS) and counts["s3"] >= 100, counts
    assert sum(n for m, n in counts.items() if m.startswith("torchrun")) >= 50, counts
    assert plan("local-raw=7,s3", 20) == {"local-raw": 7, "s3": 13}


def test_the_command_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "torture.json"
    proc = subprocess.run([sys.executable, "-m", "bench.torture", "--modes", "local-raw=2,disk-full=2",
                           "--mib", str(MIB), "--out", str(out), "--dir", str(tmp_path), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    modes = {m["mode"]: m for m in doc["modes"]}
    assert modes["local-raw"]["kills"] == 2 and modes["local-raw"]["final_checked"]
    assert modes["disk-full"]["kills"] == 2 and not modes["disk-full"]["failures"]
    assert out.with_suffix(".md").read_text().startswith("| mode | kills |")
    assert [p.name for p in tmp_path.iterdir()] == ["torture.json", "torture.md"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["torture.json", "torture.md"]
