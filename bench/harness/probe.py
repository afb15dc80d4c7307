"""Host-memory and CPU probes around one save: peak RSS from a sampling thread, and the CPU
seconds spent by threads other than the caller's (the background work a save costs)."""
from __future__ import annotations

import os
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size, shared memory included (/dev/shm staging buffers count too)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssPeak:
    """Samples RSS every `interval` s while active; `peak` is the highest value seen."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RssPeak":
        self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class CpuClock:
    """Process CPU time minus this thread's CPU time between start and stop: what background
    threads (writers, hashers, compressors, DCP's executor) burned. The RSS sampler's own share
    is a few ms per second and is left in (it is the same for every method)."""

    def start(self) -> "CpuClock":
        self.p0, self.t0 = time.process_time(), time.thread_time()
        return self

    def stop(self) -> tuple[float, float]:
        """(background CPU s, total CPU s)"""
        dp, dt = time.process_time() - self.p0, time.thread_time() - self.t0
        return max(0.0, dp - dt), dp
