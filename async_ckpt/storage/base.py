"""The `Storage` protocol: byte movement only; it knows nothing of checkpoints.

Paths are relative to the storage root and use "/" separators. Call sequence for one save, all
from the node writer thread: ``open_writer`` per data file -> ``write`` ... -> ``commit`` (durable)
or ``abort`` (or, for a node's one data object, ``open_segmented`` whose segments other threads
fill: `SegmentedWriter`); ``sync_dir`` on the folder; ``create_exclusive`` for the manifest (the commit point).
Readers (any thread) use ``read_limited``/``read_bytes``/``read_into``/``size``/``exists``/
``list_dir``; retention uses ``delete``/``delete_dir``. Loaders treat what they read as hostile:
``read_limited`` reads small documents (manifests, metrics) with a size bound, and on a
filesystem ``read_limited``, ``read_into`` and ``size`` accept only regular files reached from the
root without following a symlink below it (never a FIFO or device, never a path out of the root;
the root itself may be a symlink: it is the anchor). Errors are the builtin OSError family (FileNotFoundError,
FileExistsError, EOFError for short reads, ...) and, from `errors.py`, `StorageConfigError` (the
root cannot work as configured) and `StorageUnavailableError` (transient failures past the retry
deadline), both OSErrors; the engine translates them into CheckpointErrors. `registry.py` maps a
root's URL scheme to the backend that serves it.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

SCRATCH_PREFIXES = (".tmp-", ".write-probe-")
_SCRATCH_RE = re.compile(r"^\.(?:tmp|write-probe)-(\d{20})-")


def scratch_name(kind: str, suffix: str = "") -> str:
    """The name of a temporary object a backend creates and removes itself (``tmp``: a file
    being written before it is linked into place; ``write-probe``: the writability check). The
    creation time is in the name, so an engine can sweep what a killed process left behind
    (`is_stale_scratch`) without the backend having to report modification times."""
    return f".{kind}-{time.time_ns():020d}-{os.urandom(6).hex()}{'-' + suffix if suffix else ''}"


def is_stale_scratch(name: str, before_ns: int) -> bool:
    """Whether `name` is a backend's scratch object created before `before_ns` (time.time_ns()).
    Scratch objects of older releases (no time in the name) count as stale."""
    if not name.startswith(SCRATCH_PREFIXES):
        return False
    match = _SCRATCH_RE.match(name)
    return match is None or int(match.group(1)) < before_ns


@runtime_checkable
class StreamWriter(Protocol):
    def write(self, data: memoryview) -> None:
        """Append `data` (any length) to the object being written."""

    def commit(self) -> None:
        """Make everything written durable and visible under the final name."""

    def abort(self) -> None:
        """Discard what was written; never raises."""


SEGMENT_ALIGN = 4096   # every segment of a segmented object starts on this boundary (a page)


@dataclass(frozen=True)
class ObjectLayout:
    """Where the segments of a committed segmented object lie: ``segments[i]`` is segment i's
    (offset, length) in the object; `size` is the object's size."""
    size: int
    segments: tuple[tuple[int, int], ...]


@runtime_checkable
class SegmentStream(Protocol):
    def write(self, data: memoryview) -> None:
        """Append `data` to this segment; ValueError past the segment's capacity."""

    def close(self) -> int:
        """This segment is complete (its bytes are on their way); how many bytes it holds."""


