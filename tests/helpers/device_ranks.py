"""Child process for tests/test_device_state.py: two ranks (gloo) whose state lives on one device.

  python device_ranks.py ROOT OUT.json save|load DEVICE

Both ranks put their tensors on DEVICE (with CUDA both share cuda:0): a REPLICATED model and a
PER_RANK tensor. `save` writes step 1 and reports, per rank, whether the rank's staging buffer is
page-locked (rank 1 stages into a shared-memory buffer that must be registered with CUDA) and
whether it is a shared one. `load` restores into zeroed state and reports, per rank, whether every
tensor equals the saved values (recomputed from fixed seeds) and sits on DEVICE.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from bench.common import TensorState
from support.net import free_port   # the checkout and tests/ are on PYTHONPATH: support.paths.child_env()
from async_ckpt import end_process

WORLD = 2


def state_for(rank: int, device: str):
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 256))
    for p in model.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    model = model.to(device)
    own = torch.randn(3, 1000, generator=torch.Generator().manual_seed(100 + rank)).to(
        device=device, dtype=torch.bfloat16)
    return model, {"own": own}


def run(rank: int, root: str, out: str, mode: str, device: str, port: int) -> None:
    import async_ckpt as ac
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model, own = state_for(rank, device)
    expected = {**{f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()},
                **{f"own.{k}": v.cpu().clone() for k, v in own.items()}}
    holder = TensorState(own)
    comps = [ac.StateComponent("model", model, ac.SharingPattern.REPLICATED,
                               validation_level=ac.ValidationLevel.TENSOR),
             ac.StateComponent("own", holder, ac.SharingPattern.PER_RANK)]
    ck = ac.AsyncCheckpointer(root, comps, timeout_s=120)
    report: dict = {"rank": rank}
    try:
        if mode == "save":
            ck.save(1).wait()
            buf = ck._pool._free[0]
            report.update(page_locked=bool(buf.tensor.is_pinned()), shared=buf.name is not None)
        else:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
                for t in own.values():
                    t.zero_()
            info = ck.load()
            got = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                   **{f"own.{k}": v for k, v in own.items()}}
            report.update(step=info.step if info else None,
                          equal={k: bool(torch.equal(got[k].cpu(), v)) for k, v in expected.items()},
                          on_device=all(t.device.type == torch.device(device).type for t in got.values()))
    finally:
        # rank 0 hosts the Store: it must not exit while rank 1 still reads the outcome of the
        # save (load() has no collective either, so a rank may return before its peers)
        dist.barrier()
        ck.close()
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(report, f)
    end_process()


def main() -> None:
    root, out, mode, device = sys.argv[1:5]
    torch.multiprocessing.spawn(run, args=(root, out, mode, device, free_port()), nprocs=WORLD)
    reports = []
    for r in range(WORLD):
        with open(f"{out}.rank{r}") as f:
            reports.append(json.load(f))
    with open(out, "w") as f:
        json.dump(reports, f)


if __name__ == "__main__":
    main()
