"""The node writer: one background thread that turns staged saves into committed checkpoints.

In a world of one process it commits by itself; with several ranks it runs in each node's
local rank 0 and hands over to `node_save` (gather local ranks' buffers, write one file per node,
report to the coordinator). Single-process flow per save, in order: remove leftovers of a crashed save of the same step -> stream the staged
buffer into the data file (hashing in the same pass) -> make it durable -> return the buffer to
the pool -> commit the manifest with one exclusive create -> resolve the handle -> run retention
-> mark the handle settled. Jobs run strictly one after another, so when a save commits no other
save of this writer has a folder in progress; that is what makes cleanup of leftovers safe.
"""
from __future__ import annotations

import collections
import datetime
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .codec import byte_view, codec_for
from .datafile import DataFileWriter
from .errors import CheckpointError, SaveFailedError, translate_storage_error
from .handle import SaveHandle
from .layout import manifest_path, step_dir
from .metrics_store import encode
from .manifest import ComponentEntry, FileEntry, Manifest, ShardEntry, TensorEntry
from .node_save import node_save
from .plan import RankPlan
from .staging import BufferPool, HostBuffer
from .topology import Topology
from .tree import dtype_name
from .types import CheckpointInfo

log = logging.getLogger("async_ckpt")


@dataclass
class ComponentInfo:
    key: str
    required: bool
    validation_level: str
    metadata: dict | None
    members: tuple[int, ...] | None = None   # PER_GROUP: ranks of the component's group


@dataclass
class SaveJob:
    step: int
    plan: RankPlan
    buffer: HostBuffer
    trees: list[Any]                 # one skeleton per shard of the plan
    components: list[ComponentInfo]  # one per shard of the plan
    metrics: dict
    handle: SaveHandle
    started: float
    timings: dict = field(default_factory=dict)
    seq: int = 0                          # save sequence number, the same on every rank
    layouts: dict = field(default_factory=dict)   # REPLICATED key -> [[dtype, shape], ...]
    written: threading.Event = field(default_factory=threading.Event)   # node writer done with it
    retained: threading.Event = field(default_factory=threading.Event)  # coordinator's retention ran


