"""Helpers of the command-line tests (tests/test_cli*.py): running the `async-ckpt` command, the
deterministic checkpoints the tests look at, and checks every failure must pass (one line on
stderr, a non-zero status).

Two ways to run a command, with the same result type (`subprocess.CompletedProcess`: the exit
status, stdout and stderr as text), so `ok`, `fails` and `as_json` check both alike:

- `run_cli`: in this process, through Click's `CliRunner` isolation calling `async_ckpt.cli.main`
  (the console script's own entry: same error handling, exit statuses and one-line errors). It
  saves the 2-4 s torch import a subprocess pays per call. What a fresh process would not share
  is isolated per call: stdout/stderr (captured, not a terminal), stdin (empty), the environment
  (`env` applied, everything restored afterwards, also what the command itself sets, e.g.
  --debug), the working directory (the checkout, as for `spawn_cli`), the root logger (emptied
  so the command's `logging.basicConfig` writes to its own stderr, restored afterwards) and
  Python's warning filters (the interpreter's defaults, printed to the command's stderr).
  Storage objects are made per command (the S3 backend skips fsspec's instance cache).
- `spawn_cli`: `python -m async_ckpt` as a real subprocess, for the tests where the process is
  the property: exit statuses seen by the parent, a terminal on stderr, a fresh interpreter's
  environment (credentials from AWS_* variables), and one end-to-end run per command family.
  `end_to_end` runs a command both ways and requires the same status, stdout and own stderr lines.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from typing import Any

import torch

import async_ckpt as ac

from .paths import REPO, child_env
from .stateful import Holder

G = ac.SharingPattern.GLOBAL


def spawn_cli(*args: Any, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m async_ckpt ARGS` in a subprocess (stdout/stderr captured: not a terminal)."""
    return subprocess.run([sys.executable, "-m", "async_ckpt", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=child_env(**(env or {})), cwd=REPO)


def end_to_end(*args: Any, env: dict | None = None) -> subprocess.CompletedProcess:
    """`spawn_cli`, then `run_cli` on the same arguments, which must report the very same exit
    status, stdout and lines of the command's own on stderr (``async-ckpt: ...``: errors and log
    records; not what a fresh interpreter may print while importing torch on some machines): the
    in-process runner's own check. The subprocess's result. Only for commands that change
    nothing and print no timings (ls, inspect, diff, failures)."""
    proc = spawn_cli(*args, env=env)
    here = run_cli(*args, env=env)

    def seen(p: subprocess.CompletedProcess) -> tuple[int, str, list[str]]:
        return p.returncode, p.stdout, [ln for ln in p.stderr.splitlines() if ln.startswith("async-ckpt:")]
    assert seen(here) == seen(proc), (
        f"in process: exit {here.returncode}\n{here.stdout}\n{here.stderr}\n"
        f"subprocess: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(*args: Any, env: dict | None = None) -> subprocess.CompletedProcess:
    """`async-ckpt ARGS` in this process (module docstring: what is isolated), as `spawn_cli`
    would report it."""
    from click.testing import CliRunner

    from async_ckpt.cli import main
    argv = [str(a) for a in args]
    saved_env, cwd = dict(os.environ), os.getcwd()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        with CliRunner().isolation(env=env) as (out, err, _), warnings.catch_warnings():
            _fresh_warning_filters()
            os.chdir(REPO)
            code = main(argv)
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(cwd)
    return subprocess.CompletedProcess(["async-ckpt", *argv], code, stdout, stderr)


def _fresh_warning_filters() -> None:
    """A fresh interpreter's warning filters (no -W, no PYTHONWARNINGS), printed to sys.stderr
    (this run's stderr) rather than collected by pytest."""
    warnings.resetwarnings()
    for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    warnings.showwarning = show


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
