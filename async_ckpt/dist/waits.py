"""Blocking Store waits on background threads, and the Store connections they use.

`Waits` is what a `StoreLink` hands its callers for "wake me when these keys exist": one
background thread per group of keys blocks in ``Store.wait`` on a connection of its own (a
waiting TCPStore client serves nobody else), re-arming every horizon, while the caller's thread
waits on an event with its own timeout and judges deadlines, liveness and failures (`dist.link`).

Call sequence: a link's owner (rank worker, node writer, coordinator) calls
``StoreLink.waits(seq, groups)`` -> `Waits` starts one thread per group, each taking an idle
connection from the process's `_Clients` (``link._waiter()``) -> the caller loops on
``wait(wake_s)`` (True once a group is complete, ``which`` says which; raises `StoreLost` if the
Store broke) -> ``abandon()`` when it stops waiting (the threads end at their next horizon) -> each
thread returns its connection (``link._release_waiter``) unless the Store broke.

Connections are created once per process and Store and shared by every link on that Store
(`_Clients`): creating a TCPStore client sometimes stalls for 5 s in its connect (dist/link.py).
"""
from __future__ import annotations

import datetime
import threading
from typing import Any

from ..errors import CheckpointError


def _is_timeout(exc: BaseException) -> bool:
    """A Store call that waited too long (the Store itself is fine)."""
    return "timeout" in type(exc).__name__.lower() or "timeout" in str(exc).lower()


class StoreLost(CheckpointError):
    """The torch.distributed Store stopped answering (its host process died, or the network to it
    did): no save can be coordinated any more. The message names the host."""


class _Clients:
    """This process's connections to one Store, shared by every link on it: one for short
    requests (a TCPStore client sends one request at a time under its own lock, so threads share
    it) and idle ones for blocking waits (a waiting connection serves nobody else)."""

    def __init__(self, base: Any):
        self.base = base
        self.shared: Any = None
        self.idle: list[Any] = []
        self.lock = threading.Lock()
        self.connect_lock = threading.Lock()


_clients: dict[int, _Clients] = {}
_clients_lock = threading.Lock()


def _clients_of(base: Any) -> _Clients:
    with _clients_lock:
        entry = _clients.get(id(base))
        if entry is None or entry.base is not base:
            entry = _clients[id(base)] = _Clients(base)
        return entry


class Waits:
    """Background blocking waits (for a `dist.link.StoreLink`), each for every key of one group, on connections of their own.
    `wait(t)` returns True once one group is complete (`which` says which), False after `t`
    seconds; `observe(event)` sets `event` then too. A thread whose group never completes
    re-arms every horizon until `abandon()`."""

    def __init__(self, link: Any, groups: list[list[str]], horizon_s: float):
        self._link, self._done, self._stop = link, threading.Event(), threading.Event()
        self._lock = threading.Lock()
        self._observers: list[threading.Event] = []
        self.which: int | None = None
        self.error: BaseException | None = None
        for index, keys in enumerate(groups):
            threading.Thread(target=self._run, args=(index, keys, horizon_s),
                             name="ckpt-store-wait", daemon=True).start()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def observe(self, event: threading.Event) -> None:
        with self._lock:
            if self._done.is_set():
                event.set()
            else:
                self._observers.append(event)

    def _run(self, index: int, keys: list[str], horizon_s: float) -> None:
        link = self._link
        try:
            client = link._waiter()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._finish(None, exc)
            return
        healthy = True
        try:
            while not self._stop.is_set():
                try:
                    client.wait(keys, datetime.timedelta(seconds=max(0.01, horizon_s)))
                    self._finish(index, None)
                    return
                except Exception as exc:  # noqa: BLE001 - timeouts re-arm; anything else is the Store
                    if not _is_timeout(exc):
                        healthy = False
                        link.lose(f"lost the torch.distributed Store ({link.host}): {exc}; its host "
                                  "process has probably died")
                        self._finish(None, StoreLost(link.lost or str(exc)))
                        return
        finally:
            if healthy:
                link._release_waiter(client)

    def _finish(self, index: int | None, error: BaseException | None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.which, self.error = index, error
            self._done.set()
            observers, self._observers = self._observers, []
        for event in observers:
            event.set()

    def wait(self, timeout: float) -> bool:
        if not self._done.wait(max(0.0, timeout)):
            return False
        if self.error is not None:
            raise self.error
        return True

    def abandon(self) -> None:
        self._stop.set()
