"""Hashing and compression of stored bytes, and zero-copy byte views of host tensors.

Codecs (the manifest's per-tensor `codec`):
  raw              the tensor's bytes
  zstd             one zstd frame per 16 MiB piece
  zstd-shuffle<W>  each 16 MiB piece byte-grouped into W planes (see shuffle.py), then one zstd
                   frame; W in 2, 4, 8. Written for float and complex tensors before zstd-planes.
  zstd-planes<W>   each 16 MiB piece cut into W byte planes, each stored raw or as its own zstd
                   frame (see planes.py); W in 1, 2, 4, 8. What compression="zstd" writes now.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import torch
import xxhash

from ..errors import CheckpointError
from . import planes
from .planes import PlaneEncoder, PlanesWidth, planes_width
from .shuffle import WIDTHS, shuffle, unshuffle

if TYPE_CHECKING:
    import zstandard


def _zstandard():
    """zstandard is needed only for compressed checkpoints, so plain ones work without it
    (a stock CUDA image then needs only xxhash added)."""
    try:
        import zstandard
    except ImportError as exc:
        raise CheckpointError("compression='zstd' (or loading a compressed checkpoint) needs the "
                              "zstandard package: pip install zstandard") from exc
    return zstandard


HASH_ALGO = "xxh3-128"
SHUFFLE_PREFIX = "zstd-shuffle"
CODECS = (("raw", "zstd") + tuple(f"{SHUFFLE_PREFIX}{w}" for w in WIDTHS)
          + tuple(f"{planes.PREFIX}{w}" for w in planes.WIDTHS))
ALIGN = 64             # staging offsets and file records start on this boundary
PIECE = 16 << 20       # raw bytes per zstd frame / pipeline piece
BLOCK_MAX = 128 << 10  # zstd: no block decodes to more (RFC 8878, Block_Maximum_Size)
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))


def new_hasher() -> "xxhash.xxh3_128":
    return xxhash.xxh3_128()


def hash_bytes(data: memoryview | bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def segments_hash(segments) -> str:
    """The `hash` of a data file made of segments ((offset, length, xxh3-128 hex of the segment's
    bytes), ...): the xxh3-128 of the ASCII text "<offset>:<length>:<hash>\n" of each segment, in
    order (docs/format.md)."""
    return hash_bytes("".join(f"{o}:{n}:{h}\n" for o, n, h in segments).encode("ascii"))


def zstd_bound(n: int) -> int:
    """The most bytes zstd may take for one frame of `n` bytes (ZSTD_COMPRESSBOUND)."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0)


def stored_bound(nbytes: int, codec: str) -> int:
    """The most bytes a record of `nbytes` raw bytes may take in a data file under `codec`
    (or under whichever codec a writer picks instead of a zstd one), its padding to ALIGN
    included: what a writer reserves for it before the record is encoded."""
    if codec == "raw":
        return align_up(nbytes)
    # zstd-planes stores each plane raw or smaller; zstd and zstd-shuffle at most zstd's bound.
    return align_up(sum(zstd_bound(n) for n in piece_sizes(nbytes)))


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


def codec_width(codec: str) -> int:
    """The byte-grouping width of a codec name (0: none; a `PlanesWidth` for `zstd-planes<W>`);
    ValueError for names we do not know."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} (this release knows {CODECS}); "
                         "the checkpoint is corrupt or needs a newer async_ckpt")
    if codec.startswith(planes.PREFIX):
        return PlanesWidth(codec[len(planes.PREFIX):])
    return int(codec[len(SHUFFLE_PREFIX):]) if codec.startswith(SHUFFLE_PREFIX) else 0


def codec_for(dtype: torch.dtype, compressed: bool) -> str:
    """The codec a writer uses for a tensor of `dtype`."""
    return f"{planes.PREFIX}{planes_width(dtype)}" if compressed else "raw"


def frames_per_piece(width: int) -> int:
    """Stored lengths the manifest lists per piece: one per plane for zstd-planes, else one."""
    return int(width) if isinstance(width, PlanesWidth) else 1


def min_frame_size(content: int) -> int:
    """The fewest bytes a zstd frame holding `content` bytes can take: a header of at least 6
    bytes (magic number, descriptor, content size) and at least 4 per block (a 3-byte block header
    and one byte, an RLE block), a block holding at most BLOCK_MAX bytes. So a stored length bounds
    what a frame may claim to decode to (about 32,768x) before anything is allocated."""
    return 6 + 4 * -(-content // BLOCK_MAX)


def piece_sizes(nbytes: int) -> list[int]:
    """Raw bytes of each piece of a record (an empty record still has one, empty, piece)."""
    return [min(PIECE, nbytes - i) for i in range(0, nbytes, PIECE)] or [0]


class Compressor:
    """zstd, independent frames per piece so pieces can be compressed in parallel: `encode` for
    any codec (the writer's path), `compress` for the one-frame codecs (`zstd`, `zstd-shuffle<W>`)."""

    def __init__(self, level: int = 1, native: bool = True):
        """`native=False`: never use zstandard's cffi backend (what runs where it is missing)."""
        self.level = level
        zstandard = _zstandard()
        self._params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=True)
        # Grouped planes: at level 1 a 128 KiB window and a 1 Ki-entry hash table measured both
        # faster (0.25 vs 0.20 GB/s on the exponent plane) and denser (3.0x vs 2.7x) than the
        # level's defaults, because the plane's repeats are short and local.
        self.plane_params = (zstandard.ZstdCompressionParameters.from_level(
            level, write_content_size=True, window_log=17, hash_log=10, chain_log=6, search_log=1,
            min_match=7) if level == 1 else self._params)
        self._local = threading.local()
        self.planes = PlaneEncoder(level, self._params, self.plane_params, native)

    def _zstd(self, grouped: bool) -> zstandard.ZstdCompressor:
        # A zstd context is not thread-safe, so each encode thread keeps its own two; reusing
        # them measured 5-10% less CPU per 16 MiB piece than a fresh context per call.
        ctxs = getattr(self._local, "ctxs", None)
        if ctxs is None:
            zstandard = _zstandard()
            ctxs = self._local.ctxs = (zstandard.ZstdCompressor(compression_params=self._params),
                                       zstandard.ZstdCompressor(compression_params=self.plane_params))
        return ctxs[grouped]

    def compress(self, piece: memoryview, width: int = 0) -> bytes:
        """One frame holding `piece`, byte-grouped first when `width` is not 0."""
        if not width:
            return self._zstd(False).compress(piece)
        return self._zstd(True).compress(shuffle(piece, width).data)

    def encode(self, piece: memoryview, codec: str) -> tuple[memoryview | bytes, tuple[int, ...]]:
        """(stored bytes, the lengths the manifest lists for them) of one piece under `codec`."""
        width = codec_width(codec)
        if isinstance(width, PlanesWidth):
            return self.planes.encode(piece, width)
        if codec == "raw":
            return piece, ()
        frame = self.compress(piece, width)
        return frame, (len(frame),)


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_decoders = threading.local()


