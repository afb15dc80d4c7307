"""Demo: train a small model, checkpoint asynchronously to a local folder, then resume.

Run:  python examples/train_demo.py [--dir demo_checkpoints] [--steps 60] [--every 10]

Phase 1 trains, saving every --every steps without waiting for the writes, and "crashes" between
two checkpoints. Phase 2 is a new Python process, as a restarted job would be: fresh model and
optimizer, `load()` finds the newest committed checkpoint, and training continues; its losses are
compared with those of the uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
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


def phase1(args, compression) -> None:
    shutil.rmtree(args.dir, ignore_errors=True)
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
    print(f"== 'crash' at step {crash_at}: losses after the last checkpoint are lost; starting a new process")
    expected = os.path.abspath(args.dir) + ".expected-losses.json"
    with open(expected, "w") as f:
        json.dump({str(k): v for k, v in losses.items()}, f)
    cmd = [sys.executable, __file__, "--dir", args.dir, "--compression", args.compression, "--resume", expected]
    raise SystemExit(subprocess.call(cmd))


def phase2(args, compression) -> None:
    with open(args.resume) as f:
        losses = {int(k): v for k, v in json.load(f).items()}
    os.unlink(args.resume)
    print(f"== phase 2 (pid {os.getpid()}): resume from the newest committed checkpoint")
    model, optimizer = build(seed=123)            # different init: everything must come from disk
    with ac.AsyncCheckpointer(args.dir, components(model, optimizer), compression=compression) as ckpt:
        t0 = time.perf_counter()
        info = ckpt.load()
        print(f"loaded step {info.step} ({info.nbytes / 2**20:.1f} MiB) from {info.url} "
              f"in {time.perf_counter() - t0:.3f} s")
        mismatches = 0
        for step in range(info.step + 1, max(losses) + 1):
            loss = train_step(model, optimizer)
            mismatches += loss != losses[step]
            print(f"step {step:4d}  loss {loss:.5f}  "
                  f"{'== uninterrupted run' if loss == losses[step] else '!= uninterrupted run'}")
    print("resume is bit-exact" if mismatches == 0 else f"{mismatches} losses differ from the uninterrupted run")
    raise SystemExit(1 if mismatches else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="demo_checkpoints")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--compression", choices=["none", "zstd"], default="none")
    parser.add_argument("--resume", help=argparse.SUPPRESS)   # phase 2, started by phase 1
    args = parser.parse_args()
    compression = None if args.compression == "none" else "zstd"
    phase2(args, compression) if args.resume else phase1(args, compression)


if __name__ == "__main__":
    main()
