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

Exiting (`in_store`, `exiting`): a daemon thread that is inside a Store call (a connect, a
heartbeat, a request) when the interpreter starts finalizing aborts the whole process when the
call returns (CPython 3.11 ends such a thread with ``pthread_exit``, whose unwinding through
torch's bindings calls ``std::terminate``: "terminate called without an active exception", exit
status -6, seen as a failed rank by torchrun). So every Store call of this package runs inside
``in_store(link)``, and a hook run at interpreter exit (threading's exit hooks: after the
checkpointers' own close-at-exit, before finalization) stops new background calls and waits, at
most `EXIT_DRAIN_S`, until none is in flight (a call on a link already counted lost is not
waited for: its Store is gone and it returns only at its own timeout). A blocking wait that nobody awaits any more (a
failed save's) is not counted: it returns only when its keys appear or its horizon passes, and
cannot be interrupted (docs/distributed.md).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import threading
import time
from typing import Any, Iterator

from ..errors import CheckpointError

log = logging.getLogger("async_ckpt")
EXIT_DRAIN_S = 10.0      # how long interpreter exit waits for Store calls in flight (a stalled connect: 5 s)


def _is_timeout(exc: BaseException) -> bool:
    """A Store call that waited too long (the Store itself is fine)."""
    return "timeout" in type(exc).__name__.lower() or "timeout" in str(exc).lower()


def store_host() -> str:
    """Who hosts the default group's Store, for messages: torchrun's agent on node 0 (workers
    reuse its store) or, without torchrun, rank 0's process; at MASTER_ADDR:MASTER_PORT."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"the torchrun agent of node 0 at {where}"
    return f"rank 0's process at {where}"


class StoreLost(CheckpointError):
    """The torch.distributed Store stopped answering (its host process died, or the network to it
    did): no save can be coordinated any more. The message names the host."""


class _InStore:
    """This process's Store calls in flight, and whether the interpreter is exiting (see the module)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []        # the link of each call in flight
        self.exiting = False
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def call(self, link: Any) -> Iterator[None]:
        with self.cond:
            self.calls.append(link)
        try:
            yield
        finally:
            with self.cond:
                self.calls.remove(link)
                self.cond.notify_all()

    def _settled(self) -> bool:
        # A call on a link already counted lost (its Store is gone; it returns only when its own
        # timeout passes, up to the Store's timeout) is not waited for: waiting would only move
        # the exit closer to the moment it returns.
        return all(getattr(link, "lost", None) for link in self.calls)

    def drain(self, limit_s: float = EXIT_DRAIN_S) -> bool:
        """At interpreter exit: no new background calls; wait until none is in flight (bounded)."""
        deadline = time.monotonic() + limit_s
        with self.cond:
            self.exiting = True
            while not self._settled():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%d torch.distributed Store call(s) still in flight at exit after %g s",
                                len(self.calls), limit_s)
                    return False
                self.cond.wait(min(left, 0.1))
        return True


_in_store = _InStore()
in_store = _in_store.call


def exiting() -> bool:
    """Whether the interpreter is exiting: background threads start no new Store call."""
    return _in_store.exiting


def _forked_child() -> None:
    """A forked child (a DataLoader worker, say) has none of this process's threads: the calls
    its copy lists are not its own, and it must not wait for them at its exit."""
    _in_store.calls.clear()
    _in_store.cond = threading.Condition()


# Registered once, at import, before any checkpointer registers its close-at-exit hook: threading
# runs these hooks last-registered first, so the drain comes after every close.
getattr(threading, "_register_atexit", atexit.register)(_in_store.drain)
os.register_at_fork(after_in_child=_forked_child)


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
            while not self._stop.is_set() and not exiting():
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