class NodeWriter:
    """Owns the writer thread; `submit` never blocks, `stop` drains the queue first."""

    def __init__(self, storage, pool: BufferPool, topo: Topology, datafile: DataFileWriter,
                 codec: str, versions: dict, after_commit: Callable[[int], None], link=None):
        self.storage, self.pool, self.topo, self.datafile = storage, pool, topo, datafile
        self.codec, self.versions, self.after_commit, self.link = codec, versions, after_commit, link
        self.attached: collections.OrderedDict = collections.OrderedDict()  # peers' shm buffers
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="ckpt-node-writer", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob | Callable[[], None]) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.datafile.close()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if isinstance(job, SaveJob):
                try:
                    node_save(self, job) if self.link is not None else self._save(job)
                except BaseException as exc:  # noqa: BLE001 - the thread must outlive any one job
                    log.exception("[rank %d step %d] node writer failed", self.topo.rank, job.step)
                    if self.link is None and not job.handle.done():
                        exc = translate_storage_error(exc)
                        job.handle._fail(SaveFailedError(
                            f"saving step {job.step} failed on rank {self.topo.rank}: {exc!r}",
                            {self.topo.rank: exc}))
                finally:
                    job.written.set()
                    job.retained.set()
            else:
                try:
                    job()
                except Exception:  # noqa: BLE001 - side tasks (late metrics) must not kill the writer
                    log.exception("[rank %d] background task failed", self.topo.rank)

    def _save(self, job: SaveJob) -> None:
        folder = step_dir(job.step)
        buffer: HostBuffer | None = job.buffer
        manifest_written = False
        try:
            # save() checked too, but time has passed; never wipe a folder that became committed.
            if self.storage.exists(manifest_path(job.step)):
                raise CheckpointError(f"step {job.step} was committed by someone else meanwhile")
            self.storage.delete_dir(folder)          # leftovers of a killed save of this step
            buffer.wait_copied()
            t0 = time.perf_counter()
            name = f"data-r{self.topo.rank:05d}-{os.urandom(4).hex()}.bin"
            slots = [s for shard in job.plan.shards for s in shard.slots]
            records = [byte_view(buffer.tensor[s.offset:s.offset + s.nbytes]) for s in slots]
            codecs = [codec_for(s.dtype, self.codec != "raw") for s in slots]
            result = self.datafile.write_file(self.storage, f"{folder}/{name}", records, codecs)
            del records
            self.pool.release(buffer)
            buffer = None
            self.storage.sync_dir(folder)
            job.timings["write_s"] = time.perf_counter() - t0
            manifest = self._manifest(job, name, result)
            try:
                self.storage.create_exclusive(manifest_path(job.step), manifest.to_json())
            except FileExistsError:
                manifest_written = True   # someone else's commit: their folder, leave it alone
                raise
            manifest_written = True
            job.timings["total_s"] = time.perf_counter() - job.started
            # A fresh commit has no late metrics yet, so no listing is needed for its info.
            info = CheckpointInfo(job.step, self.storage.child_url(folder), dict(job.metrics),
                                  manifest.nbytes, manifest.stored_nbytes, manifest.created,
                                  dict(job.timings))
            job.handle._succeed(info)
            log.info("[rank %d step %d] committed %s (%.1f MiB, %.2f s after save())",
                     self.topo.rank, job.step, info.url, manifest.nbytes / 2**20, job.timings["total_s"])
        except BaseException as exc:  # noqa: BLE001 - every failure resolves the handle
            exc = translate_storage_error(exc)
            if buffer is not None:
                self.pool.release(buffer)
            if not manifest_written:
                try:
                    self.storage.delete_dir(folder)
                except Exception:  # noqa: BLE001 - storage may be down; the next commit cleans up
                    log.warning("[rank %d step %d] could not remove %s; a later commit will",
                                self.topo.rank, job.step, folder)
            log.error("[rank %d step %d] save failed: %r", self.topo.rank, job.step, exc)
            err = SaveFailedError(
                f"saving step {job.step} to {self.storage.child_url(folder)} failed on rank "
                f"{self.topo.rank}: {exc!r}; nothing was committed for this step", {self.topo.rank: exc})
            err.__cause__ = exc
            job.handle._fail(err)
            return
        try:
            self.after_commit(job.step)
        except Exception:  # noqa: BLE001 - retention trouble must not fail a committed save
            log.exception("[rank %d step %d] retention failed", self.topo.rank, job.step)
        finally:
            job.handle._settled.set()

    def _manifest(self, job: SaveJob, file_name: str, result) -> Manifest:
        records = iter(result.records)
        components: dict[str, ComponentEntry] = {}
        for shard, tree, comp in zip(job.plan.shards, job.trees, job.components):
            tensors = []
            for slot in shard.slots:
                rec = next(records)
                tensors.append(TensorEntry(dtype_name(slot.dtype), slot.shape, file_name, rec.offset,
                                           rec.length, slot.nbytes, rec.codec, rec.hash, rec.frames))
            entry = components.setdefault(comp.key, ComponentEntry(
                shard.pattern.value, comp.required, comp.validation_level, comp.metadata, {}))
            entry.shards[shard.shard] = ShardEntry(tree, tuple(tensors), (self.topo.rank,),
                                                   tuple(comp.members or ()))
        nbytes = sum(s.nbytes for shard in job.plan.shards for s in shard.slots)
        return Manifest(
            step=job.step,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            topology=self.topo.as_json(), metrics=encode(job.metrics),
            files={file_name: FileEntry(result.size, result.hash)}, components=components,
            nbytes=nbytes, stored_nbytes=result.size, timings=dict(job.timings), versions=self.versions)
