"""Synthetic checkpoint states for the harness's dtype mixes.

- ``fp32``: fp32 weights only (normal noise; what bench/single_process.py saves);
- ``bf16_adam``: what mixed-precision training checkpoints: bf16 weights plus fp32 Adam moments
  (exp_avg, exp_avg_sq) per layer, 10 bytes per parameter. Values are shaped like real ones
  (small weights, tiny moments, squared second moment) so compression ratios mean something.
"""
from __future__ import annotations

import torch

from ..common import TensorState  # noqa: F401 - re-exported for the harness modules

DTYPE_MIXES = ("fp32", "bf16_adam")


def make_state(nbytes: int, mix: str, layers: int) -> dict[str, torch.Tensor]:
    if mix not in DTYPE_MIXES:
        raise SystemExit(f"unknown dtype mix {mix!r}; pick from {', '.join(DTYPE_MIXES)}")
    gen = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    if mix == "fp32":
        numel = max(1, nbytes // 4 // layers)
        for i in range(layers):
            out[f"layer{i:02d}.weight"] = torch.randn(numel, generator=gen)
        return out
    numel = max(1, nbytes // 10 // layers)
    for i in range(layers):
        out[f"layer{i:02d}.weight"] = (torch.randn(numel, generator=gen) * 0.02).to(torch.bfloat16)
        out[f"layer{i:02d}.exp_avg"] = torch.randn(numel, generator=gen) * 1e-3
        out[f"layer{i:02d}.exp_avg_sq"] = (torch.randn(numel, generator=gen) * 1e-3) ** 2
    return out


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())