@runtime_checkable
class SegmentedWriter(Protocol):
    """One new object written as consecutive *segments*, each streamed by its own writer.

    Call sequence: the owner (the node writer thread) calls ``Storage.open_segmented(path,
    capacities)``; then, when ``parallel`` is true, one thread per segment (any threads, all at
    once) calls ``segment(i)`` -> ``write`` ... -> ``close``; when it is false, segments must be
    written one after another, ``segment(i)`` only after segment i - 1 was closed (one thread
    may do them all). After every segment was closed (a segment never opened is empty) the
    owner calls ``commit`` (durable and visible under the final name, like `StreamWriter.commit`;
    the ObjectLayout says where each segment landed), or at any point ``abort`` (after the
    segment threads stopped: nothing is left visible; never raises). Segment starts are
    multiples of SEGMENT_ALIGN, in segment order, never overlapping; bytes between segments read
    as zeros. Where segment offsets must be known before writing (local files), segment i is
    given `capacities[i]` bytes; no segment may take more than its capacity on any backend."""
    parallel: bool

    def segment(self, index: int) -> SegmentStream: ...

    def commit(self) -> ObjectLayout: ...

    def abort(self) -> None: ...


@runtime_checkable
class Storage(Protocol):
    url: str

    def check_root(self) -> None:
        """Without writing anything, raise OSError if the root can never hold checkpoints
        (e.g. a local path that is, or lies under, a regular file)."""

    def check_writable(self) -> None:
        """Create the root if needed and prove that it takes writes (raise OSError otherwise)."""

    def open_writer(self, path: str) -> StreamWriter:
        """Start a streamed write of a new object at `path` (parent folders created)."""

    def open_segmented(self, path: str, capacities: Sequence[int]) -> SegmentedWriter:
        """Start a write of a new object at `path` (parent folders created) made of
        ``len(capacities)`` segments that separate writers fill, concurrently where the backend
        can (see `SegmentedWriter` for the call sequence and threads). Local files: one file,
        each segment written at its own offset (``os.pwrite``); S3: one multipart upload, each
        segment from its own range of part numbers; other fsspec filesystems: one stream,
        segments one after another (``parallel`` is false)."""

    def create_exclusive(self, path: str, data: bytes) -> None:
        """Atomically create `path` (parents created) with `data`, durably; FileExistsError if it exists."""

    def sync_dir(self, path: str) -> None:
        """Make the folder's entries durable (a no-op where the backend has no folders)."""

    def read_bytes(self, path: str) -> bytes:
        """The whole object."""

    def read_limited(self, path: str, limit: int) -> bytes:
        """The whole object if it holds at most `limit` bytes, never reading more than `limit + 1`:
        FileNotFoundError if it is missing, OSError (errno EFBIG) if it is larger and, on a
        filesystem, OSError if it is not a regular file (a FIFO is never opened in a way that
        blocks, a device never read) or is reached through a symlink below the root."""

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        """Fill `out` from `offset`; EOFError if the object ends first. On a filesystem, OSError
        for what `read_limited` refuses."""

    def size(self, path: str) -> int:
        """Bytes in the object. On a filesystem, OSError for what `read_limited` refuses (a FIFO or
        device has no size a reader could trust; a symlink below the root may lead out of it)."""

    def exists(self, path: str) -> bool: ...

    def list_dir(self, path: str) -> list[str]:
        """Names of the immediate children of folder `path` ([] if it does not exist)."""

    def delete(self, path: str) -> None:
        """Remove one object; a missing one is fine."""

    def delete_dir(self, path: str) -> None:
        """Remove a folder and everything under it (on S3 also aborting unfinished multipart
        uploads there); a missing one is fine. Best effort: never raises; what could not be
        removed is logged and stays as garbage for the next cleanup."""

    def child_url(self, path: str) -> str:
        """A URL for `path` under the root, for messages and CheckpointInfo.url."""


# Optional capability (looked up with getattr, like S3's ``list_uploads``):
#
#     def find_named(self, name: str, max_requests: int) -> list[str] | None:
#         """Folders directly under the root that hold an entry `name` (as ``exists`` sees
#         it: ``exists(f"{folder}/{name}")`` is true for exactly these), found in at most
#         `max_requests` requests, or None when that is not enough (the caller then asks
#         ``exists`` per folder)."""
#
# Local folders answer it with one directory scan; S3 with one paginated listing of the root
# (ListObjectsV2 without a delimiter: a page holds 1,000 keys of any folder), which beats one
# HEAD per step folder while the folders hold few objects each.
