"""One rank of a REPLICATED component holding one giant tensor, launched by
tests/test_sharded.py: the tensor is written in row blocks by several ranks.

    replicated_split_worker.py SCENARIO ROOT OUT MODE

MODE ``save``: every rank builds the same state (a 24 MiB tensor and a small one) and saves step
1; ``load``: every rank loads the newest step into zeros; ``diverge``: the last rank's big tensor
is one ulp off in its last row. Writes OUT/SCENARIO-r<rank>.json: digests and the error, if any.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

import async_ckpt as ac
from async_ckpt import end_process


class State:
    def __init__(self, seed: int | None):
        g = torch.Generator().manual_seed(seed or 0)
        self.big = torch.randn(6000, 1000, generator=g) if seed is not None else torch.zeros(6000, 1000)
        self.small = torch.arange(10.0) if seed is not None else torch.zeros(10)

    def state_dict(self):
        return {"big": self.big, "small": self.small, "note": "x"}

    def load_state_dict(self, sd):
        self.big, self.small = sd["big"].clone(), sd["small"].clone()


def main() -> None:
    scenario, root, out, mode = sys.argv[1:5]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    state = State(None if mode == "load" else 0)
    if mode == "diverge" and rank == dist.get_world_size() - 1:
        state.big[-1, 0] = torch.nextafter(state.big[-1, 0], torch.tensor(float("inf")))
    result: dict = {"rank": rank}
    with ac.AsyncCheckpointer(root, [ac.StateComponent("state", state, ac.SharingPattern.REPLICATED)],
                              timeout_s=60) as ckpt:
        try:
            if mode == "load":
                result["loaded"] = ckpt.load().step
            else:
                ckpt.save(1).wait()
        except ac.CheckpointError as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
    result["digest"] = hashlib.sha1(state.big.numpy().tobytes() + state.small.numpy().tobytes()).hexdigest()
    with open(os.path.join(out, f"{scenario}-r{rank}.json"), "w") as f:
        json.dump(result, f)
    end_process()


if __name__ == "__main__":
    main()
