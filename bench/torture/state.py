"""The state every torture saver writes: tensors whose content is a cheap deterministic function
of (step, salt), so a checker recomputes what each step must load (`check_state`) instead of
keeping copies.

A copy, parametrised by size, of the crash tests' state (tests/support/crash_state.py): bench
may not import from tests/. Four tensors of ``mib / 4`` MiB each (incompressible float32 noise,
a constant, int64 ids, a 2-D matrix), a small bf16 tensor and JSON leaves. `salt` makes ranks'
PER_RANK shares differ.
"""
from __future__ import annotations

import functools

import torch

NOISE_SEED = 20240611
COLS = 1024          # columns of the matrix


@functools.lru_cache(maxsize=4)
def noise_base(n: int, salt: int) -> torch.Tensor:
    """`n` float32 of normal noise, identical in every process (same torch build)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(NOISE_SEED + salt))


def sizes(mib: int) -> tuple[int, int, int]:
    """(float32 elements per tensor, int64 ids, matrix rows) for a state of `mib` MiB."""
    if mib < 4 or mib % 4:
        raise ValueError(f"the state size must be a positive multiple of 4 MiB, got {mib}")
    n = (mib // 4) << 18            # float32 elements of one mib/4 MiB tensor
    return n, n // 2, n // COLS


def const_value(step: int, salt: int) -> float:
    return float(step * 4 + 1 + salt * 1000)


def mat_value(step: int, salt: int) -> float:
    return -float(step) - 0.5 - salt


def leaves(step: int, salt: int) -> dict:
    return {"step": step, "salt": salt, "tag": f"step-{step}", "history": [step, step + 0.5, "x"],
            "dtype": torch.float32}


def half_value(step: int, salt: int) -> torch.Tensor:
    return (torch.arange(4096, dtype=torch.float32) * 0.25 + step + salt).to(torch.bfloat16)


class TortureState:
    """A stateful of ~`mib` MiB whose content is a function of (`step`, `salt`). A load keeps
    what it was handed in `loaded` and counts itself in `loads`."""

    def __init__(self, mib: int = 64, salt: int = 0) -> None:
        self.mib, self.salt = mib, salt
        n, ids, rows = sizes(mib)
        self.base = noise_base(n, salt)
        self.noise = torch.empty(n)
        self.const = torch.empty(n)
        self.ids = torch.arange(ids, dtype=torch.int64)     # arange + step, updated in place
        self.mat = torch.empty(rows, COLS)
        self.half = half_value(0, salt)
        self.step = 0
        self.loaded = None
        self.loads = 0

    def set_step(self, step: int) -> None:
        torch.add(self.base, step, out=self.noise)
        self.const.fill_(const_value(step, self.salt))
        self.ids.add_(step - self.step)
        self.mat.fill_(mat_value(step, self.salt))
        self.half = half_value(step, self.salt)
        self.step = step

    def state_dict(self) -> dict:
        return {"noise": self.noise, "const": self.const, "ids": self.ids, "mat": self.mat,
                "half": self.half, **leaves(self.step, self.salt)}

    def load_state_dict(self, sd) -> None:
        self.loaded = sd
        self.loads += 1


def check_state(sd, step: int, mib: int, salt: int = 0) -> list[str]:
    """What differs between a loaded state dict and the one saved for `step` ([] if nothing)."""
    if not isinstance(sd, dict):
        return [f"state is a {type(sd).__name__}, not a dict"]
    want = leaves(step, salt)
    want_keys = {"noise", "const", "ids", "mat", "half", *want}
    if set(sd) != want_keys:
        return [f"keys {sorted(sd)} != {sorted(want_keys)}"]
    problems = [f"{k}={sd[k]!r}, want {v!r}" for k, v in want.items() if sd[k] != v]
    n, ids, rows = sizes(mib)
    specs = {"noise": (torch.float32, (n,)), "const": (torch.float32, (n,)),
             "ids": (torch.int64, (ids,)), "mat": (torch.float32, (rows, COLS)),
             "half": (torch.bfloat16, (4096,))}
    for key, (dtype, shape) in specs.items():
        t = sd[key]
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            problems.append(f"{key}: {getattr(t, 'dtype', type(t))}{list(getattr(t, 'shape', []))}, "
                            f"want {dtype}{list(shape)}")
    if problems:
        return problems
    if not torch.equal(sd["noise"], noise_base(n, salt) + step):
        problems.append("noise content differs")
    if not bool((sd["const"] == const_value(step, salt)).all()):
        problems.append("const content differs")
    if not bool((sd["mat"] == mat_value(step, salt)).all()):
        problems.append("mat content differs")
    t = sd["ids"]
    if not (int(t[0]) == step and bool((t[1:] - t[:-1] == 1).all())):
        problems.append("ids content differs")
    if not torch.equal(sd["half"], half_value(step, salt)):
        problems.append("half content differs")
    return problems
