"""The floors every figure is judged against, measured in the same run as the peers.

All floors use one page-aligned anonymous buffer that holds the state's bytes back to back (what
a staged checkpoint is): memcpy copies the live tensors into it; the raw writes stream it to a
new file and fsync it (plain, and O_DIRECT where the filesystem accepts it); the cold read drops
the page cache and reads the raw file back into it.
"""
from __future__ import annotations

import errno
import mmap
import os
import time

import torch

from async_ckpt.storage.local import fsync_dir

from ..common import PageCache

ALIGN = 4096
SLOT = 64
CHUNK = 8 << 20       # O_DIRECT and read chunk: large enough to keep the disk streaming


class Floors:
    def __init__(self, state: dict[str, torch.Tensor], folder: str, cache: PageCache):
        self.tensors = list(state.values())
        # 64-byte aligned slots, as async_ckpt's staging plan lays them out (typed views need it)
        offsets, off = [], 0
        for t in self.tensors:
            offsets.append(off)
            off = -(-(off + t.numel() * t.element_size()) // SLOT) * SLOT
        self.nbytes = off
        self.padded = -(-self.nbytes // ALIGN) * ALIGN
        self.buf = mmap.mmap(-1, self.padded)
        whole = torch.frombuffer(self.buf, dtype=torch.uint8)
        self.views = [whole[o:o + t.numel() * t.element_size()].view(t.dtype)
                      for o, t in zip(offsets, self.tensors)]
        self.folder, self.cache = os.path.join(folder, "floors"), cache
        os.makedirs(self.folder, exist_ok=True)
        self.raw_path = os.path.join(self.folder, "raw.bin")
        self.odirect_error: str | None = None
        self.memcpy()            # touch every page once: the floor is the steady state

    def memcpy(self) -> float:
        t0 = time.perf_counter()
        for d, s in zip(self.views, self.tensors):
            d.copy_(s.view(-1))
        return time.perf_counter() - t0

    def raw_write(self) -> float:
        """Sequential os.write of the staged bytes + fsync file + fsync folder."""
        self.cache.settle()
        view = memoryview(self.buf)[:self.nbytes]
        t0 = time.perf_counter()
        fd = os.open(self.raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while len(view):
                view = view[os.write(fd, view[:1 << 30]):]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.folder)
        return time.perf_counter() - t0

    def odirect_write(self) -> float | None:
        """The same bytes with O_DIRECT (page cache bypassed) + fsync; None where unsupported."""
        if self.odirect_error or not hasattr(os, "O_DIRECT"):
            self.odirect_error = self.odirect_error or "os.O_DIRECT missing on this platform"
            return None
        path = os.path.join(self.folder, "odirect.bin")
        self.cache.settle()
        view = memoryview(self.buf)     # padded to ALIGN: O_DIRECT wants aligned lengths
        t0 = time.perf_counter()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as exc:
            self.odirect_error = f"open(O_DIRECT) failed: {exc!r}"
            return None
        try:
            while len(view):
                view = view[os.write(fd, view[:CHUNK]):]
            os.fsync(fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.odirect_error = f"write(O_DIRECT) failed: {exc!r}"
            return None
        finally:
            os.close(fd)
            fsync_dir(self.folder)
        dt = time.perf_counter() - t0
        os.unlink(path)
        return dt

    def cold_read(self) -> float:
        """Drop the page cache, then read the raw file back into the staged buffer."""
        if not os.path.exists(self.raw_path):
            self.raw_write()
        self.cache.settle()
        view = memoryview(self.buf)[:self.nbytes]
        t0 = time.perf_counter()
        with open(self.raw_path, "rb", buffering=0) as f:
            while len(view):
                n = f.readinto(view[:1 << 30])
                if not n:
                    raise RuntimeError(f"{self.raw_path} is shorter than the state: rerun the floors")
                view = view[n:]
        return time.perf_counter() - t0

    def close(self) -> None:
        self.views = []     # the case's load target views go with the case
        try:
            self.buf.close()
        except BufferError:     # a view still alive: the mapping goes with the process
            pass
