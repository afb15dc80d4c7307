"""Byte grouping ("shuffle") of floating-point bytes, the filter in front of zstd (zstd-shuffle<W>
groups a whole piece; zstd-planes<W>, planes.py, extracts and stores plane by plane).

A float's high byte (sign and exponent) takes few values while its low mantissa bytes are noise.
Interleaved, the noise hides the pattern from zstd; grouped (every element's byte 0, then every
byte 1, ...) the exponent plane compresses about 3x and the noise planes cost zstd almost nothing.

Planes are built with whole-array numpy shifts of a uint16/32/64 view (one pass per plane, about
2-3 GB/s for bf16 on this machine); a 2-D uint8 transpose measured 2-10x slower. Byte `i` of an
element is its memory byte `i`, so the stored layout is the same on any host.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

WIDTHS = (2, 4, 8)
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_LITTLE = sys.byteorder == "little"
_CHUNK = 1 << 15     # elements per interleaving step for widths above 2


def shuffle_width(dtype: torch.dtype) -> int:
    """Bytes per grouped element for `dtype`; 0 means "do not group" (integers, bool, fp8).

    Complex numbers are pairs of floats, so they group by their component's size.
    """
    if dtype.is_complex:
        width = dtype.itemsize // 2
    elif dtype.is_floating_point:
        width = dtype.itemsize
    else:
        return 0
    return width if width in WIDTHS else 0


def extract_plane(src: np.ndarray, k: int, width: int, out: np.ndarray) -> None:
    """Byte `k` of every `width`-byte element of `src` (uint8, whole elements) into `out`."""
    if _LITTLE:
        # A truncating cast to uint8 keeps a word's lowest byte, and the words that start k bytes
        # into the data have byte k of each element lowest (the last element has no such whole
        # word). One vectorised pass: 10 GB/s of source, where shifting first ran at 7.6 and a
        # strided uint8 copy at 1.8.
        n = len(out)
        if k == 0:
            np.copyto(out, src.view(_UINT[width]), casting="unsafe")
        elif n:
            np.copyto(out[:-1], src[k:k + (n - 1) * width].view(_UINT[width]), casting="unsafe")
            out[-1] = src[(n - 1) * width + k]
    else:
        np.copyto(out, src.reshape(-1, width)[:, k])


def interleave(planes, dst: np.ndarray, width: int) -> None:
    """Inverse of extracting every plane: plane k becomes byte k of each element of `dst`."""
    n = len(dst) // width
    rows = dst.reshape(n, width)
    # One strided copy per plane: 1.9 GB/s for width 2 where numpy's 2-D transposed assignment
    # measured 0.2 GB/s. Wider elements go in L2-sized chunks so each destination line is filled
    # by every plane while it is cached (width 8: 1.7 GB/s instead of 0.9).
    step = max(n, 1) if width <= 2 else _CHUNK
    for start in range(0, n, step):
        end = min(n, start + step)
        for k in range(width):
            rows[start:end, k] = planes[k][start:end]


def shuffle(piece: memoryview, width: int) -> np.ndarray:
    """`piece` regrouped into `width` planes, one after another (a new uint8 array)."""
    src = np.frombuffer(piece, dtype=np.uint8)
    if len(src) % width:
        raise ValueError(f"cannot group {len(src)} bytes into {width}-byte elements")
    n = len(src) // width
    out = np.empty((width, n), dtype=np.uint8)
    for i in range(width):
        extract_plane(src, i, width, out[i])
    return out.reshape(-1)


def unshuffle(planes: memoryview | bytes, out: memoryview, width: int) -> None:
    """Inverse of `shuffle`: interleave the planes back into `out` (same length)."""
    src = np.frombuffer(planes, dtype=np.uint8)
    dst = np.frombuffer(out, dtype=np.uint8)
    if len(src) != len(dst) or len(dst) % width:
        raise ValueError(f"{len(src)} grouped bytes cannot fill {len(dst)} bytes of "
                         f"{width}-byte elements")
    interleave(src.reshape(width, len(dst) // width), dst, width)
