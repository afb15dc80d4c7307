"""One rank of the 2 x 2 fragment test (tests/test_fragment_runs.py), started by torchrun.

Usage: fragment_worker.py <scenario> <checkpoint root> <output dir>

scenario ``fragments``: every pattern saved at steps 1-3 by 4 ranks on 2 nodes; rank 0 lists what
each committed step folder holds; then, between barriers (the test's foreground process group),
rank 0 removes node 1's fragment of step 2 and damages node 0's fragment of step 3, and every
rank loads step 2, step 3, then step 1 into fresh state, recording what each load raised and
whether any state was restored before it did.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from async_ckpt import AsyncCheckpointer, CheckpointError, SharingPattern, StateComponent
from support.stateful import Holder   # tests/ is on PYTHONPATH: support.paths.child_env()
from async_ckpt import end_process

SCENARIO, ROOT, OUT = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])


def state(rank: int, node: int, step: int, fresh: bool = False) -> list[StateComponent]:
    def t(value: float, n: int = 256) -> torch.Tensor:
        return torch.zeros(n) if fresh else torch.full((n,), float(value))
    return [StateComponent("g", Holder({"w": t(step)}), SharingPattern.GLOBAL),
            StateComponent("rep", Holder({"a": t(step + 0.5), "b": t(-step)}), SharingPattern.REPLICATED),
            StateComponent("mine", Holder({"w": t(rank * 10 + step), "rank": -1 if fresh else rank}),
                           SharingPattern.PER_RANK),
            StateComponent("node", Holder({"w": t(node + 100 * step)}), SharingPattern.PER_NODE)]


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    node = int(os.environ["GROUP_RANK"])
    result: dict = {"folders": {}, "loads": {}}
    for step in (1, 2, 3):
        with AsyncCheckpointer(ROOT, state(rank, node, step), timeout_s=60) as ckpt:
            ckpt.save(step).wait()
    dist.barrier()
    if rank == 0:
        for step in (1, 2, 3):
            result["folders"][step] = sorted(os.listdir(ROOT / f"step-{step:010d}"))
        folder2, folder3 = ROOT / "step-0000000002", ROOT / "step-0000000003"
        next(folder2.glob("fragment-n00001-*.json")).unlink()
        frag = next(folder3.glob("fragment-n00000-*.json"))
        raw = bytearray(frag.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        frag.write_bytes(bytes(raw))
    dist.barrier()
    for step in (2, 3, 1):
        comps = state(rank, node, step, fresh=True)
        outcome: dict = {}
        try:
            with AsyncCheckpointer(ROOT, comps, timeout_s=60) as ckpt:
                outcome["step"] = ckpt.load(step).step
        except CheckpointError as exc:
            outcome["raised"], outcome["message"] = type(exc).__name__, str(exc)
        outcome["restored"] = [c.key for c in comps if c.stateful.loads]
        outcome["mine"] = comps[2].stateful.state["rank"]
        result["loads"][step] = outcome
    with open(OUT / f"{SCENARIO}-r{rank}.json", "w") as f:
        json.dump(result, f)
    end_process()


if __name__ == "__main__":
    main()
