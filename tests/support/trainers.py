"""Shared by tests/test_trainers.py and tests/test_integrations.py: run a trainer helper
uninterrupted, SIGKILLed (mid-training or during a save) and resumed, and compare the runs loss by
loss (``==`` on the hex of every loss) and by the checkpoints they retained."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from support.net import free_port
from support.paths import HELPERS, child_env


def start(script: str, kind: str, root: Path, out: Path, *extra: str, nproc: int = 1) -> subprocess.Popen:
    """The helper as one process (nproc=1) or under torchrun (a real launcher, gloo)."""
    cmd = [sys.executable, str(HELPERS / script), kind, str(root), str(out), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--rdzv-backend=static", f"--master-port={free_port()}", "--master-addr=127.0.0.1",
               "--max-restarts=0", *cmd[1:]]
    log = open(out.with_suffix(".log"), "wb")
    return subprocess.Popen(cmd, env=child_env(OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 180) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    text = out.with_suffix(".log").read_text(errors="replace")
    assert rc is not None, f"{out.name}: no exit within {timeout} s\n{text[-4000:]}"
    return rc, text


def losses(out: Path, rank: int) -> dict[int, str]:
    path = Path(f"{out}.rank{rank}.jsonl")
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in recs}


def check_kill_and_resume(tmp: Path, script: str, kind: str, *, nproc: int = 1, steps: int = 16,
                          kill: tuple[str, int] = ("--kill-at", 11), extra: tuple[str, ...] = ()) -> None:
    """Uninterrupted run and killed run side by side, then the resume; every loss of the killed
    and resumed runs equals the uninterrupted one's, and the retained checkpoints are the same.
    `extra`: more arguments for every run. The uninterrupted run's checkpoints stay in
    ``tmp/ck_full`` (a caller may resume them at another topology)."""
    full, killed, resumed = tmp / "full", tmp / "killed", tmp / "resumed"
    args = ("--steps", str(steps), *extra)
    procs = [start(script, kind, tmp / "ck_full", full, *args, nproc=nproc),
             start(script, kind, tmp / "ck", killed, *args, kill[0], str(kill[1]), nproc=nproc)]
    rc, text = finish(procs[0], full)
    assert rc == 0, text[-4000:]
    rc, text = finish(procs[1], killed)
    assert rc != 0, f"the killed run exited {rc}\n{text[-3000:]}"
    rc, text = finish(start(script, kind, tmp / "ck", resumed, *args, nproc=nproc), resumed)
    assert rc == 0, text[-4000:]
    for rank in range(nproc):
        want, before, after = losses(full, rank), losses(killed, rank), losses(resumed, rank)
        assert sorted(want) == list(range(1, steps + 1)), f"rank {rank}: {sorted(want)}"
        assert before and max(before) <= kill[1] and after and max(after) == steps
        assert min(after) <= max(before) + 1, f"rank {rank}: resumed at {min(after)}, killed after {max(before)}"
        assert min(after) > 1, f"rank {rank}: the resumed run started from scratch"
        for step, loss in {**before, **after}.items():
            assert loss == want[step], f"{kind} rank {rank} step {step}: {loss} != uninterrupted {want[step]}"
    kept_full = json.loads(Path(f"{full}.retained.json").read_text())
    kept = json.loads(Path(f"{resumed}.retained.json").read_text())
    assert kept == kept_full, f"retained {kept} != uninterrupted {kept_full}"
