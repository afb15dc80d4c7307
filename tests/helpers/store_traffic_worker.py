"""One rank of tests/test_store_traffic.py, started by torchrun: counts every request this process
sends to the torch.distributed Store while it saves, by operation and key.

Usage: store_traffic_worker.py traffic <checkpoint root> <output dir> <slow seconds>
Writes ``<out>/traffic-r<rank>.json``: per steady-state save the requests by "op key-kind"
(heartbeats apart), the request rate of this process while a save that node 1's writer makes
slow is in flight, and how a save went whose outcome node 1's board never showed.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent
from support.stateful import Holder   # tests/ is on PYTHONPATH: support.paths.child_env()
from async_ckpt import end_process

ROOT, OUT, SLOW_S = sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
ROUND_TRIPS = ("set", "get", "add", "check", "delete_key", "wait", "multi_get", "multi_set",
               "compare_set", "append", "num_keys")
COUNTS: Counter[str] = Counter()
LOCK = threading.Lock()


def kind(key: str) -> str:
    """``async_ckpt/<digest>/<n>/<seq>/<name>/...`` -> name ("vh", "outcome", ...); heartbeats
    (``.../hb/<rank>``) -> "hb"; other namespaces -> "other"."""
    parts = key.split("/")
    if len(parts) >= 4 and parts[0] == "async_ckpt":
        return "hb" if parts[3] == "hb" else (parts[4] if len(parts) > 4 else parts[3])
    return "other"


class Counting:
    """The default Store, counting each request by "op kind"; clones count into the same tally."""

    def __init__(self, store: Any):
        self._store = store

    def clone(self) -> "Counting":
        with LOCK:
            COUNTS["connect"] += 1
        return Counting(self._store.clone())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in ROUND_TRIPS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else ""
            key = first[0] if isinstance(first, list) and first else first
            with LOCK:
                COUNTS[f"{name} {kind(str(key))}"] += 1
            return attr(*args, **kwargs)
        return counted


def snapshot() -> Counter[str]:
    with LOCK:
        return Counter(COUNTS)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    node = int(os.environ["GROUP_RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    counting = Counting(distributed_c10d._get_default_store())
    distributed_c10d._get_default_store = lambda: counting    # what StoreLink connects through
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    mine = Holder({"w": torch.full((8,), float(rank))})
    comps = [StateComponent("model", model, SharingPattern.REPLICATED),
             StateComponent("mine", mine, SharingPattern.PER_RANK)]
    saves, rates = [], {}
    with AsyncCheckpointer(ROOT, comps, keep_last=2) as ckpt:
        ckpt.save(1).wait()                # connections, first-time checks
        for step in (2, 3, 4):
            before, t0 = snapshot(), time.monotonic()
            ckpt.save(step).wait()
            ckpt.wait()                    # rank 0: retention has run
            delta = snapshot() - before
            saves.append({"ops": dict(delta), "seconds": time.monotonic() - t0})
        if local_rank == 0 and node == 1:  # node 1's writer takes SLOW_S to open its data object
            real = ckpt.storage.open_segmented

            def slow(path: str, capacities: Any) -> Any:
                time.sleep(SLOW_S)
                return real(path, capacities)
            ckpt.storage.open_segmented = slow  # type: ignore[method-assign]
        handle = ckpt.save(5)
        time.sleep(1.0)                    # past the save's own requests
        a, ta = snapshot(), time.monotonic()
        time.sleep(SLOW_S - 2.0)
        b, tb = snapshot(), time.monotonic()
        in_flight = not handle.done()
        handle.wait()
        window = b - a
        rates = {"requests": sum(window.values()), "seconds": tb - ta, "ops": dict(window),
                 "in_flight": in_flight}
        # A board that goes silent (node 1's local rank 0 stops relaying, its process lives on):
        # node 1's other rank still learns the outcome, through the Store.
        if local_rank == 0 and node == 1:
            ckpt.storage.open_segmented = real  # type: ignore[method-assign]
            board = ckpt._worker.board
            assert board is not None
            board.publish = lambda *args, **kwargs: None  # type: ignore[method-assign]
        before, t0 = snapshot(), time.monotonic()
        info = ckpt.save(6).wait()
        silent = {"step": info.step, "seconds": time.monotonic() - t0, "ops": dict(snapshot() - before)}
    dist.barrier()
    (OUT / f"traffic-r{rank}.json").write_text(json.dumps(
        {"rank": rank, "node": node, "local_rank": local_rank, "saves": saves, "waiting": rates,
         "silent_board": silent}))
    end_process()


if __name__ == "__main__":
    main()
