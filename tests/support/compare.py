"""One exact comparison for everything a checkpoint gives back."""
from __future__ import annotations

import math
from typing import Any

import torch


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in element order, on the CPU (a device tensor is copied over)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: Any, want: Any, path: str = "") -> None:
    """Exact structural equality: the same types (containers, keys and the key types, in order),
    tensors of the same dtype and shape with identical bytes (so NaN payloads equal, and -0.0
    differs from 0.0; a tensor on a device is compared with its CPU copy), float leaves equal
    with NaN == NaN and the sign of zero kept, and a module state dict's `_metadata` kept."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.equal(raw_bytes(got), raw_bytes(want)), f"{path}: tensor bytes differ"
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), f"{path}: {got!r} != {want!r}"
        else:
            assert got == want and math.copysign(1.0, got) == math.copysign(1.0, want), \
                f"{path}: {got!r} != {want!r}"
    elif isinstance(want, dict):
        assert [(type(k), k) for k in got] == [(type(k), k) for k in want], \
            f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{path}/{k}")
        assert getattr(got, "_metadata", None) == getattr(want, "_metadata", None), f"{path}: _metadata differs"
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}/{i}")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"
