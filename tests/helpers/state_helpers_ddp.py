"""Child of tests/test_state_helpers.py: ModelState/OptimizerState over DDP on 2 gloo ranks.

  python state_helpers_ddp.py ROOT OUT

Each rank trains a DDP-wrapped model 3 steps (AdamW with non-default betas/eps), saves through
AsyncCheckpointer (REPLICATED), then loads the checkpoint into a fresh *unwrapped* model and a
fresh optimizer (no state yet) and writes what it found to OUT.rank<r>.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from support.net import free_port
from async_ckpt import end_process


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6)


def run(rank: int, world: int, root: str, out: str, port: int) -> None:
    import async_ckpt as ac

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, opt = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        loss = ddp(torch.randn(5, 4, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    saved_keys = sorted(ac.ModelState(ddp).state_dict())
    with ac.AsyncCheckpointer(root, [
            ac.StateComponent("model", ac.ModelState(ddp), ac.SharingPattern.REPLICATED),
            ac.StateComponent("optimizer", ac.OptimizerState(ddp, opt), ac.SharingPattern.REPLICATED)]) as ck:
        ck.save(3).wait()
    fresh, fresh_opt = build()                     # unwrapped, optimizer without state
    with ac.AsyncCheckpointer(root, [
            ac.StateComponent("model", ac.ModelState(fresh), ac.SharingPattern.REPLICATED),
            ac.StateComponent("optimizer", ac.OptimizerState(fresh, fresh_opt),
                              ac.SharingPattern.REPLICATED)]) as ck:
        info = ck.load()
    same_params = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                         fresh.state_dict().values(), strict=True))
    a, b = opt.state_dict(), fresh_opt.state_dict()
    same_state = all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])
    groups = [{k: v for k, v in grp.items() if k != "params"} for grp in b["param_groups"]]
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"step": info.step, "keys": saved_keys, "same_params": same_params,
                   "same_state": same_state, "n_state": len(b["state"]),
                   "betas": list(groups[0]["betas"]), "eps": groups[0]["eps"]}, f)
    end_process()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(run, args=(2, sys.argv[1], sys.argv[2], free_port()), nprocs=2, join=True)
