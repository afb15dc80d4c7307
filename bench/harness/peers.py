"""async_ckpt and every peer library behind one interface, each with its best settings.

A peer's ``save(i)`` returns its blocking time (until the call returns), time until staged (the
state may be mutated), time until committed (durable on disk) and stored bytes; ``load(i)``
drops the page cache and times restoring checkpoint ``i`` into preallocated tensors. Peers that
do not fsync on their own (torch.save, torchsnapshot) get an fsync of their files inside the
commit time, so every "committed" means the same thing: on disk.

Call sequence (one thread, the harness's): setup() -> [save(i) -> load(i) -> cleanup(i)]* -> close().
"""
from __future__ import annotations

import os
import shutil
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent
from async_ckpt.storage.local import fsync_dir

from ..common import PageCache, tree_bytes
from .state import TensorState


def fsync_tree(path: str) -> None:
    """fsync every file and folder under `path` (for peers that leave durability to the OS)."""
    if os.path.isfile(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path))
        return
    for d, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(d)
    fsync_dir(os.path.dirname(path.rstrip("/")))


class Peer:
    key = ""
    label = ""

    def __init__(self, state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], folder: str,
                 cache: PageCache):
        # `target`: touched tensors shaped like `state`, shared by every peer's load
        self.state, self.target, self.folder, self.cache = state, target, folder, cache
        self.first: dict | None = None      # the first (warm-up) save, reported apart

    def path(self, i: int) -> str:
        return os.path.join(self.folder, f"{self.key}-{i}")

    def setup(self) -> None:
        """One untimed save: imports, threads and buffers are set up outside every timing."""
        self.first = self.save(-1)
        self.cleanup(-1)

    def save(self, i: int) -> dict:
        raise NotImplementedError

    def load(self, i: int) -> float:
        raise NotImplementedError

    def cleanup(self, i: int) -> None:
        shutil.rmtree(self.path(i), ignore_errors=True)
        if os.path.exists(self.path(i)):
            os.unlink(self.path(i))

    def close(self) -> None:
        pass

    def check_loaded(self) -> None:
        """A load that restored nothing would time nothing: compare one tensor."""
        k = next(iter(self.state))
        if not torch.equal(self.target[k], self.state[k]):
            raise RuntimeError(f"{self.label}: loaded tensor {k} differs from the saved one")


class AsyncCkptPeer(Peer):
    def __init__(self, state, target, folder, cache, compression: str | None):
        super().__init__(state, target, folder, cache)
        self.compression = compression
        self.key = f"async_ckpt_{compression or 'none'}"
        self.label = f"async_ckpt compression={compression}"
        self.root = os.path.join(folder, self.key)
        self.ck = AsyncCheckpointer(self.root, [StateComponent("model", TensorState(state),
                                                               SharingPattern.PER_RANK)],
                                    compression=compression, keep_last=1)
        self.step = 0

    def setup(self) -> None:
        self.first = self.save(-1)

    def save(self, i: int) -> dict:
        self.cache.settle()
        t0 = time.perf_counter()
        h = self.ck.save(self.step)
        t1 = time.perf_counter()
        h.wait_staged()
        t2 = time.perf_counter()
        info = h.wait()
        t3 = time.perf_counter()
        self.ck.wait()          # retention of the previous step stays out of the timing
        self.step += 1
        return {"blocking_s": t1 - t0, "staged_s": t2 - t0, "committed_s": t3 - t0,
                "stored_bytes": info.stored_nbytes, "engine_timings": dict(info.timings)}

    def load(self, i: int) -> float:
        reader = AsyncCheckpointer(self.root, [StateComponent("model", TensorState(self.target),
                                                              SharingPattern.PER_RANK)])
        try:
            self.cache.settle()
            t0 = time.perf_counter()
            reader.load(self.step - 1)
            dt = time.perf_counter() - t0
        finally:
            reader.close()
        self.check_loaded()
        return dt

    def cleanup(self, i: int) -> None:
        pass                    # keep_last=1 removes the previous step

    def close(self) -> None:
        self.ck.close()


class TorchSavePeer(Peer):
    key, label = "torch_save", "torch.save + fsync"

    def save(self, i: int) -> dict:
        self.cache.settle()
        t0 = time.perf_counter()
        torch.save(self.state, self.path(i))
        t1 = time.perf_counter()
        fsync_tree(self.path(i))
        t2 = time.perf_counter()
        return {"blocking_s": t1 - t0, "staged_s": t1 - t0, "committed_s": t2 - t0,
                "stored_bytes": os.path.getsize(self.path(i))}

    def load(self, i: int) -> float:
        self.cache.settle()
        t0 = time.perf_counter()
        sd = torch.load(self.path(i), map_location="cpu", weights_only=True)
        TensorState(self.target).load_state_dict(sd)
        dt = time.perf_counter() - t0
        self.check_loaded()
        return dt


