"""The per-plane zstd codec `zstd-planes<W>`: each byte plane of a piece stored raw or as a zstd frame.

A piece of `n` elements of `W` bytes is cut into `W` planes of `n` bytes (plane `k`: byte `k` of
every element, memory order, as in shuffle.py) and each plane is stored, from plane W-1 down to
plane 0, either raw (exactly `n` bytes) or as one zstd frame of fewer than `n` bytes. The manifest
lists the stored length of every plane in that order, so "length == n" means raw and nothing else
needs recording.

Why per plane: a float's low mantissa bytes are noise. Grouped into one frame with the exponent
plane they still cost zstd a pass for nothing; here a 64 KiB sample decides, per piece and plane,
whether a plane pays, and noise planes are just copied.

Why zstd without match finding on float planes: an exponent plane is an order-0 source (a couple
dozen byte values, few repeats longer than a byte run), so zstd's Huffman coding of literals gets
all of its ratio while its match finder found short matches that cost time and ratio (measured on
bf16 normal(0, 0.02) exponents: 2.95x at 0.7 GB/s per core vs 2.90x at 0.29 GB/s with tuned level-1
matching, `bench/results/codec.md`). zstandard's C extension cannot switch literal compression on
for a match-free configuration, so this goes through its cffi backend (libzstd's experimental
`ZSTD_c_literalCompressionMode`); without cffi the tuned level-1 parameters are used instead. Both
write ordinary zstd frames, so readers need neither.
"""
from __future__ import annotations

import threading

import numpy as np

from .shuffle import extract_plane, interleave, shuffle_width

PREFIX = "zstd-planes"
WIDTHS = (1, 2, 4, 8)
SAMPLE_RUNS, SAMPLE_RUN = 16, 4096   # bytes of a plane sampled: 16 runs spread over it
# A plane is compressed only when its sample shrinks to at most this fraction, and its frame is kept
# only when it does too: decoding a frame that saves a couple of percent costs more than it saves.
KEEP = 31 / 32


class PlanesWidth(int):
    """codec_width() of `zstd-planes<W>`: W, marked so decompress_frames reads one length per plane."""


def planes_width(dtype) -> int:
    """Planes per element for `dtype`: the grouping width of floats and complex numbers, else 1."""
    return shuffle_width(dtype) or 1


def _native():
    """zstandard's cffi backend with the experimental literal-compression switch, or None."""
    try:
        from zstandard.backend_cffi import ffi, lib
        lib.ZSTD_c_literalCompressionMode, lib.ZSTD_compress2  # noqa: B018 - present or AttributeError
    except (ImportError, AttributeError):
        return None
    return ffi, lib


_NATIVE = _native()


class _LiteralZstd:
    """One zstd context that Huffman-codes literals and (nearly) never searches for matches: the
    fast strategy's step grows with the target length, so at its maximum it looks once per block."""

    def __init__(self, level: int):
        ffi, lib = _NATIVE
        self._ffi, self._lib = ffi, lib
        self._cctx = ffi.gc(lib.ZSTD_createCCtx(), lib.ZSTD_freeCCtx)
        params = {"compressionLevel": level, "strategy": lib.ZSTD_fast, "windowLog": 17,
                  "hashLog": 10, "minMatch": 7, "targetLength": lib.ZSTD_TARGETLENGTH_MAX,
                  "literalCompressionMode": 1, "contentSizeFlag": 1}   # 1: ZSTD_ps_enable
        for name, value in params.items():
            self._check(lib.ZSTD_CCtx_setParameter(self._cctx, getattr(lib, f"ZSTD_c_{name}"), value))

    def _check(self, code: int) -> int:
        if self._lib.ZSTD_isError(code):
            name = self._ffi.string(self._lib.ZSTD_getErrorName(code)).decode()
            raise RuntimeError(f"zstd: {name}")
        return code

    def compress_into(self, src: np.ndarray, dst: np.ndarray) -> int:
        """Compress `src` into `dst`; the frame's size, or 0 when it does not fit."""
        lib = self._lib
        code = lib.ZSTD_compress2(self._cctx, self._ffi.from_buffer(dst), len(dst),
                                  self._ffi.from_buffer(src), len(src))
        if lib.ZSTD_isError(code) and lib.ZSTD_getErrorCode(code) == lib.ZSTD_error_dstSize_tooSmall:
            return 0
        return self._check(code)


class _BytesZstd:
    """zstandard's C extension (returns a new bytes object), for when cffi is missing."""

    def __init__(self, params):
        import zstandard
        self._ctx = zstandard.ZstdCompressor(compression_params=params)

    def compress(self, src) -> bytes:
        return self._ctx.compress(src)

    def compress_into(self, src: np.ndarray, dst: np.ndarray) -> int:
        frame = self._ctx.compress(src.data)
        if len(frame) > len(dst):
            return 0
        dst[:len(frame)] = np.frombuffer(frame, dtype=np.uint8)
        return len(frame)


