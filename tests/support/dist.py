"""Launching real multi-process, multi-node runs for the distributed tests.

`launch` starts one torchrun launcher per simulated node on this machine (``--nnodes=N
--node-rank=i``, static rendezvous on a free loopback port), exactly as a two-node job would be
started, each running tests/helpers/dist_worker.py with a scenario. Ranks write their
observations as JSON under `out`; the tests assert on those. `run_plan` runs several scenarios in
one launch (a launch costs every rank a torch import and a rendezvous: seconds each on a small
machine), for tests that check different properties of the same kind of run; the fixture
`dist_saved` (a pytest plugin: tests/conftest.py) is the `save` scenario's checkpoint, launched
once per session for test_distributed.py and test_cli_dist.py, which only read it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.net import free_port
from support.paths import HELPERS, child_env

WORKER = HELPERS / "dist_worker.py"


class Launch:
    def __init__(self, procs: list[subprocess.Popen], logs: list[Path], out: Path):
        self.procs, self.logs, self.out = procs, logs, out

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.terminate()
                raise AssertionError(f"launch did not finish within {timeout} s\n{self.log_text()}")
        return codes

    def wait_results(self, scenario: str, ranks: list[int], timeout: float) -> dict[int, dict]:
        """Poll until these ranks reported (other launchers may never exit: torchrun's agents
        wait at an exit barrier for a node that lost a rank), then stop every launcher."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.results(scenario)
            if all(r in found for r in ranks):
                self.terminate()
                return found
            time.sleep(0.5)
        self.terminate()
        raise AssertionError(f"ranks {ranks} did not report within {timeout} s\n{self.log_text()}")

    def terminate(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-6000:]}"
                         for p in self.logs if p.exists())

    def results(self, scenario: str) -> dict[int, dict]:
        found = {}
        for path in self.out.glob(f"{scenario}-r*.json"):
            found[int(path.stem.rsplit("-r", 1)[1])] = json.loads(path.read_text())
        return found


def launch(scenario: str, root: Path, out: Path, *, nnodes: int = 2, nproc: int = 2,
           args: tuple[str, ...] = (), env: dict | None = None, worker: Path = WORKER) -> Launch:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for node in range(nnodes):
        log = out / f"{scenario}-node{node}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
               f"--node-rank={node}", f"--nproc-per-node={nproc}", "--rdzv-backend=static",
               "--master-addr=127.0.0.1", f"--master-port={port}", "--monitor-interval=0.2",
               str(worker), scenario, str(root), str(out), *args]
        # Ranks import the checkout under test, whatever the environment has installed.
        full_env = child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                          start_new_session=True))
        logs.append(log)
    return Launch(procs, logs, out)


def run(scenario: str, root: Path, out: Path, *, timeout: float = 240, **kwargs) -> dict[int, dict]:
    """Launch, require every launcher to succeed, return each rank's results."""
    started = launch(scenario, root, out, **kwargs)
    codes = started.wait(timeout)
    assert codes == [0] * len(codes), f"launchers exited with {codes}\n{started.log_text()}"
    results = started.results(scenario)
    world = kwargs.get("nnodes", 2) * kwargs.get("nproc", 2)
    assert sorted(results) == list(range(world)), f"missing rank results\n{started.log_text()}"
    return results


def run_plan(steps: list[tuple[str, str, Path, tuple[str, ...]]], out: Path, *, timeout: float = 600,
             **kwargs) -> dict[str, dict[int, dict]]:
    """One launch running the scenarios `steps` one after the other, each a (label, scenario, root,
    args) as `run(scenario, root, ..., args=args)` would run it (dist_worker.py's `run_plan`);
    every launcher must succeed. Each label's results, by rank."""
    out.mkdir(parents=True, exist_ok=True)
    plan = out / "plan.json"
    plan.write_text(json.dumps([{"label": label, "scenario": scenario, "root": str(root), "args": list(args)}
                                for label, scenario, root, args in steps]))
    started = launch("plan", out, out, args=(str(plan),), **kwargs)
    codes = started.wait(timeout)
    assert codes == [0] * len(codes), f"launchers exited with {codes}\n{started.log_text()}"
    world = kwargs.get("nnodes", 2) * kwargs.get("nproc", 2)
    found = {}
    for label, *_ in steps:
        found[label] = started.results(label)
        assert sorted(found[label]) == list(range(world)), f"missing rank results of {label}\n{started.log_text()}"
    return found


@pytest.fixture(scope="session")
def dist_saved(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """Steps 1 and 2 saved by 4 ranks on 2 nodes with every sharing pattern (dist_worker.py's
    `save`): the root, and each rank's results. Its users only read it."""
    base = tmp_path_factory.mktemp("dist-saved")
    root = base / "ckpt"
    return root, run("save", root, base / "out-save")
