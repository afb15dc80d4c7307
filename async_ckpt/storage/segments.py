"""Segmented objects (`base.SegmentedWriter`) on a local file and on any one stream.

`LocalSegmentedWriter` (LocalStorage.open_segmented): one file, opened once; segment i starts at
the sum of the capacities before it, each rounded up to SEGMENT_ALIGN, so every segment's offset
is known before anything is written and the segments' threads write at once with ``os.pwrite``
on the one fd (each starting early writeback of its own range, as `local._LocalWriter` does).
Capacity a segment leaves unused is a hole (sparse, reads as zeros). ``commit`` sets the size to
the end of the last segment and fsyncs; ``abort`` unlinks. Durability and visibility are those of
a streamed local file: the engine makes the folder durable and a manifest names the file.

`SequentialSegments` (FsspecStorage and any backend with only a stream): segments one after
another through one `StreamWriter`, zero-padded to SEGMENT_ALIGN between them; ``parallel`` is
false, so the segments lose their concurrency.
"""
from __future__ import annotations

import os
import threading
from typing import Sequence

from . import libc
from .base import SEGMENT_ALIGN, ObjectLayout, StreamWriter

_WRITEBACK_EVERY = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2
_ZEROS = bytes(SEGMENT_ALIGN)


def align_segment(n: int) -> int:
    return -(-n // SEGMENT_ALIGN) * SEGMENT_ALIGN


def _over(index: int, capacity: int) -> ValueError:
    return ValueError(f"segment {index} was given {capacity} bytes and got more; the writer's "
                      "capacity estimate is wrong")


class _LocalSegment:
    """One segment of a `LocalSegmentedWriter`; used by one thread."""

    def __init__(self, owner: "LocalSegmentedWriter", index: int):
        self._owner, self._index = owner, index
        self._base, self._capacity = owner.bases[index], owner.capacities[index]
        self._written = self._flushed = 0

    def write(self, data: memoryview) -> None:
        view = memoryview(data)
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if self._written + len(view) > self._capacity:
            raise _over(self._index, self._capacity)
        fd = self._owner.fd()
        while len(view):
            n = os.pwrite(fd, view[: 1 << 30], self._base + self._written)
            view = view[n:]
            self._written += n
        if libc.sync_file_range is not None and self._written - self._flushed >= _WRITEBACK_EVERY:
            libc.sync_file_range(fd, self._base + self._flushed, self._written - self._flushed,
                                 _SYNC_FILE_RANGE_WRITE)
            self._flushed = self._written

    def close(self) -> int:
        self._owner.closed(self._index, self._written)
        return self._written


class LocalSegmentedWriter:
    """A segmented object in one local file; see the module docstring."""
    parallel = True

    def __init__(self, path: str, capacities: Sequence[int]):
        self._path = path
        self.capacities = [int(c) for c in capacities]
        self.bases, pos = [], 0
        for c in self.capacities:
            if c < 0:
                raise ValueError(f"a segment capacity must be >= 0, got {c}")
            self.bases.append(pos)
            pos = align_segment(pos + c)
        self._lengths: list[int | None] = [None] * len(self.capacities)
        self._lock = threading.Lock()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def fd(self) -> int:
        fd = self._fd
        if fd is None:
            raise OSError(f"{self._path} was committed or aborted while a segment was written")
        return fd

    def segment(self, index: int) -> _LocalSegment:
        with self._lock:
            if self._lengths[index] is not None:
                raise ValueError(f"segment {index} of {self._path} was written already")
            self._lengths[index] = -1        # open
        return _LocalSegment(self, index)

    def closed(self, index: int, length: int) -> None:
        with self._lock:
            self._lengths[index] = length

    def commit(self) -> ObjectLayout:
        if any(n == -1 for n in self._lengths):
            raise ValueError(f"{self._path}: commit while a segment is still open")
        lengths = [n or 0 for n in self._lengths]
        fd, self._fd = self.fd(), None
        try:
            size = self.bases[-1] + lengths[-1] if lengths else 0
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return ObjectLayout(size, tuple(zip(self.bases, lengths, strict=True)))

    def abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self._path)
        except OSError:
            pass


class _StreamSegment:
    def __init__(self, owner: "SequentialSegments", index: int, capacity: int):
        self._owner, self._index, self._capacity = owner, index, capacity
        self.written = 0

    def write(self, data: memoryview) -> None:
        n = memoryview(data).nbytes
        if self.written + n > self._capacity:
            raise _over(self._index, self._capacity)
        self._owner.out.write(data)
        self.written += n

    def close(self) -> int:
        self._owner.closed(self._index, self.written)
        return self.written


class SequentialSegments:
    """A segmented object written through one stream, segment after segment."""
    parallel = False

    def __init__(self, out: StreamWriter, capacities: Sequence[int], url: str = ""):
        self.out, self._url = out, url
        self._capacities = [int(c) for c in capacities]
        self._segments: list[tuple[int, int]] = []     # (offset, length) of the closed ones
        self._pos = 0
        self._open: int | None = None

    def segment(self, index: int) -> _StreamSegment:
        if self._open is not None or index != len(self._segments):
            raise ValueError(f"{self._url}: segments go through one stream here (parallel is false): "
                             f"segment {index} must wait until segments 0..{index - 1} were closed")
        pad = align_segment(self._pos) - self._pos
        if pad:
            self.out.write(memoryview(_ZEROS)[:pad])
            self._pos += pad
        self._open = index
        return _StreamSegment(self, index, self._capacities[index])

    def closed(self, index: int, length: int) -> None:
        self._segments.append((self._pos, length))
        self._pos += length
        self._open = None

    def commit(self) -> ObjectLayout:
        if self._open is not None:
            raise ValueError(f"{self._url}: commit while segment {self._open} is still open")
        while len(self._segments) < len(self._capacities):     # never opened: empty
            self._segments.append((align_segment(self._pos), 0))
        end = self._segments[-1][0] if self._segments else 0
        if end > self._pos:          # trailing empty segments: the object reaches their offset
            self.out.write(memoryview(_ZEROS)[:end - self._pos])
            self._pos = end
        self.out.commit()
        return ObjectLayout(self._pos, tuple(self._segments))

    def abort(self) -> None:
        self.out.abort()
