"""Helpers of the command-line tests (tests/test_cli*.py): running `python -m async_ckpt` as a
subprocess, the deterministic checkpoints the tests look at, and checks every failure must pass
(one line on stderr, a non-zero status)."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch

import async_ckpt as ac

from .paths import REPO, child_env
from .stateful import Holder

G = ac.SharingPattern.GLOBAL


def run_cli(*args: Any, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m async_ckpt ARGS` in a subprocess (stdout/stderr captured: not a terminal)."""
    return subprocess.run([sys.executable, "-m", "async_ckpt", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=child_env(**(env or {})), cwd=REPO)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def fails(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The command failed with `code` and said why in exactly one line naming `words`."""
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("async-ckpt: error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def as_json(proc: subprocess.CompletedProcess) -> Any:
    return json.loads(ok(proc))


def model(step: int) -> torch.nn.Module:
    torch.manual_seed(step)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    net.register_buffer("scale16", torch.linspace(0, 1, 8, dtype=torch.bfloat16))
    return net


def extra(step: int) -> dict:
    """A component with tensors of several dtypes, tied tensors and plain values."""
    shared = torch.arange(6, dtype=torch.int64) + step
    return {"ids": shared, "same_ids": shared, "mask": torch.arange(5) % 2 == 0,
            "step": step, "lr": 0.1 if step < 300 else 0.05, "name": "run", "empty": {}}


def save_steps(root: Any, steps=(100, 200, 300, 400), storage_options: dict | None = None,
               **options: Any) -> None:
    """Steps of `model`/`extra`; step 400's loss arrives late (report_metrics)."""
    for step in steps:
        comps = [ac.StateComponent("model", model(step), G), ac.StateComponent("extra", Holder(extra(step)), G)]
        with ac.AsyncCheckpointer(root, comps, storage_options=storage_options, **options) as ck:
            ck.save(step, metrics=None if step == 400 else {"loss": 1.0 / step}).wait()
            if step == 400:
                ck.report_metrics(400, {"loss": 0.001})


def same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
