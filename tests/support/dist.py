"""Launching real multi-process, multi-node runs for the distributed tests.

`launch` starts one torchrun launcher per simulated node on this machine (``--nnodes=N
--node-rank=i``, static rendezvous on a free loopback port), exactly as a two-node job would be
started, each running tests/helpers/dist_worker.py with a scenario. Ranks write their
observations as JSON under `out`; the tests assert on those.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
