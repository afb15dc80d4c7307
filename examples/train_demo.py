"""Demo: train a small model, checkpoint asynchronously to a local folder, then resume.

Run:  python examples/train_demo.py [--dir demo_checkpoints] [--steps 60] [--every 10]

Phase 1 trains for --steps steps, saving every --every steps without waiting for the writes.
Phase 2 plays a restarted job: fresh model and optimizer, `load()` finds the newest committed
checkpoint, and training continues; its losses are compared with an uninterrupted run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

import torch

import async_ckpt as ac


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.LayerNorm(1024),
                                torch.nn.Linear(1024, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 16))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model, optimizer) -> float:
    x = torch.randn(64, 256)                      # drawn from the checkpointed RNG
    target = torch.sin(x[:, :16] * 3)
    loss = torch.nn.functional.mse_loss(model(x), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def components(model, optimizer):
    return [ac.StateComponent("model", model, ac.SharingPattern.GLOBAL),
            ac.StateComponent("optimizer", optimizer, ac.SharingPattern.GLOBAL),
            ac.StateComponent("rng", ac.RNGState(), ac.SharingPattern.PER_RANK)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="demo_checkpoints")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--compression", choices=["none", "zstd"], default="none")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    compression = None if args.compression == "none" else "zstd"
    crash_at = args.steps - args.every // 2     # the "crash" happens between two checkpoints

    print(f"== phase 1: train {crash_at} steps, async checkpoint every {args.every} -> {os.path.abspath(args.dir)}")
    model, optimizer = build()
    losses = {}
    with ac.AsyncCheckpointer(args.dir, components(model, optimizer), compression=compression,
                              keep_last=3) as ckpt:
        for step in range(1, crash_at + 1):
            losses[step] = train_step(model, optimizer)
            if step % args.every == 0:
                t0 = time.perf_counter()
                handle = ckpt.save(step, metrics={"loss": losses[step]})
                blocked = time.perf_counter() - t0
                print(f"step {step:4d}  loss {losses[step]:.5f}  save() blocked {blocked * 1e3:7.2f} ms")
        info = handle.wait()
        ckpt.wait()
        print(f"last save: {info.nbytes / 2**20:.1f} MiB state, {info.stored_nbytes / 2**20:.1f} MiB stored, "
              f"committed {info.timings['total_s']:.2f} s after save() at {info.url}")
        print("committed checkpoints (keep_last=3):", [i.step for i in ckpt.list_checkpoints()])

    print(f"== phase 2: 'crash' at step {crash_at}; a restarted job (fresh model, optimizer and checkpointer) resumes")
    model2, optimizer2 = build(seed=123)            # different init: everything must come from disk
    with ac.AsyncCheckpointer(args.dir, components(model2, optimizer2), compression=compression) as ckpt:
        t0 = time.perf_counter()
        info = ckpt.load()
        print(f"loaded step {info.step} from {info.url} in {time.perf_counter() - t0:.3f} s")
        mismatches = 0
        for step in range(info.step + 1, crash_at + 1):
            loss = train_step(model2, optimizer2)
            same = loss == losses[step]
            mismatches += not same
            print(f"step {step:4d}  loss {loss:.5f}  {'== uninterrupted run' if same else '!= uninterrupted run'}")
    print("resume is bit-exact" if mismatches == 0 else f"{mismatches} losses differ from the uninterrupted run")
    raise SystemExit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
