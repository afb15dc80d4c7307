"""Child process for tests/test_crash.py: saves a ~256 MiB state in a loop until it is SIGKILLed.

Protocol on stdout (one line each, flushed):
  ``loaded``             imports done and state allocated; now waiting for ``go`` on stdin
  ``ready <step>``       the checkpointer is open; the first step this child will save
  ``saving <step>``      save(step) is about to be called
  ``committed <step>``   handle.wait() returned for step
The child touches the checkpoint root only after reading ``go``, so the parent can start it
early (torch import time) while another child is still running.

The content of every step is a cheap deterministic function of the step, recomputed by the
parent with `check_state` (this module is imported by the test too).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import torch

N = 16 << 20              # float32 elements of each 64 MiB tensor
MAT = (4096, 4096)        # 64 MiB float32 matrix
IDS = N // 2              # int64 elements of a 64 MiB tensor
COMPONENT = "state"
NOISE_SEED = 20240611


@functools.lru_cache(maxsize=1)
def noise_base() -> torch.Tensor:
    """64 MiB of incompressible float32 data, identical in every process (same torch build)."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    return torch.randn(N, generator=g)


def const_value(step: int) -> float:
    return float(step * 4 + 1)


def mat_value(step: int) -> float:
    return -float(step) - 0.5


def leaves(step: int) -> dict:
    return {"step": step, "tag": f"step-{step}", "history": [step, step + 0.5, "x"],
            "dtype": torch.float32}


class CrashState:
    """A dict-like stateful holding ~256 MiB whose content is a function of `step`."""

    def __init__(self) -> None:
        self.base = noise_base()
        self.noise = torch.empty(N)
        self.const = torch.empty(N)
        self.ids = torch.arange(IDS, dtype=torch.int64)   # = arange + self.step, updated in place
        self.mat = torch.empty(MAT)
        self.step = 0
        self.loaded = None

    def set_step(self, step: int) -> None:
        torch.add(self.base, step, out=self.noise)
        self.const.fill_(const_value(step))
        self.ids.add_(step - self.step)
        self.mat.fill_(mat_value(step))
        self.step = step

    def state_dict(self) -> dict:
        return {"noise": self.noise, "const": self.const, "ids": self.ids, "mat": self.mat,
                **leaves(self.step)}

    def load_state_dict(self, sd) -> None:
        self.loaded = sd


def check_state(sd, step: int) -> list[str]:
    """What differs between a loaded state dict and the one saved for `step` ([] if nothing)."""
    if not isinstance(sd, dict):
        return [f"state is a {type(sd).__name__}, not a dict"]
    want_keys = {"noise", "const", "ids", "mat", *leaves(step)}
    if set(sd) != want_keys:
        return [f"keys {sorted(sd)} != {sorted(want_keys)}"]
    problems = []
    for key, value in leaves(step).items():
        if sd[key] != value:
            problems.append(f"{key}={sd[key]!r}, want {value!r}")
    specs = {"noise": (torch.float32, (N,)), "const": (torch.float32, (N,)),
             "ids": (torch.int64, (IDS,)), "mat": (torch.float32, MAT)}
    for key, (dtype, shape) in specs.items():
        t = sd[key]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            problems.append(f"{key}: {getattr(t, 'dtype', type(t))}{list(getattr(t, 'shape', []))}, "
                            f"want {dtype}{list(shape)}")
    if problems:
        return problems
    if not torch.equal(sd["noise"], noise_base() + step):
        problems.append("noise content differs")
    if not bool((sd["const"] == const_value(step)).all()):
        problems.append("const content differs")
    if not bool((sd["mat"] == mat_value(step)).all()):
        problems.append("mat content differs")
    ids = sd["ids"]
    if not (int(ids[0]) == step and bool((ids[1:] - ids[:-1] == 1).all())):
        problems.append("ids content differs")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--compression", default=None)
    parser.add_argument("--keep-last", type=int, default=None)
    parser.add_argument("--idle", type=float, default=0.1, help="seconds to sleep after each commit")
    args = parser.parse_args()

    state = CrashState()
    print("loaded", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 3
    from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent

    ckpt = AsyncCheckpointer(args.root, [StateComponent(COMPONENT, state, SharingPattern.GLOBAL)],
                             compression=args.compression, keep_last=args.keep_last)
    latest = ckpt.latest_step()
    step = 0 if latest is None else latest + 1
    print(f"ready {step}", flush=True)
    while True:
        state.set_step(step)
        print(f"saving {step}", flush=True)
        ckpt.save(step).wait()
        print(f"committed {step}", flush=True)
        step += 1
        time.sleep(args.idle)


if __name__ == "__main__":
    sys.exit(main())
