"""Memory flatness: RSS after each of N consecutive async_ckpt saves must stay flat (no leak of
staging buffers, hash state, manifests or futures). Judged as the growth between the median of
the first and of the last tenth of the saves (after one warm-up save), against a tolerance."""
from __future__ import annotations

import gc
import os
import statistics
import time

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent

from .probe import rss_bytes
from .state import TensorState, make_state, state_bytes

TOLERANCE_BYTES = 16 << 20      # allocator noise; a leaked staging buffer is far larger


def run_flatness(nbytes: int, saves: int, folder: str, compression: str | None = None) -> dict:
    state = make_state(nbytes, "fp32", 8)
    root = os.path.join(folder, f"flatness-{compression or 'none'}")
    t0 = time.perf_counter()
    rss = []
    with AsyncCheckpointer(root, [StateComponent("model", TensorState(state), SharingPattern.PER_RANK)],
                           compression=compression, keep_last=2) as ck:
        ck.save(0).wait()       # warm-up: allocates the pool
        for step in range(1, saves + 1):
            ck.save(step).wait()
            gc.collect()
            rss.append(rss_bytes())
    tenth = max(1, saves // 10)
    growth = statistics.median(rss[-tenth:]) - statistics.median(rss[:tenth])
    return {"saves": saves, "state_bytes": state_bytes(state), "compression": compression,
            "rss_bytes": rss, "growth_bytes": growth, "tolerance_bytes": TOLERANCE_BYTES,
            "flat": growth <= TOLERANCE_BYTES, "seconds": time.perf_counter() - t0}
