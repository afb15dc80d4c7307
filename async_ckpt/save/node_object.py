"""One data object per node: each local rank's records are one *segment* of it.

A node writer with more than one local rank writes one object, ``data-n<node>-<rand>.bin``, per
save instead of one file per rank (O(nodes) objects per checkpoint). Call sequence, for one save:

1. node writer thread: `write_node_object` lays the object out: one segment per local rank, in
   local rank order (segment i: local rank i, so a reader knows which rank wrote a record; empty
   for a rank without records), each given an upper bound of its stored bytes
   (`codec.stored_bound`: exact for raw records, zstd's compress bound per piece for compressed
   ones), and opens it with `Storage.open_segmented`;
2. one thread per segment (``ckpt-node-seg``; or the node writer thread itself, segment after
   segment, on a backend whose segments are not ``parallel``): stream that rank's records through
   `DataFileStreamer.write` into its segment, hashing in the same pass (the segment's hash is the
   xxh3-128 of its bytes, as a rank file's whole-file hash was), then close it; the first failure
   stops the other segments at their next write;
3. node writer thread: commit the object (or abort it on any failure: nothing stays visible),
   then shift each record's offset by its segment's offset, now known, and describe the object
   as a `WrittenFile` with its segments (``hash`` is `codec.segments_hash` of them).

Whether a node writes one object or one file per rank is `CheckpointOptions.node_object`
(a benchmark and compatibility knob); a node of one rank always writes the plain file of before.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Sequence

from ..dist.messages import WrittenFile
from ..format.codec import segments_hash, stored_bound
from ..storage import Storage
from ..storage.base import SegmentStream
from .datafile import DataFileStreamer, FileResult


@dataclass(frozen=True)
class RankRecords:
    """One local rank's staged records (views of its staging buffer) and the codec each wants."""
    rank: int
    records: Sequence[memoryview]
    codecs: Sequence[str]

    def capacity(self) -> int:
        """The most bytes these records can take once written (padding included)."""
        return sum(stored_bound(len(r), c) for r, c in zip(self.records, self.codecs, strict=True))


class _Stopped(Exception):
    """Another segment of the object failed; this one stops writing."""


class _Guarded:
    """A segment stream that refuses further writes once any segment of the object failed."""

    def __init__(self, inner: SegmentStream, failed: threading.Event):
        self._inner, self._failed = inner, failed

    def write(self, data: memoryview) -> None:
        if self._failed.is_set():
            raise _Stopped("another segment of this node's data object failed")
        self._inner.write(data)

    def close(self) -> int:
        return self._inner.close()


def object_name(node: int) -> str:
    return f"data-n{node:05d}-{os.urandom(4).hex()}.bin"


def write_node_object(storage: Storage, streamer: DataFileStreamer, folder: str, node: int,
                      ranks: Sequence[RankRecords]) -> tuple[WrittenFile, dict[int, FileResult]]:
    """Write `ranks`' records as the segments of one new object in `folder`; (the object as the
    node report lists it, each rank's records with their offsets in the object)."""
    name = object_name(node)
    writer = storage.open_segmented(f"{folder}/{name}", [r.capacity() for r in ranks])
    failed = threading.Event()

    def one(index: int) -> FileResult:
        try:
            segment = _Guarded(writer.segment(index), failed)
            result = streamer.write(segment, ranks[index].records, ranks[index].codecs)
            if segment.close() != result.size:
                raise OSError(f"segment {index} of {storage.child_url(f'{folder}/{name}')} took "
                              f"other bytes than were written to it")
            return result
        except BaseException:
            failed.set()
            raise

    try:
        if writer.parallel and len(ranks) > 1:
            with ThreadPoolExecutor(len(ranks), thread_name_prefix="ckpt-node-seg") as pool:
                futures = [pool.submit(one, i) for i in range(len(ranks))]
                wait(futures)                  # every segment stopped before any abort
            errors = [e for e in (f.exception() for f in futures) if e is not None]
            if errors:       # the failure itself, not a segment that stopped because of it
                raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
            results = [f.result() for f in futures]
        else:
            results = [one(i) for i in range(len(ranks))]
        layout = writer.commit()
    except BaseException:
        writer.abort()
        raise
    segments = tuple((offset, length, result.hash)
                     for (offset, length), result in zip(layout.segments, results, strict=True))
    shifted = {
        r.rank: FileResult(result.size, result.hash, tuple(
            dataclasses.replace(rec, offset=rec.offset + offset) for rec in result.records))
        for r, result, (offset, _) in zip(ranks, results, layout.segments, strict=True)}
    return WrittenFile(name, layout.size, segments_hash(segments), segments), shifted
