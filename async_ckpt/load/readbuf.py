"""Where loaded records live in host memory: private mappings of local files, or fresh buffers.

Local files are mapped (MAP_PRIVATE) and populated chunk by chunk by a background thread with
MADV_POPULATE_READ, while the loader hashes each chunk as soon as it is in. The bytes land in the
page cache by DMA and are mapped, never copied, and no fresh anonymous memory has to be faulted
in: on this VM faulting in fresh memory costs ~0.5 CPU-s per GiB, more than the disk takes to
read it (numbers in docs/design.md, "Loading"). Other backends (and kernels without
MADV_POPULATE_READ) read into fresh `torch.empty` buffers. The mapping itself is made by
the storage backend (`LocalStorage.map_private`), so reads stay observable at the storage layer.

Ownership of a mapping. The tensors handed to `load_state_dict` view it; torch keeps the mapping
object alive while any view does, and freeing it unmaps it. A file-backed mapping must not outlive
the load: it would pin a checkpoint that retention later deletes (its disk space is not freed while
mapped), and truncating the file would make the pages raise SIGBUS. So `ReadSession.finish()`
runs after every `load_state_dict`: a mapping nobody kept is gone already (a module copied out of
it); one still alive (an optimizer kept its tensors) is copied into anonymous memory which is then
`mremap`ped over the same addresses, so the kept tensors keep their data and lose the file.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from ..format.codec import byte_view
from ..storage import libc

log = logging.getLogger("async_ckpt")

CHUNK = 16 << 20          # populate/read/hash step: big enough to keep the disk streaming
_MADV_POPULATE_READ = 22  # Linux >= 5.14
_MADV_POPULATE_WRITE = 23
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_PAGE = mmap.ALLOCATIONGRANULARITY


_HAVE_LIBC = None not in (libc.mmap, libc.munmap, libc.madvise, libc.mremap) and hasattr(
    mmap, "MAP_ANONYMOUS")
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_populate_ok: bool | None = None


_memory: int | None = None


def memory_limit() -> int:
    """The most bytes one buffer of a load may take: this machine's physical memory, or its
    cgroup's limit where that is lower. A record or byte range larger than this could never be
    loaded here, so it is refused before anything is allocated or read (a hostile manifest may
    claim a terabyte in a sparse file)."""
    global _memory
    if _memory is None:
        try:
            limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            limit = 1 << 62
        try:
            with open("/sys/fs/cgroup/memory.max") as f:
                text = f.read().strip()
            if text.isdigit():
                limit = min(limit, int(text))
        except OSError:
            pass
        _memory = limit
    return _memory


def _read_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(2, thread_name_prefix="ckpt-read")
        return _pool


def _madvise(addr: int, length: int, advice: int) -> None:
    if libc.madvise(addr, length, advice) != 0:
        raise libc.last_error(f"madvise({advice})")


def mapping_supported() -> bool:
    """Whether this kernel populates mappings on request (checked once, on one anonymous page).
    Without it a mapped read would fault pages in while hashing, where an I/O error is a SIGBUS."""
    global _populate_ok
    if _populate_ok is None:
        _populate_ok = False
        if _HAVE_LIBC:
            page = libc.mmap(None, _PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            if page not in (None, libc.MAP_FAILED):
                _populate_ok = libc.madvise(page, _PAGE, _MADV_POPULATE_READ) == 0
                libc.munmap(page, _PAGE)
    return _populate_ok


class Filled:
    """How much of a block a background job has put in memory; `wait(n)` blocks until its first
    `n` bytes are there and re-raises the job's error. `cancel()` stops the job early and returns
    once it has stopped (so a load that gave up leaves no read in flight and no file open)."""

    def __init__(self, total: int):
        self.total, self.done, self.cancelled = total, 0, False
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._stopped = threading.Event()

    def stopped(self) -> None:
        """The background job has returned (called by the job, last)."""
        self._stopped.set()

    def advance(self, done: int) -> None:
        with self._cond:
            self.done = done
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            self._cond.notify_all()

    def wait(self, n: int) -> None:
        with self._cond:
            while self.done < n and self.error is None:
                self._cond.wait()
            if self.error is not None:
                raise self.error

    def cancel(self) -> None:
        self.cancelled = True
        # The job checks `cancelled` between chunks: one chunk read at most (16 MiB).
        if not self._stopped.wait(60):
            log.warning("a background read did not stop within 60 s of its load giving up")


def _populate(whole: torch.Tensor, lead: int, filled: Filled) -> None:
    addr, size = whole.data_ptr(), whole.numel()
    try:
        for pos in range(0, size, CHUNK):
            if filled.cancelled:
                return
            n = min(CHUNK, size - pos)
            # EFAULT here is what would be a SIGBUS on access (an I/O error, a file truncated
            # under us): raised to the loader as an OSError instead of killing the process.
            _madvise(addr + pos, n, _MADV_POPULATE_READ)
            filled.advance(max(0, pos + n - lead))
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting loader
        filled.fail(exc)
    finally:
        filled.stopped()


def adopt_mapping(mapping, lead: int, length: int,
                  session: "ReadSession") -> tuple[torch.Tensor, Filled]:
    """The `length` bytes after `lead` of a private file mapping (a buffer that unmaps itself
    when freed, from Storage.map_private) as a uint8 tensor, populated in the background; the
    mapping is registered with `session`."""
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    session.track(mapping, whole.data_ptr(), whole.numel())
    filled = Filled(length)
    _read_pool().submit(_populate, whole, lead, filled)
    return whole[lead:lead + length], filled


def read_fresh(read_into, start: int, end: int, chunked: bool) -> tuple[torch.Tensor, Filled]:
    """Bytes [start, end) read with `read_into(offset, memoryview)` into a fresh buffer: in
    CHUNK steps by a background thread (`chunked`, so hashing follows the read), else at once."""
    block = torch.empty(end - start, dtype=torch.uint8)
    view = byte_view(block)
    filled = Filled(end - start)
    if not chunked or end - start <= CHUNK:
        try:
            read_into(start, view)
            filled.advance(end - start)
        finally:
            filled.stopped()
        return block, filled

    def job(block: torch.Tensor) -> None:
        # `block` is held here so that a loader that gave up (hash mismatch) cannot free the
        # memory the read in flight is still writing into.
        try:
            for pos in range(0, end - start, CHUNK):
                if filled.cancelled:
                    return
                read_into(start + pos, view[pos:pos + CHUNK])
                filled.advance(min(end - start, pos + CHUNK))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting loader
            filled.fail(exc)
        finally:
            filled.stopped()

    _read_pool().submit(job, block)
    return block, filled


def _copy_part(dst: int, src: int, n: int) -> None:
    # Fault in the anonymous pages in one call (cheaper than on first write; where it fails the
    # copy faults them in), then copy; both release the GIL, so two halves run on two cores.
    libc.madvise(dst, n, _MADV_POPULATE_WRITE)
    ctypes.memmove(dst, src, n)


def _detach(addr: int, size: int) -> None:
    """Replace the file pages under [addr, addr + size) with anonymous copies of them."""
    anon = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if anon in (None, libc.MAP_FAILED):
        raise libc.last_error("mmap of anonymous memory")
    half = size // 2 // _PAGE * _PAGE
    parts = [(anon, addr, half), (anon + half, addr + half, size - half)] if half else \
        [(anon, addr, size)]
    try:
        for fut in [_read_pool().submit(_copy_part, *p) for p in parts]:
            fut.result()
    except BaseException:
        libc.munmap(anon, size)
        raise
    if libc.mremap(anon, size, size, _MREMAP_MAYMOVE | _MREMAP_FIXED, addr) != addr:
        error = libc.last_error("mremap")
        libc.munmap(anon, size)
        raise error


class ReadSession:
    """The mappings one load hands out. Call `finish()` after every `load_state_dict` (also when
    one failed), with no reference left to the states that were loaded."""

    def __init__(self) -> None:
        self._maps: list[tuple[weakref.ref, int, int]] = []
        self.detached_bytes = 0

    def track(self, mapping, addr: int, size: int) -> None:
        self._maps.append((weakref.ref(mapping), addr, size))

    def finish(self) -> None:
        maps, self._maps = self._maps, []
        for ref, addr, size in maps:
            m = ref()
            if m is None:
                continue          # nobody kept a view: already unmapped
            try:
                _detach(addr, size)
                self.detached_bytes += size
            except OSError as exc:
                # Still correct, only costlier: the kept tensors stay file-backed (private
                # copies of the pages they write), pinning the file until they are freed.
                log.warning("could not move %d loaded bytes off their checkpoint file (%s); "
                            "they stay mapped from it", size, exc)
            finally:
                del m