class PlaneEncoder:
    """Encodes pieces as `zstd-planes<W>`; thread-safe (each thread keeps its own contexts)."""

    def __init__(self, level: int, level_params, plane_params, native: bool = True):
        self.level = level
        self._level_params, self._plane_params = level_params, plane_params
        # Literal-only coding is what level 1 means here; other levels keep their own parameters.
        self.native = native and _NATIVE is not None and level == 1
        self._local = threading.local()

    def _ctx(self, literal: bool):
        ctxs = getattr(self._local, "ctxs", None)
        if ctxs is None:
            ctxs = self._local.ctxs = {}
        if literal not in ctxs:
            ctxs[literal] = (_LiteralZstd(self.level) if literal and self.native
                             else _BytesZstd(self._plane_params if literal else self._level_params))
        return ctxs[literal]

    def _scratch(self, name: str, size: int) -> np.ndarray:
        # Reused per thread: samples are taken for every plane of every piece.
        buf = getattr(self._local, name, None)
        if buf is None or len(buf) < size:
            buf = np.empty(size, dtype=np.uint8)
            setattr(self._local, name, buf)
        return buf[:size]

    def _pays(self, rows: np.ndarray, k: int, ctx) -> bool:
        """Whether plane k of `rows` (n x W) looks compressible, judged on runs spread over it."""
        n = len(rows)
        if n <= SAMPLE_RUNS * SAMPLE_RUN:
            return True     # small: compressing it whole costs no more than a sample
        sample = self._scratch("sample", SAMPLE_RUNS * SAMPLE_RUN)
        for i, start in enumerate(np.linspace(0, n - SAMPLE_RUN, SAMPLE_RUNS).astype(np.int64)):
            sample[i * SAMPLE_RUN:(i + 1) * SAMPLE_RUN] = rows[start:start + SAMPLE_RUN, k]
        out = self._scratch("sample_out", int(len(sample) * KEEP))
        return ctx.compress_into(sample, out) > 0

    def encode(self, piece: memoryview, width: int):
        """(stored bytes, stored length of each plane) of one piece."""
        src = np.frombuffer(piece, dtype=np.uint8)
        if len(src) % width:
            raise ValueError(f"cannot cut {len(src)} bytes into {width}-byte elements")
        n = len(src) // width
        rows = src.reshape(n, width)
        if width == 1:
            # Integers and 1-byte floats: plain zstd with match finding (repeats are common), and
            # the piece itself, uncopied, when it does not pay.
            ctx = self._ctx(False)
            if n and self._pays(rows, 0, ctx):
                frame = ctx.compress(piece)
                if len(frame) <= n * KEEP:
                    return frame, (len(frame),)
            return piece, (n,)
        ctx = self._ctx(True)
        # The stored planes go from the highest byte down, so the planes that pay (a float's
        # sign/exponent byte is its highest) come first: a plane waits for zstd in the tail of the
        # output while its frame is written at the front, and no per-thread scratch plane is needed.
        out = np.empty(len(src), dtype=np.uint8)
        waiting, cap = out[len(src) - n:], int(n * KEEP)
        lengths, pos = [], 0
        for k in reversed(range(width)):
            size = 0
            if n and self._pays(rows, k, ctx):
                # Rare (a low plane pays after higher ones did not): no room before the tail.
                plane = waiting if pos + cap <= len(src) - n else np.empty(n, dtype=np.uint8)
                extract_plane(src, k, width, plane)
                size = ctx.compress_into(plane, out[pos:pos + cap])
            if not size:
                extract_plane(src, k, width, out[pos:pos + n])
            lengths.append(size or n)
            pos += lengths[-1]
        return out.data[:pos], tuple(lengths)


def decode_piece(stored: memoryview, lengths: list[int], out: memoryview, width: int, where: str,
                 decode_frame) -> None:
    """Rebuild one piece from its stored planes; `decode_frame(frame, size)` decodes one zstd
    frame of exactly `size` bytes (raising on any other size)."""
    n = len(out) // width
    planes, pos = [], 0
    for i, length in enumerate(lengths):          # stored order: plane W-1 first
        blob = stored[pos:pos + length]
        pos += length
        if length > n:
            raise ValueError(f"{where}: plane {width - 1 - i} stores {length} bytes for {n}")
        planes.append(np.frombuffer(blob if length == n else decode_frame(blob, n), dtype=np.uint8))
    interleave(planes[::-1], np.frombuffer(out, dtype=np.uint8), width)
