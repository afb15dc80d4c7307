"""Reusable host staging buffers and the copy of live state into them.

Reusing buffers is what brings save()'s blocking time down to the memcpy floor: a fresh
allocation pays page faults on first touch (measured 2-3x slower). Buffers are pinned when CUDA is
present (fast async D2H on a side stream). Ranks other than their node's writer stage into
shared-memory files (``/dev/shm``) that the node writer maps by name: the hand-over is a name in
the Store, never a copy. The pool holds at most the buffers of the saves in flight.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from ..dist.shm import create_shared
from .plan import RankPlan

log = logging.getLogger("async_ckpt")


class HostBuffer:
    """One contiguous uint8 host tensor plus cached typed views for the last plan staged into it.

    With ``shared=True`` it lives in a file under /dev/shm named ``self.name``; the file is
    removed once the node writer has mapped it, or when the pool is closed.
    """

    def __init__(self, nbytes: int, pin: bool, shared: bool = False):
        self.capacity = nbytes
        self.name: str | None = None
        self._mmap = None
        self._registered = False
        if shared:
            self.name, self._mmap = create_shared(nbytes)
            self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
            if pin:
                self._registered = _host_register(self.tensor)
        else:
            self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        self._views: tuple[RankPlan, list[list[torch.Tensor]]] | None = None
        self.event: Any = None  # CUDA event that completes when the D2H copies have landed

    def views(self, plan: RankPlan) -> list[list[torch.Tensor]]:
        if self._views is None or self._views[0] is not plan:
            views = [[self.tensor[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
                      for s in shard.slots] for shard in plan.shards]
            self._views = (plan, views)
        return self._views[1]

    def wait_copied(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def unlink(self) -> None:
        if self._registered:
            _host_unregister(self.tensor)
            self._registered = False
        if self.name is not None:
            try:
                os.unlink(self.name)
            except FileNotFoundError:
                pass


_register_warned = False


def _host_register(t: torch.Tensor) -> bool:
    """Page-lock a shared-memory buffer for CUDA: a D2H copy into pageable memory is synchronous
    and goes through the driver's bounce buffer (several times slower). Failure only costs speed."""
    global _register_warned
    try:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
        ok = int(err) == 0
    except Exception as exc:  # noqa: BLE001 - an old or CPU-only torch: stay pageable
        ok, err = False, exc
    if not ok and not _register_warned:
        _register_warned = True
        log.warning(
            "could not page-lock a shared staging buffer (%s); device-to-host staging on this rank "
            "uses pageable memory and is slower. Raise the locked-memory limit (ulimit -l) to fix it.",
            err)
    return ok


def _host_unregister(t: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def is_page_locked(t: torch.Tensor) -> bool:
    """Pinned by torch's allocator or registered with cudaHostRegister."""
    return bool(torch.cuda.is_available() and t.is_pinned())


class BufferPool:
    """Hands out host buffers big enough for a plan; returns them for reuse when written."""

    def __init__(self, pin: bool = False, shared: bool = False):
        self.pin, self.shared = pin, shared
        self._free: list[HostBuffer] = []
        self._lock = threading.Lock()
        self.allocated_nbytes = 0

    def acquire(self, nbytes: int) -> HostBuffer:
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.capacity >= nbytes:
                    return self._free.pop(i)
            if self._free:  # too small for the new layout: drop one so the pool stays bounded
                dropped = self._free.pop(0)
                dropped.unlink()
                self.allocated_nbytes -= dropped.capacity
            self.allocated_nbytes += nbytes
        return HostBuffer(nbytes, self.pin, self.shared)

    def release(self, buf: HostBuffer) -> None:
        with self._lock:
            self._free.append(buf)

    def close(self) -> None:
        with self._lock:
            for buf in self._free:
                buf.unlink()


_side_stream = None


def stage(plan: RankPlan, tensors: list[list[torch.Tensor]], buf: HostBuffer) -> None:
    """Copy every planned tensor into its slot. CUDA copies go on a side stream; see buf.event."""
    global _side_stream
    views = buf.views(plan)
    buf.event = None
    cuda = []
    for dsts, shard, srcs in zip(views, plan.shards, tensors, strict=True):
        for dst, slot in zip(dsts, shard.slots, strict=True):
            src = srcs[slot.index]
            if src.is_cuda:
                cuda.append((dst, src))
                continue
            try:
                dst.copy_(src)
            except NotImplementedError:   # shell dtypes (uint1..7, int1..7) have no copy kernel
                dst.view(torch.uint8).copy_(src.view(torch.uint8))
    if cuda:
        if _side_stream is None:
            _side_stream = torch.cuda.Stream()
        _side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(_side_stream):
            for dst, src in cuda:
                dst.copy_(src, non_blocking=True)
                src.record_stream(_side_stream)  # keep src alive until the copy lands
            buf.event = torch.cuda.Event()
            buf.event.record(_side_stream)
