"""The node writer: one background thread per node, in local rank 0's process, that writes the
node's staged state into data files and reports what it wrote.

Call sequence (who calls what):

1. training thread: ``submit(job)`` for each save of this process (never blocks), or
   ``submit(task)`` for side work that must run after the saves queued before it (late metrics,
   the fence of ``AsyncCheckpointer.wait``);
2. writer thread, for each save, in order: take the job descriptors the node's other ranks
   posted (``job/<rank>``) (node 0 first lets the coordinator clear a single node's leftovers of
   the step: `Coordinator.before_write`) -> map their shared-memory buffers -> if any rank already failed, stop
   -> stream each rank's records, all of them concurrently, hashing in the same pass, into one
   data object of the node (each rank's records one segment of it, `node_object.py`; a node of
   one rank, or without node objects: each rank's into its own data file) -> make the folder
   durable -> (several nodes) write the node's manifest fragment (`save.fragment`) -> set
   ``job.written`` -> hand the `NodeReport` to the coordinator (node 0: `Coordinator.run` on
   this same thread) or post it as ``node/<n>``;
3. training thread: ``stop()`` drains the queue, then ends the thread.

A world of one is a node of one rank: the same sequence with no peers to wait for. Jobs run
strictly one after another, so a node writer never has two saves in progress.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ..dist.link import RemoteFailure, StoreLink, causes_of
from ..dist.liveness import CallerWatch
from ..dist.messages import Begun, JobDescriptor, NodeReport, WrittenFile, WrittenShard, WrittenTensor
from ..dist.shm import attach_shared
from ..dist.topology import Topology
from ..format.codec import byte_view, codec_for
from ..format.names import step_dir
from ..format.tree import dtype_from_name
from ..storage import Storage
from . import fragment
from .coordinator import Coordinator
from .datafile import DataFileStreamer, FileResult
from .job import SaveJob
from .node_object import RankRecords, write_node_object

log = logging.getLogger("async_ckpt")
_MAX_ATTACHED = 16   # peers' mapped buffers kept across saves


class NodeWriter:
    """Owns the writer thread; see the module docstring for the sequence it runs."""

    def __init__(self, storage: Storage, topo: Topology, link: StoreLink, streamer: DataFileStreamer,
                 compressed: bool, coordinator: Coordinator | None, node_object: bool = True):
        self.storage, self.topo, self.link, self.streamer = storage, topo, link, streamer
        self.compressed, self.coordinator = compressed, coordinator
        self.node_object = node_object      # several local ranks: one data object (node_object.py)
        self._attached: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._queue: queue.Queue[SaveJob | Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="ckpt-node-writer", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob | Callable[[], None]) -> None:
        self._queue.put(job)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.streamer.close()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            if not isinstance(job, SaveJob):
                try:
                    job()
                except Exception:  # noqa: BLE001 - side tasks (late metrics) must not kill the writer
                    log.exception("[rank %d] background task failed", self.topo.rank)
                continue
            try:
                if self.coordinator is not None:
                    self.coordinator.before_write(job)
                report = self.write(job)
                job.written.set()
                if self.coordinator is not None:
                    self.coordinator.run(job, report)
                else:
                    self.link.post(job.seq, f"node/{self.topo.node}", report)
            except BaseException as exc:  # noqa: BLE001 - the thread must outlive any one job
                log.exception("[rank %d step %d] node writer failed", self.topo.rank, job.step)
                job.local_errors.setdefault(self.topo.rank, exc)
                try:
                    self.link.post_error(job.seq, self.topo.rank, f"node writer failed: {exc!r}")
                except Exception:  # noqa: BLE001 - the Store may be gone; waiters notice that
                    log.exception("[rank %d step %d] could not report the failure", self.topo.rank, job.step)
            finally:
                job.written.set()
                job.published.set()
                job.retained.set()

    # -- one save -------------------------------------------------------------------------------
    def write(self, job: SaveJob) -> NodeReport:
        """Write this node's data files; the report for the coordinator (or why it failed)."""
        link, topo = self.link, self.topo
        folder, seq, world = step_dir(job.step), job.seq, range(topo.world_size)
        try:
            if topo.node != 0:
                link.post(seq, f"begun/{topo.node}", Begun(topo.node))   # the hand-over deadline ends
            peers = [r for r in topo.node_ranks() if r != topo.rank]
            descs = [job.descriptor(topo.rank)]
            if peers:
                got = link.gather(seq, {r: f"job/{r}" for r in peers}, JobDescriptor, "rank(s)", world,
                                  alive={r: r for r in peers},
                                  watch=CallerWatch(link, seq, job.step, {r: r for r in peers}))
                descs += [got[r] for r in peers]
            job.buffer.wait_copied()
            buffers = {topo.rank: job.buffer.tensor}
            for desc in descs[1:]:
                buffers[desc.rank] = self._attach(desc.shm or "", desc.capacity)
            if errors := link.errors(seq, world):
                raise RemoteFailure(errors)             # no point writing a save that has failed
            t0 = time.perf_counter()
            if len(descs) > 1 and self.node_object:
                files, outcomes = self._write_node_object(folder, descs, buffers)
            elif len(descs) == 1:
                outcomes = [self._write_rank_file(folder, descs[0], buffers[descs[0].rank])]
            else:
                # One file per local rank, written concurrently: parallel streams keep the disk
                # (or the object store) busier than one, as DCP's per-rank writers do.
                with ThreadPoolExecutor(len(descs), thread_name_prefix="ckpt-node-file") as pool:
                    futures = [pool.submit(self._write_rank_file, folder, d, buffers[d.rank])
                               for d in descs]
                    outcomes = [f.result() for f in futures]    # the pool waits for every writer
            if len(descs) == 1 or not self.node_object:
                files = tuple(WrittenFile(name, result.size, result.hash) for name, result in outcomes
                              if name is not None and result is not None)
            if files:
                self.storage.sync_dir(folder)
            shards = _written_shards(descs, outcomes)
            if topo.num_nodes == 1:
                return NodeReport(topo.node, topo.rank, files=files, shards=shards,
                                  write_s=time.perf_counter() - t0)
            # several nodes: this node's records go into its own manifest fragment
            parts = fragment.split(shards)
            info = fragment.write(self.storage, folder, job.step, topo.node, tuple(topo.node_ranks()),
                                  parts)
            return NodeReport(topo.node, topo.rank, files=files, shards=parts.root,
                              write_s=time.perf_counter() - t0, fragment=info, chunked=parts.parts)
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which fails the save
            log.error("[rank %d step %d] node %d failed to write: %r", topo.rank, job.step, topo.node, exc)
            job.local_errors.setdefault(topo.rank, exc)
            return NodeReport(topo.node, topo.rank, causes=causes_of(
                exc, topo.rank, "did not hand over its staged state"))

    def _attach(self, name: str, capacity: int) -> torch.Tensor:
        cached = self._attached.get(name)
        if cached is None:
            cached = attach_shared(name, capacity)
            self._attached[name] = cached
            while len(self._attached) > _MAX_ATTACHED:   # peers replaced their buffers long ago
                self._attached.popitem(last=False)
        self._attached.move_to_end(name)
        return cached

    def _records(self, desc: JobDescriptor, buffer: torch.Tensor) -> RankRecords:
        slots = [slot for sh in desc.shards for slot in sh.slots]
        return RankRecords(desc.rank, [byte_view(buffer[s.offset:s.offset + s.nbytes]) for s in slots],
                           [codec_for(dtype_from_name(s.dtype, "staged slot"), self.compressed)
                            for s in slots])

    def _write_rank_file(self, folder: str, desc: JobDescriptor, buffer: torch.Tensor
                         ) -> tuple[str | None, FileResult | None]:
        """Stream one rank's staged records into its own data file; (None, None) if it has none."""
        mine = self._records(desc, buffer)
        if not mine.records:
            return None, None
        name = f"data-n{self.topo.node:05d}-r{desc.rank:05d}-{os.urandom(4).hex()}.bin"
        return name, self.streamer.write_file(self.storage, f"{folder}/{name}", mine.records, mine.codecs)

    def _write_node_object(self, folder: str, descs: list[JobDescriptor], buffers: dict[int, torch.Tensor]
                           ) -> tuple[tuple[WrittenFile, ...], list[tuple[str | None, FileResult | None]]]:
        """The node's ranks' records as the segments of one object (node_object.py)."""
        ranks = [self._records(d, buffers[d.rank]) for d in sorted(descs, key=lambda d: d.rank)]
        if not any(r.records for r in ranks):
            return (), [(None, None)] * len(descs)
        written, results = write_node_object(self.storage, self.streamer, folder, self.topo.node, ranks)
        return (written,), [(written.name, results[d.rank]) for d in descs]


def _written_shards(descs: list[JobDescriptor], outcomes: list[tuple[str | None, FileResult | None]]
                    ) -> tuple[WrittenShard, ...]:
    shards = []
    for desc, (name, result) in zip(descs, outcomes, strict=True):
        records = iter(result.records if result is not None else ())
        for sh in desc.shards:
            tensors = []
            for slot in sh.slots:
                rec = next(records)
                tensors.append(WrittenTensor(slot.index, slot.dtype, slot.shape, name or "", rec.offset,
                                             rec.length, slot.nbytes, rec.hash, rec.frames, rec.codec,
                                             slot.chunk))
            shards.append(WrittenShard(desc.rank, dataclasses.replace(sh, slots=()), tuple(tensors)))
    return tuple(shards)
