"""The state the crash tests' saver (tests/helpers/crash_saver.py) writes in a loop: ~256 MiB whose
content is a cheap deterministic function of the step, so the tests recompute what each step
must load (`check_state`)."""
from __future__ import annotations

import functools

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