class DcpSavePeer(Peer):
    def __init__(self, state, target, folder, cache, threads: int):
        super().__init__(state, target, folder, cache)
        self.threads = threads
        self.key, self.label = f"dcp_save{threads}", f"dcp.save thread_count={threads}"

    def save(self, i: int) -> dict:
        self.cache.settle()
        t0 = time.perf_counter()
        dcp.save(self.state, storage_writer=dcp.FileSystemWriter(self.path(i), thread_count=self.threads))
        dt = time.perf_counter() - t0
        return {"blocking_s": dt, "staged_s": dt, "committed_s": dt, "stored_bytes": tree_bytes(self.path(i))}

    def load(self, i: int) -> float:
        self.cache.settle()
        t0 = time.perf_counter()
        dcp.load(self.target, checkpoint_id=self.path(i))
        dt = time.perf_counter() - t0
        self.check_loaded()
        return dt


class DcpAsyncPeer(DcpSavePeer):
    """dcp.async_save: `reuse=False` is DCP's default (a fresh staging copy per call); `reuse=True`
    keeps one DefaultStager, whose buffers are reused (synchronous staging into them: on CPU the
    fastest way for async_save to return with the state safe to mutate)."""

    def __init__(self, state, target, folder, cache, reuse: bool):
        super().__init__(state, target, folder, cache, threads=1)
        self.stager = DefaultStager(StagingOptions(False, False, False, False)) if reuse else None
        self.key = "dcp_async_stager" if reuse else "dcp_async"
        self.label = "dcp.async_save reused DefaultStager" if reuse else "dcp.async_save default"

    def save(self, i: int) -> dict:
        self.cache.settle()
        t0 = time.perf_counter()
        fut = dcp.async_save(self.state, checkpoint_id=self.path(i), async_stager=self.stager)
        t1 = time.perf_counter()
        staged = t1
        if hasattr(fut, "upload_completion"):   # AsyncSaveResponse: staging may still run
            fut.staging_completion.result()
            staged = time.perf_counter()
            fut.upload_completion.result()
        else:
            fut.result()
        t2 = time.perf_counter()
        return {"blocking_s": t1 - t0, "staged_s": staged - t0, "committed_s": t2 - t0,
                "stored_bytes": tree_bytes(self.path(i))}

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()


class TorchSnapshotPeer(Peer):
    """torchsnapshot's Snapshot.async_take (returns once staged in memory) and restore()."""
    key, label = "torchsnapshot", "torchsnapshot async_take + fsync"

    def __init__(self, state, target, folder, cache):
        super().__init__(state, target, folder, cache)
        import torchsnapshot
        self.ts = torchsnapshot

    def save(self, i: int) -> dict:
        self.cache.settle()
        t0 = time.perf_counter()
        pending = self.ts.Snapshot.async_take(path=self.path(i), app_state={"model": TensorState(self.state)})
        t1 = time.perf_counter()
        pending.wait()
        fsync_tree(self.path(i))
        t2 = time.perf_counter()
        return {"blocking_s": t1 - t0, "staged_s": t1 - t0, "committed_s": t2 - t0,
                "stored_bytes": tree_bytes(self.path(i))}

    def load(self, i: int) -> float:
        self.cache.settle()
        t0 = time.perf_counter()
        self.ts.Snapshot(path=self.path(i)).restore({"model": TensorState(self.target)})
        dt = time.perf_counter() - t0
        self.check_loaded()
        return dt


def torchsnapshot_status(mix: str) -> str | None:
    """None when torchsnapshot can run this dtype mix; else why not (reported instead of a row)."""
    try:
        import torchsnapshot  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no row, with the reason
        return f"torchsnapshot unavailable: {exc!r} (pip install torchsnapshot; it must not replace torch)"
    if mix != "fp32":
        # torchsnapshot 0.1.0 with torch 2.13: bf16 tensors fail in async_take's batcher ("size of
        # the buffer generated by the buffer stager does not match") and, with batching off, in
        # restore ("shape '[104857]' is invalid for input of size 104856"): odd-length bf16 breaks
        return ("torchsnapshot 0.1.0 cannot save/restore odd-length bf16 tensors with torch 2.13 "
                "(batcher size mismatch on save; off-by-one element on restore)")
    return None


PEERS = {
    "async_ckpt_none": lambda *a: AsyncCkptPeer(*a, None),
    "async_ckpt_zstd": lambda *a: AsyncCkptPeer(*a, "zstd"),
    "torch_save": TorchSavePeer,
    "dcp_save1": lambda *a: DcpSavePeer(*a, 1),
    "dcp_save2": lambda *a: DcpSavePeer(*a, 2),
    "dcp_async": lambda *a: DcpAsyncPeer(*a, reuse=False),
    "dcp_async_stager": lambda *a: DcpAsyncPeer(*a, reuse=True),
    "torchsnapshot": TorchSnapshotPeer,
}
ALL_PEERS = tuple(PEERS)


def make_peer(name: str, state, target, folder: str, cache: PageCache) -> Peer:
    """Peers are built when their turn comes, so a blocked run holds one peer's buffers at a time."""
    if name not in PEERS:
        raise SystemExit(f"unknown peer {name!r}; pick from {', '.join(PEERS)}")
    return PEERS[name](state, target, folder, cache)
