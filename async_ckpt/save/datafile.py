"""Streaming one rank's staged tensors into one data file.

Pipeline (all off the training thread): an encode pool encodes pieces (zstd codecs only) ->
one hash thread, in file order, updates each record's hash and the whole file's hash ->
the calling writer thread writes the pieces in order. Hashing and writing overlap, so hashing is
nearly free next to the write. Records start on ALIGN boundaries so a reader can view them in place.
"""
from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..format.codec import ALIGN, PIECE, Compressor, align_up, codec_width, new_hasher
from ..format.planes import PREFIX as PLANES_PREFIX, PlanesWidth
from ..storage import StreamWriter
from ..storage.base import SegmentStream

_ZEROS = memoryview(bytes(ALIGN))
_LOOKAHEAD = 6


@dataclass(frozen=True)
class RecordResult:
    offset: int
    length: int
    hash: str
    frames: tuple[int, ...]
    codec: str = "raw"


@dataclass(frozen=True)
class FileResult:
    size: int
    hash: str
    records: tuple[RecordResult, ...]


@dataclass
class _Record:
    """The record being hashed (hash thread only)."""
    hasher: Any = None
    frames: list[int] = field(default_factory=list)
    length: int = 0


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


class DataFileStreamer:
    """Long-lived executors reused by every save of one node writer."""

    def __init__(self, compressor: Compressor | None, encode_threads: int = 2):
        self.compressor = compressor
        self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash")
        self._encode_pool = (ThreadPoolExecutor(encode_threads, thread_name_prefix="ckpt-zstd")
                             if compressor else None)

    def close(self) -> None:
        self._hash_pool.shutdown(wait=True)
        if self._encode_pool:
            self._encode_pool.shutdown(wait=True)

    def write_file(self, storage, path: str, records: Iterable[memoryview],
                   codecs: Sequence[str] | None = None) -> FileResult:
        """Stream `records` into a new file at `path`; it appears only if everything was written."""
        out = storage.open_writer(path)
        try:
            result = self.write(out, records, codecs)
            out.commit()
        except BaseException:
            out.abort()
            raise
        return result

    def _codec(self, record: memoryview, wanted: str | None) -> str:
        """The codec a record is stored with: `wanted` (from its dtype, see codec.codec_for; None:
        "zstd" with a compressor, else "raw"), but never a grouping its length cannot take."""
        if wanted is None:
            return "zstd" if self.compressor else "raw"
        if wanted != "raw" and self.compressor is None:
            raise ValueError(f"codec {wanted!r} needs a compressor; this writer only stores raw")
        width = codec_width(wanted)
        if width and len(record) % width:
            return f"{PLANES_PREFIX}1" if isinstance(width, PlanesWidth) else "zstd"
        return wanted

    def write(self, out: StreamWriter | SegmentStream, records: Iterable[memoryview],
              codecs: Sequence[str] | None = None) -> FileResult:
        """Write each raw record (already staged) to `out` (a whole file, or one segment of a
        node's data object); return offsets, lengths and hashes.

        `codecs[i]` is the codec record i should get (None: "zstd" with a compressor, else "raw");
        each RecordResult says the codec it got."""
        file_hasher = new_hasher()
        results: list[RecordResult] = []
        current = _Record()

        def hash_piece(enc: Future, first: bool, last: bool, codec: str):
            data, frames = enc.result()
            if first:
                current.hasher, current.frames, current.length = new_hasher(), [], 0
            current.hasher.update(data)
            file_hasher.update(data)
            current.frames.extend(frames)
            current.length += len(data)
            pad = 0
            if last:
                pad = align_up(current.length) - current.length
                if pad:
                    file_hasher.update(_ZEROS[:pad])
                done = (current.length, current.hasher.hexdigest(), tuple(current.frames), codec)
                return data, pad, done
            return data, pad, None

        pending: collections.deque = collections.deque()
        offset = 0

        def drain_one() -> None:
            nonlocal offset
            data, pad, done = pending.popleft().result()
            out.write(data)
            if pad:
                out.write(_ZEROS[:pad])
            if done is not None:
                length, digest, frames, codec = done
                start = offset - (length - len(data))
                results.append(RecordResult(start, length, digest,
                                            frames if codec != "raw" else (), codec))
            offset += len(data) + pad

        try:
            for n, record in enumerate(records):
                codec = self._codec(record, codecs[n] if codecs is not None else None)
                pieces = [record[i:i + PIECE] for i in range(0, len(record), PIECE)] or [record]
                for i, piece in enumerate(pieces):
                    if codec == "raw":
                        enc = _done((piece, ()))
                    else:
                        assert self._encode_pool is not None and self.compressor is not None
                        enc = self._encode_pool.submit(self.compressor.encode, piece, codec)
                    pending.append(self._hash_pool.submit(hash_piece, enc, i == 0,
                                                          i == len(pieces) - 1, codec))
                    while len(pending) > _LOOKAHEAD:
                        drain_one()
            while pending:
                drain_one()
        except BaseException:
            # Workers still read the staging buffer; it must not be reused before they stop.
            for fut in pending:
                fut.exception()
            raise
        return FileResult(offset, file_hasher.hexdigest(), tuple(results))
