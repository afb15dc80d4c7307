"""Hashing and compression of stored bytes, and zero-copy byte views of host tensors."""
from __future__ import annotations

import ctypes

import torch
import xxhash
import zstandard

HASH_ALGO = "xxh3-128"
CODECS = ("raw", "zstd")
ALIGN = 64             # staging offsets and file records start on this boundary
PIECE = 16 << 20       # raw bytes per zstd frame / pipeline piece


def new_hasher() -> "xxhash.xxh3_128":
    return xxhash.xxh3_128()


def hash_bytes(data: memoryview | bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes (no copy, no numpy).

    The caller keeps `t` alive for as long as the view is used.
    """
    assert t.device.type == "cpu" and t.is_contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_uint8 * nbytes).from_address(t.data_ptr())).cast("B")


class Compressor:
    """zstd, one independent frame per piece so pieces can be compressed in parallel."""

    def __init__(self, level: int = 1):
        self.level = level
        self._params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=True)

    def compress(self, piece: memoryview) -> bytes:
        # A compressor object is not thread-safe; they are cheap, so make one per call.
        return zstandard.ZstdCompressor(compression_params=self._params).compress(piece)


def decompress_frames(stored: memoryview, frames: list[int], out: memoryview, where: str) -> None:
    """Decode the concatenated frames in `stored` into `out`; ValueError on any mismatch."""
    dctx = zstandard.ZstdDecompressor()
    pos = filled = 0
    for length in frames:
        frame = stored[pos:pos + length]
        if not 0 <= zstandard.frame_content_size(frame) <= PIECE:
            raise ValueError(f"{where}: a zstd frame declares an impossible size")
        raw = dctx.decompress(frame, max_output_size=PIECE)
        out[filled:filled + len(raw)] = raw
        pos += length
        filled += len(raw)
    if pos != len(stored) or filled != len(out):
        raise ValueError(f"{where}: frames decode to {filled} bytes, expected {len(out)}")
