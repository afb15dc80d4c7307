"""Local filesystem backend: raw fds, fsync'd files and folders, atomic exclusive create.

Reads (`read_limited`, `read_into`, `map_private`, `size`) go through `_open_regular`: it walks
from the root one name at a time with directory fds, refuses any symlink below the root (the
root itself may be one: it is the anchor), looks at the entry before opening it (a device is never
opened, a FIFO is opened without blocking and refused), and checks the opened fd is the regular
file it looked at. A checkpoint writer never makes symlinks, FIFOs or devices, so none of this
refuses a checkpoint that was written by one.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import stat
from typing import Any, Sequence

from . import libc
from .base import scratch_name
from .segments import LocalSegmentedWriter

_WRITEBACK_EVERY = 8 << 20


_SYNC_FILE_RANGE_WRITE = 2


def _owned_mapping(addr: int, size: int):
    """A ctypes byte array over [addr, addr + size) that munmaps it when it is freed (it supports
    the buffer protocol, so torch.frombuffer views keep it alive)."""
    munmap = libc.munmap     # bound now: module globals may be gone when this runs at exit

    def release(self) -> None:
        munmap(ctypes.addressof(self), size)

    mapping: Any = type("PrivateMapping", (ctypes.c_uint8 * size,), {"__del__": release})
    return mapping.from_address(addr)


def _write_all(fd: int, data: memoryview) -> None:
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while len(view):
        written = os.write(fd, view[: 1 << 30])
        view = view[written:]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symlink"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(full: str, mode: int) -> OSError:
    if stat.S_ISLNK(mode):
        return OSError(errno.ELOOP, f"{full} is reached through a symlink below the checkpoint "
                                    "root; refusing to follow it (checkpoints never contain symlinks)")
    if stat.S_ISDIR(mode):
        return IsADirectoryError(errno.EISDIR, f"{full} is a folder, not a regular file")
    return OSError(errno.EINVAL, f"{full} is {_kind(mode)}, not a regular file; refusing to read it")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalWriter:
    def __init__(self, path: str):
        self._path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._written = self._flushed = 0

    def write(self, data: memoryview) -> None:
        assert self._fd is not None, "write after commit/abort"
        _write_all(self._fd, memoryview(data))
        self._written += len(data)
        if libc.sync_file_range is not None and self._written - self._flushed >= _WRITEBACK_EVERY:
            # Start writeback now instead of leaving it all to the final fsync: the disk works
            # while we keep copying into the page cache (measured ~20% faster durable writes).
            libc.sync_file_range(self._fd, self._flushed, self._written - self._flushed, _SYNC_FILE_RANGE_WRITE)
            self._flushed = self._written

    def commit(self) -> None:
        assert self._fd is not None, "commit after commit/abort"
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._path)
        except OSError:
            pass


class LocalStorage:
    """Storage rooted at a local folder."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = self.root

    def _p(self, path: str) -> str:
        return os.path.join(self.root, *path.split("/")) if path else self.root

    def check_root(self) -> None:
        path = self.root
        while not os.path.exists(path):
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise NotADirectoryError(f"{path} is not a directory")

    def check_writable(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        probe = self._p(scratch_name("write-probe"))
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.unlink(probe)

    def open_writer(self, path: str) -> _LocalWriter:
        full = self._p(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return _LocalWriter(full)

    def open_segmented(self, path: str, capacities: Sequence[int]) -> LocalSegmentedWriter:
        """One file; each segment written at its own offset by its own thread (segments.py)."""
        full = self._p(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return LocalSegmentedWriter(full, capacities)

    def create_exclusive(self, path: str, data: bytes) -> None:
        full = self._p(path)
        folder = os.path.dirname(full)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, scratch_name("tmp", os.path.basename(full)))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                _write_all(fd, memoryview(data))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                # link() is atomic and, unlike replace(), refuses to clobber a concurrent commit.
                os.link(tmp, full)
            except FileExistsError:
                raise
            except OSError:
                if os.path.exists(full):
                    raise FileExistsError(full) from None
                os.replace(tmp, full)
        finally:
            # On every way out, a failed write (a full disk) included: the temp file never
            # outlives the call. A kill in between leaves it to the engine's sweep.
            if os.path.exists(tmp):
                os.unlink(tmp)
        fsync_dir(folder)

    def sync_dir(self, path: str) -> None:
        fsync_dir(self._p(path))

    def read_bytes(self, path: str) -> bytes:
        with open(self._p(path), "rb") as f:
            return f.read()

    def _open_regular(self, path: str) -> tuple[int, os.stat_result]:
        """(read-only fd, its stat) of the regular file `path`, reached from the root without
        following a symlink below it; OSError otherwise (see the module docstring)."""
        names = path.split("/")
        full = self._p(path)
        if any(n in ("", ".", "..") for n in names):
            raise OSError(errno.EINVAL, f"{full}: {path!r} is not a plain path below the root")
        dirfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)     # the anchor: may be a symlink
        try:
            for name in names[:-1]:
                mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
                if not stat.S_ISDIR(mode):
                    raise _refuse(full, mode) if stat.S_ISLNK(mode) else NotADirectoryError(
                        errno.ENOTDIR, f"{full}: {name} is not a folder")
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
                os.close(dirfd)
                dirfd = fd
            # Look first: opening a device can have effects of its own; a FIFO would block.
            seen = os.stat(names[-1], dir_fd=dirfd, follow_symlinks=False)
            if not stat.S_ISREG(seen.st_mode):
                raise _refuse(full, seen.st_mode)
            fd = os.open(names[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY,
                         dir_fd=dirfd)
        finally:
            os.close(dirfd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
            os.close(fd)
            raise OSError(errno.EAGAIN, f"{full} was replaced while it was being opened; refusing it")
        return fd, st

    def read_limited(self, path: str, limit: int) -> bytes:
        fd, st = self._open_regular(path)
        try:
            if st.st_size > limit:
                raise OSError(errno.EFBIG, f"{self._p(path)} holds {st.st_size} bytes, more than the "
                                           f"{limit} a file of its kind may have")
            parts, got = [], 0
            while got <= limit:          # the size may change under us: read at most limit + 1
                chunk = os.read(fd, min(limit + 1 - got, 1 << 24))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        finally:
            os.close(fd)
        if got > limit:
            raise OSError(errno.EFBIG, f"{self._p(path)} grew past {limit} bytes while being read")
        return b"".join(parts)

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        view = out.cast("B") if out.format != "B" else out
        fd, _ = self._open_regular(path)
        with open(fd, "rb", buffering=0) as f:
            f.seek(offset)
            while len(view):
                n = f.readinto(view[: 1 << 30])
                if not n:
                    raise EOFError(f"{self._p(path)} ends before offset {offset} + {len(out)}")
                view = view[n:]

    def map_private(self, path: str, offset: int, length: int):
        """`length` bytes at `offset` as a private (copy-on-write) mapping: (a ctypes byte array
        that unmaps itself when freed, how many bytes before `offset` it starts; mappings start
        on a page boundary). Pages are read on first touch; writes never reach the file.
        OSError where the file cannot be mapped."""
        if libc.mmap is None or libc.munmap is None or not hasattr(mmap, "MAP_PRIVATE"):
            raise OSError(errno.ENOSYS, "no mmap here")
        lead = offset % mmap.ALLOCATIONGRANULARITY
        fd, _ = self._open_regular(path)
        try:
            addr = libc.mmap(None, length + lead, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_PRIVATE, fd, offset - lead)
        finally:
            os.close(fd)       # the mapping holds the file by itself
        if addr in (None, libc.MAP_FAILED):
            raise libc.last_error(f"mmap of {self._p(path)}")
        return _owned_mapping(addr, length + lead), lead

    def size(self, path: str) -> int:
        fd, st = self._open_regular(path)
        os.close(fd)
        return st.st_size

    def exists(self, path: str) -> bool:
        return os.path.exists(self._p(path))

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def find_named(self, name: str, max_requests: int = 0) -> list[str]:
        """Folders directly under the root holding an entry `name` (see base.py): one scan of
        the root, then the same check as ``exists`` per entry (no request to count here)."""
        return [folder for folder in self.list_dir("")
                if os.path.exists(os.path.join(self._p(folder), name))]

    def delete(self, path: str) -> None:
        try:
            os.unlink(self._p(path))
        except FileNotFoundError:
            pass

    def delete_dir(self, path: str) -> None:
        shutil.rmtree(self._p(path), ignore_errors=True)

    def child_url(self, path: str) -> str:
        return self._p(path)

    def resolves_inside(self, folder: str, name: str) -> bool:
        """True when `folder/name` (after symlinks) stays inside `folder`."""
        base = os.path.realpath(self._p(folder))
        return os.path.realpath(os.path.join(base, name)).startswith(base + os.sep)
