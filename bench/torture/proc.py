"""Child processes of the torture: a saver speaking the line protocol of `saver.py`, and the
shared bits (environment, killing by PID)."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .checks import Run

REPO = Path(__file__).resolve().parents[2]


class TrialError(Exception):
    """The trial could not be run as planned (a child died on its own, a line never came)."""


def child_env(**extra: str) -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH and one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a dead child of someone else's that was not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Saver:
    """One `saver.py` process; a thread collects its stdout lines with their wall times."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self._err = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.torture.saver", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     env=child_env(), cwd=REPO)
        self.lines: list[tuple[float, str]] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._queue.put((time.time(), raw.decode(errors="replace").strip()))
        self._queue.put(None)

    def stderr(self, n: int = 3000) -> str:
        self._err.flush()
        return self.log.read_text(errors="replace")[-n:]

    def expect(self, prefix: str, timeout: float) -> str:
        """Wait for the next line starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TrialError(f"no {prefix!r} line within {timeout} s (last lines "
                                 f"{[t for _, t in self.lines[-3:]]})") from None
            if item is None:
                self._queue.put(None)
                raise TrialError(f"the saver exited (rc={self.proc.wait()}) before {prefix!r}; "
                                 f"last lines {[t for _, t in self.lines[-3:]]}; stderr:\n{self.stderr()}")
            self.lines.append(item)
            if item[1].startswith("failed"):
                raise TrialError(f"a save failed: {item[1]}; stderr:\n{self.stderr()}")
            if item[1].startswith(prefix):
                return item[1]

    def go(self, root: str, timeout: float) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"go {root}\n".encode())
        self.proc.stdin.flush()
        return int(self.expect("ready", timeout).split()[1])

    def kill(self) -> None:
        if self.proc.poll() is not None:
            raise TrialError(f"the saver died on its own (rc={self.proc.returncode}) before the kill; "
                             f"last lines {[t for _, t in self.lines[-3:]]}; stderr:\n{self.stderr()}")
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.drain()

    def drain(self) -> None:
        """Collect every line the dead process wrote."""
        while True:
            try:
                item = self._queue.get(timeout=10)
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            self.lines.append(item)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)
        self._err.close()

    def run(self) -> Run:
        run = Run()
        for t, line in self.lines:
            word, _, rest = line.partition(" ")
            if word == "saving":
                run.started.append((int(rest), t))
            elif word == "committed":
                run.committed.append(int(rest))
            elif word == "retained":
                run.retained.append(int(rest))
        run.last_line = self.lines[-1][1] if self.lines else ""
        return run

    def pending_saves(self) -> int:
        """How many "saving" lines have arrived so far (without blocking)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            self.lines.append(item)
        return sum(1 for _, line in self.lines if line.startswith("saving"))