def _decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="ckpt-unzstd")
        return _pool


def _decode_frame(frame: memoryview, size: int, where: str) -> bytes:
    """One zstd frame that must hold exactly `size` bytes; never allocates more than that."""
    # Guard before allocating: the header's size must be exactly this piece's (or plane's) size.
    if _declared_size(frame) != size:
        raise ValueError(f"{where}: a zstd frame declares a size other than its piece's "
                         f"{size} bytes")
    dctx = getattr(_decoders, "dctx", None)
    if dctx is None:
        dctx = _decoders.dctx = _zstandard().ZstdDecompressor()   # one per thread, reused
    raw = dctx.decompress(frame, max_output_size=max(size, 1))
    if len(raw) != size:
        raise ValueError(f"{where}: a zstd frame decodes to {len(raw)} bytes, expected {size}")
    return raw


def _decode_one(stored: memoryview, lengths: list[int], out: memoryview, width: int,
                where: str) -> None:
    if isinstance(width, PlanesWidth):
        planes.decode_piece(stored, lengths, out, width, where,
                            lambda frame, size: _decode_frame(frame, size, where))
        return
    raw = _decode_frame(stored, len(out), where)
    if width:
        unshuffle(raw, out, width)
    else:
        out[:] = raw


def _declared_size(frame: memoryview) -> int:
    try:
        return _zstandard().frame_content_size(frame)
    except Exception:  # noqa: BLE001 - zstandard raises its own ZstdError on a bad header
        return -2


def check_frames(stored: memoryview, frames: list[int], nbytes: int, where: str, width: int = 0) -> None:
    """Before the output of a record is allocated: its frames add up to the stored bytes, there are
    as many as its pieces (planes) call for, and each frame's header declares exactly its piece's
    (plane's) size. ValueError otherwise."""
    sizes, per = piece_sizes(nbytes), frames_per_piece(width)
    if width and nbytes % width:
        raise ValueError(f"{where}: {nbytes} bytes are not whole {width}-byte elements")
    if len(frames) != len(sizes) * per or sum(frames) != len(stored):
        raise ValueError(f"{where}: {len(frames)} zstd frames of {sum(frames)} bytes cannot hold "
                         f"{nbytes} bytes stored in {len(stored)}")
    pos = 0
    for i, length in enumerate(frames):
        content = sizes[i // per] // per
        if not isinstance(width, PlanesWidth) or length < content:
            if length < min_frame_size(content) or _declared_size(stored[pos:pos + length]) != content:
                raise ValueError(f"{where}: zstd frame {i} does not declare the {content} bytes of "
                                 "its piece (or plane)")
        pos += length


def decompress_frames(stored: memoryview, frames: list[int], out: memoryview, where: str,
                      width: int = 0, parallel: bool = True) -> None:
    """Decode the concatenated frames in `stored` into `out`; ValueError on any mismatch.

    `width` is codec_width() of the record's codec. Piece i (PIECE bytes, the last one the rest)
    is frames[i] (zstd-planes<W>: the W plane lengths frames[i*W:(i+1)*W]). Pieces decode in
    parallel (zstd and numpy release the GIL); the caller has verified `stored` already.
    """
    sizes = piece_sizes(len(out))
    per = frames_per_piece(width)
    if len(frames) != len(sizes) * per or sum(frames) != len(stored):
        raise ValueError(f"{where}: {len(frames)} zstd frames of {sum(frames)} bytes cannot hold "
                         f"{len(out)} bytes stored in {len(stored)}")
    if width and len(out) % width:
        raise ValueError(f"{where}: {len(out)} bytes are not whole {width}-byte elements")
    jobs, pos, filled = [], 0, 0
    for i, size in enumerate(sizes):
        lengths = frames[i * per:(i + 1) * per]
        length = sum(lengths)
        jobs.append((stored[pos:pos + length], lengths, out[filled:filled + size]))
        pos += length
        filled += size
    if len(jobs) == 1 or not parallel:
        for job in jobs:
            _decode_one(*job, width, where)
        return
    futures = [_decode_pool().submit(_decode_one, *job, width, where) for job in jobs]
    wait(futures)      # all of them, even after a failure: they write into `out`
    for fut in futures:
        fut.result()
