"""Streaming one rank's staged tensors into one data file.

Pipeline (all off the training thread): an encode pool compresses pieces (zstd only) ->
one hash thread, in file order, updates each record's hash and the whole file's hash ->
the calling writer thread writes the pieces in order. Hashing and writing overlap, so hashing is
nearly free next to the write. Records start on ALIGN boundaries so a reader can view them in place.
"""
from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

from .codec import ALIGN, PIECE, Compressor, align_up, new_hasher
from .storage import StreamWriter

_ZEROS = memoryview(bytes(ALIGN))
_LOOKAHEAD = 6


@dataclass(frozen=True)
class RecordResult:
    offset: int
    length: int
    hash: str
    frames: tuple[int, ...]


@dataclass(frozen=True)
class FileResult:
    size: int
    hash: str
    records: tuple[RecordResult, ...]


def _done(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


class DataFileWriter:
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

    def write_file(self, storage, path: str, records: Iterable[memoryview]) -> FileResult:
        """Stream `records` into a new file at `path`; it appears only if everything was written."""
        out = storage.open_writer(path)
        try:
            result = self.write(out, records)
            out.commit()
        except BaseException:
            out.abort()
            raise
        return result

    def write(self, out: StreamWriter, records: Iterable[memoryview]) -> FileResult:
        """Write each raw record (already staged) to `out`; return offsets, lengths and hashes."""
        file_hasher = new_hasher()
        results: list[RecordResult] = []
        state = {"hasher": None, "frames": [], "length": 0}

        def hash_piece(enc: Future, first: bool, last: bool):
            data = enc.result()
            if first:
                state["hasher"], state["frames"], state["length"] = new_hasher(), [], 0
            state["hasher"].update(data)
            file_hasher.update(data)
            state["frames"].append(len(data))
            state["length"] += len(data)
            pad = 0
            if last:
                pad = align_up(state["length"]) - state["length"]
                if pad:
                    file_hasher.update(_ZEROS[:pad])
                done = (state["length"], state["hasher"].hexdigest(), tuple(state["frames"]))
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
                length, digest, frames = done
                start = offset - (length - len(data))
                results.append(RecordResult(start, length, digest,
                                            frames if self.compressor else ()))
            offset += len(data) + pad

        try:
            for record in records:
                pieces = [record[i:i + PIECE] for i in range(0, len(record), PIECE)] or [record]
                for i, piece in enumerate(pieces):
                    enc = (self._encode_pool.submit(self.compressor.compress, piece)
                           if self._encode_pool else _done(piece))
                    pending.append(self._hash_pool.submit(hash_piece, enc, i == 0, i == len(pieces) - 1))
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
