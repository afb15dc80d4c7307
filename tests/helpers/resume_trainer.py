"""Child process for tests/test_dataloader_resume.py and tests/test_ddp_resume.py: a small training
run whose every step depends on all the state a resume must bring back.

  python resume_trainer.py ROOT OUT --steps 26 --save-every 4 [--kill-at 15] [--world 2] [--workers 2]

Each rank appends one JSON line per training step to ``OUT.rank<r>.jsonl``:
``{"step": s, "indices": [...], "loss": float.hex()}`` (hex: compared bit for bit). With
``--kill-at K`` every rank SIGKILLs itself at the start of step K (after a barrier when
distributed), with the last save possibly still in flight. Started again on the same ROOT, the run
loads the newest committed checkpoint and continues from the step after it.

What a step depends on: the data order (ResumableSampler inside a StatefulDataLoader with worker
processes), the model and AdamW state, dropout (torch CPU RNG), and a loss scale drawn from Python's
`random` and NumPy's global generator. With ``--world 2`` the model is wrapped in DDP over gloo.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys

import numpy as np
import torch

from support.net import free_port   # tests/ is on PYTHONPATH: support.paths.child_env()
from async_ckpt import end_process

N_SAMPLES, BATCH, DIM = 40, 4, 8           # 10 batches per epoch with one rank


class Points(torch.utils.data.Dataset):
    """Map-style data: each sample is a fixed function of its index (workers need no RNG)."""

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(10_000 + index)
        x = torch.randn(DIM, generator=g)
        return index, x, x.sum(dim=0, keepdim=True).sin()


def forever(loader):
    """Batches across epochs; the sampler and loader keep the position, not this loop."""
    while True:
        yield from loader


def train(rank: int, world: int, args) -> None:
    import async_ckpt as ac
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port),
                          RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)                    # identical initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    torch.manual_seed(1000 + rank)          # per-rank dropout streams
    random.seed(rank)
    np.random.seed(rank)
    data = Points()
    sampler = ac.ResumableSampler(data, num_replicas=world, rank=rank, seed=5)
    # The loader's own generator: without one, creating an iterator (each epoch, and once more
    # on resume) draws a worker seed from the global stream and shifts every dropout mask after.
    loader_gen = torch.Generator().manual_seed(77 + rank)
    loader = StatefulDataLoader(data, batch_size=BATCH, sampler=sampler, num_workers=args.workers,
                                generator=loader_gen, persistent_workers=args.workers > 0)
    components = [
        ac.StateComponent("model", model, ac.SharingPattern.REPLICATED),
        ac.StateComponent("optimizer", optimizer, ac.SharingPattern.REPLICATED),
        ac.StateComponent("rng", ac.RNGState({"loader": loader_gen}), ac.SharingPattern.PER_RANK),
        ac.StateComponent("data", loader, ac.SharingPattern.PER_RANK),
    ]
    out = open(f"{args.out}.rank{rank}.jsonl", "a")
    with ac.AsyncCheckpointer(args.root, components) as ckpt:
        info = ckpt.load()
        start = 1 if info is None else info.step + 1
        print(f"rank {rank} start {start}", flush=True)
        batches = forever(loader)
        for step in range(start, args.steps + 1):
            if step == args.kill_at:
                out.flush()
                if world > 1:
                    torch.distributed.barrier()
                os.kill(os.getpid(), signal.SIGKILL)
            indices, x, y = next(batches)
            scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
            loss = torch.nn.functional.mse_loss(net(x), y) * scale
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            out.write(json.dumps({"step": step, "indices": indices.tolist(),
                                  "loss": loss.item().hex()}) + "\n")
            out.flush()
            if step % args.save_every == 0:
                ckpt.save(step)
    out.close()
    if world > 1:
        end_process()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=26)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.world == 1:
        train(0, 1, args)
        return 0
    import torch.multiprocessing as mp
    args.port = free_port()
    try:
        mp.spawn(train, args=(args.world, args), nprocs=args.world, join=True)
    except mp.ProcessExitedException as exc:
        # A rank died by a signal: expected only when this run was told to kill itself.
        if args.kill_at > 0 and exc.signal_name == "SIGKILL":
            print(f"killed: {exc}", flush=True)
            return 0
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
