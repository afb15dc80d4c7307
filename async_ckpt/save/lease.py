"""The writer lease: how a process that saves under a root tells cleanup tools (``async-ckpt gc``)
that it may be writing there, and how such a tool tells a live writer from a dead one.

Each node writer (local rank 0 of every node of a saving job) keeps one small JSON object at the
root, ``.writer-lease-<random>.json``: host, pid, pid namespace, when it started, a heartbeat
time and how long the lease stays valid without one. It is written before the first data of the
first save and refreshed every ``REFRESH_S`` seconds by a timer thread of its own (never by the
training thread, so ``save()`` never waits for it), and removed by ``close()``. A process killed
with SIGKILL leaves it behind: it is stale ``STALE_AFTER_S`` seconds after its last heartbeat, or
at once when it names a process of this host (and pid namespace) that is gone.

Call sequence: ``AsyncCheckpointer._start`` builds a `LeaseKeeper` and queues ``acquire`` on the
node writer thread ahead of the first save (so the lease exists before any data file); it opens
the root as a Storage of its own, so lease requests never mix with the data's; the keeper
thread refreshes; ``AsyncCheckpointer.close`` calls ``release`` (stop the thread, delete the
object). Tools call ``read_leases`` and ``Lease.stale_reason``. The lease never blocks a save:
every storage failure here is logged and retried at the next heartbeat. If the object vanishes
(someone removed it, or the whole root), the keeper stops instead of recreating it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..storage import Storage

log = logging.getLogger("async_ckpt")

PREFIX = ".writer-lease-"
REFRESH_S = 10.0
STALE_AFTER_S = 60.0


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Lease:
    """One lease as read back; `doc` is None when its object could not be parsed (it may be
    being rewritten right now: treat it as live)."""

    name: str
    doc: dict[str, Any] | None

    def field(self, key: str) -> Any:
        return self.doc.get(key) if self.doc else None

    def age_s(self, now: float | None = None) -> float | None:
        beat = self.field("heartbeat")
        return None if not isinstance(beat, (int, float)) else (now or time.time()) - beat

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why this lease no longer protects anything, or None while its writer may be alive."""
        age = self.age_s(now)
        if age is None:
            return None
        ttl = self.field("stale_after_s")
        ttl = ttl if isinstance(ttl, (int, float)) and ttl > 0 else STALE_AFTER_S
        if age > ttl:
            return f"no heartbeat for {age:.0f} s (stale after {ttl:.0f} s)"
        pid = self.field("pid")
        if (self.field("host") == socket.gethostname() and self.field("pidns") == _pid_namespace()
                and isinstance(pid, int) and not _pid_alive(pid)):
            return f"process {pid} on this host has exited"
        return None

    def describe(self, now: float | None = None) -> str:
        if self.doc is None:
            return f"{self.name} (unreadable: being rewritten, or damaged)"
        age = self.age_s(now)
        beat = "?" if age is None else f"{max(age, 0.0):.0f} s ago"
        return (f"host {self.field('host')} pid {self.field('pid')} (rank {self.field('rank')}), "
                f"heartbeat {beat}, lease {self.name}")


def read_leases(storage: Storage) -> list[Lease]:
    """Every writer lease under the root, live or stale."""
    found = []
    for name in storage.list_dir(""):
        if not (name.startswith(PREFIX) and name.endswith(".json")):
            continue
        try:
            doc = json.loads(storage.read_bytes(name))
        except FileNotFoundError:
            continue                          # released meanwhile
        except ValueError:
            doc = None
        found.append(Lease(name, doc if isinstance(doc, dict) else None))
    return found


class LeaseKeeper:
    """Holds this node writer's lease; see the module docstring for who calls what."""

    def __init__(self, open_root: Callable[[], Storage], rank: int, alive: Callable[[], bool] = lambda: True):
        """`open_root` opens the root as a Storage of the lease's own (on the writer thread): the
        lease's requests never share a client, a retry budget or instrumentation with the data."""
        self.open_root, self.rank, self.alive = open_root, rank, alive
        self.storage: Storage | None = None
        self.name = f"{PREFIX}{os.urandom(6).hex()}.json"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written = False

    def _doc(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
                           "rank": self.rank, "started": self.started, "heartbeat": time.time(),
                           "refresh_s": REFRESH_S, "stale_after_s": STALE_AFTER_S}).encode()

    def _write(self) -> bool:
        """Write (or rewrite) the lease; False once it should no longer be kept."""
        try:
            if self.storage is None:
                self.storage = self.open_root()
            storage = self.storage
            if self._written and not storage.exists(self.name):
                log.warning("[rank %d] writer lease %s was removed by someone else; no longer "
                            "refreshing it", self.rank, storage.child_url(self.name))
                return False
            writer = storage.open_writer(self.name)
            try:
                writer.write(memoryview(self._doc()))
                writer.commit()
            except BaseException:
                writer.abort()
                raise
            self._written = True
        except Exception as exc:  # noqa: BLE001 - the lease must never fail a save
            log.warning("[rank %d] could not write the writer lease %s: %s", self.rank, self.name, exc)
        return True

    def acquire(self) -> None:
        """Write the lease and start refreshing it (node writer thread, before the first save)."""
        if self._thread is not None or self._stop.is_set():
            return
        self._write()
        self._thread = threading.Thread(target=self._loop, name="ckpt-lease", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            if not self.alive() or not self._write():
                return

    def release(self) -> None:
        """Stop refreshing and remove the lease (close())."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._written and self.storage is not None:
            try:
                self.storage.delete(self.name)
            except Exception as exc:  # noqa: BLE001 - a stale lease expires by itself
                log.warning("[rank %d] could not remove the writer lease %s: %s", self.rank,
                            self.storage.child_url(self.name), exc)
