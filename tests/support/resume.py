"""Shared by test_dataloader_resume.py and test_ddp_resume.py: run tests/helpers/resume_trainer.py
uninterrupted, killed mid-epoch, and resumed, and compare the per-step records bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from support.paths import HELPERS, child_env

HELPER = HELPERS / "resume_trainer.py"


class Trainer:
    """The helper running in its own session, output to a file. `finish()` waits, then SIGKILLs
    the whole session: DataLoader workers orphaned by a SIGKILLed trainer do not always exit by
    themselves (they can block flushing prefetched batches that nobody reads)."""

    def __init__(self, root: Path, out: Path, *extra: str):
        self.log, self.name = out.with_suffix(".log"), out.name
        env = child_env(OMP_NUM_THREADS="1")
        with open(self.log, "wb") as sink:
            self.proc = subprocess.Popen([sys.executable, str(HELPER), str(root), str(out), *extra],
                                         env=env, stdout=sink, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        text = self.log.read_text(errors="replace")
        assert rc is not None, f"{self.name}: no exit within {timeout} s; output:\n{text[-3000:]}"
        return rc, text


def records(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def check_resume_is_bit_exact(tmp_path: Path, world: int) -> None:
    """Uninterrupted run vs. run SIGKILLed at step 15 of 26 (mid-epoch) + a resumed run."""
    args = ["--world", str(world), "--steps", "26", "--save-every", "4"]
    if world > 1:
        args += ["--workers", "0"]    # worker processes are covered by the one-process run
    full = Trainer(tmp_path / "ck_full", tmp_path / "full", *args)
    killed = Trainer(tmp_path / "ck", tmp_path / "killed", *args, "--kill-at", "15")
    rc, text = full.finish()
    assert rc == 0, text[-3000:]
    rc, text = killed.finish()
    if world == 1:
        assert rc == -signal.SIGKILL, f"rc={rc}\n{text[-3000:]}"
    else:
        assert rc == 0 and "killed" in text, f"rc={rc}\n{text[-3000:]}"
    rc, text = Trainer(tmp_path / "ck", tmp_path / "resumed", *args).finish()
    assert rc == 0, text[-3000:]
    per_epoch = 40 // 4 // world
    for rank in range(world):
        want = records(tmp_path / f"full.rank{rank}.jsonl")
        before = records(tmp_path / f"killed.rank{rank}.jsonl")
        after = records(tmp_path / f"resumed.rank{rank}.jsonl")
        assert sorted(want) == list(range(1, 27))
        assert max(before) == 14                      # the kill came at the start of step 15
        start = min(after)
        assert start in (5, 9, 13) and (start - 1) % per_epoch != 0, \
            f"rank {rank}: resumed after step {start - 1}, expected a mid-epoch checkpoint"
        assert sorted(after) == list(range(start, 27))
        for step, rec in {**before, **after}.items():
            assert rec == want[step], f"rank {rank} step {step}: {rec} != uninterrupted {want[step]}"
        # the resumed part crosses an epoch end, so the next epoch's order is checked too
        assert 26 > per_epoch * ((start - 1) // per_epoch + 1)
