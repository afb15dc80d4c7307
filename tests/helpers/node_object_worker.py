"""One rank of tests/test_node_object.py (started by torchrun, see tests/support/dist.py).

Usage: node_object_worker.py save <root> <out dir>
Environment: NODE_OBJECT_COMPRESSION (None or "zstd"), NODE_OBJECT_STORAGE_OPTIONS (JSON, for an
S3 root). Saves step 1 (PER_RANK state that differs per rank, a REPLICATED model), then loads it
into zeroed state with a fresh checkpointer and reports whether every tensor came back bit-exact.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent
from support.stateful import Holder   # tests/ is on PYTHONPATH: support.paths.child_env()
from async_ckpt import end_process

ROOT, OUT = sys.argv[2], Path(sys.argv[3])
COMPRESSION = os.environ.get("NODE_OBJECT_COMPRESSION") or None
OPTIONS = json.loads(os.environ.get("NODE_OBJECT_STORAGE_OPTIONS") or "null")


def per_rank(rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    return {"noise": torch.randn(200_000 + 1000 * rank, generator=g),          # incompressible
            "smooth": torch.linspace(0, rank + 1, 70_000).to(torch.bfloat16),   # compresses
            "ints": torch.arange(5000 * (rank + 1), dtype=torch.int64),
            "empty": torch.empty(0, 3), "odd": torch.ones(7, dtype=torch.uint8) * rank}


def model_state() -> dict:
    g = torch.Generator().manual_seed(42)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.zeros(64)}


def zeroed(state: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8) if x.numel() else x,
                                                                 y.view(torch.uint8) if y.numel() else y)
        for x, y in ((a[k], b[k]) for k in a))


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mine, model = Holder(per_rank(rank)), Holder(model_state())
    comps = [StateComponent("mine", mine, SharingPattern.PER_RANK),
             StateComponent("model", model, SharingPattern.REPLICATED)]
    with AsyncCheckpointer(ROOT, comps, timeout_s=120, compression=COMPRESSION,
                           storage_options=OPTIONS) as ckpt:
        info = ckpt.save(1).wait()
    back_mine, back_model = Holder(zeroed(per_rank(rank))), Holder(zeroed(model_state()))
    comps = [StateComponent("mine", back_mine, SharingPattern.PER_RANK),
             StateComponent("model", back_model, SharingPattern.REPLICATED)]
    with AsyncCheckpointer(ROOT, comps, timeout_s=120, storage_options=OPTIONS) as ckpt:
        loaded = ckpt.load()
    result = {"url": info.url, "step": loaded.step if loaded else None,
              "exact": same(back_mine.state, per_rank(rank)) and same(back_model.state, model_state())}
    (OUT / f"save-r{rank}.json").write_text(json.dumps(result))
    end_process()


if __name__ == "__main__":
    main()
