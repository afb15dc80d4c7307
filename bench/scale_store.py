"""Counting Store requests for `bench.scale`: a Store client wrapper that counts each request
(round trip) per role, and the loopback TCPStore and `StoreLink`s the simulated saves use."""
from __future__ import annotations

import datetime
import threading
from collections import Counter
from typing import Any

from async_ckpt.dist.link import StoreLink


class Tally:
    """Store requests of one role, by operation (thread-safe)."""

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, op: str, n: int = 1) -> None:
        with self._lock:
            self.ops[op] += n

    def total(self) -> int:
        with self._lock:
            return sum(n for op, n in self.ops.items() if op != "connect")

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.ops)


ROUND_TRIPS = ("set", "get", "add", "check", "delete_key", "wait", "multi_get", "multi_set",
               "compare_set", "append", "num_keys")


class CountingStore:
    """A Store (client) that counts each request it sends; its clones count into the same Tally.
    ``clone()`` is counted as "connect" (a new TCP connection), not as a round trip."""

    def __init__(self, store: Any, tally: Tally):
        self._store, self._tally = store, tally

    def clone(self) -> "CountingStore":
        self._tally.add("connect")
        return CountingStore(self._store.clone(), self._tally)

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._store.set_timeout(timeout)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in ROUND_TRIPS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._tally.add(name)
            return attr(*args, **kwargs)
        return counted


def new_store() -> Any:
    from torch.distributed import TCPStore
    return TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=600),
                    wait_for_workers=False)


def link_for(master: Any, ns: str, tally: Tally, timeout_s: float = 600.0) -> StoreLink:
    return StoreLink(CountingStore(master, tally), ns, timeout_s, "the bench's TCPStore")


def warm(link: StoreLink, waiters: int = 3) -> None:
    """Every connection the link will use, made now: a TCPStore connect sometimes stalls for 5 s
    (docs/distributed.md), which is no part of a save's cost (the library connects ahead)."""
    link.has(0, "warm-up")
    if hasattr(link, "_release_waiter"):           # connections for blocking waits
        for _ in range(waiters):
            link._release_waiter(link._connect())
