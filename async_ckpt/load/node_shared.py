"""Loading GLOBAL and REPLICATED copies once per node instead of once per rank.

Every rank of a node needs the same bytes for these copies. The node writer (local rank 0)
reads and verifies them, copies them into one shared-memory buffer and posts its name to the
Store; the other local ranks map it, take private copies (so no two ranks ever alias the same
optimizer state; components whose stateful only copies what it loads, ``copies_on_load``, get
views of the buffer instead) and acknowledge; the last one removes the buffer's name (views keep
the mapping alive until they are dropped). Storage is read once
per node, which matters on object stores. Every wait is bounded by the checkpointer's timeout.
"""
from __future__ import annotations

import logging
import os

import torch

from ..format.codec import align_up
from ..errors import CorruptCheckpointError
from ..dist.link import StoreLink, StoreLost
from .reader import check_files, read_tensors, unflatten_owned
from .reshard import whole_tensors
from ..format.manifest import Manifest
from .readbuf import ReadSession
from ..dist.messages import SharedCopies, SharedCopy, SharedTensor
from ..dist.shm import attach_shared, create_shared
from ..dist.topology import Topology
from ..format.tree import dtype_from_name, dtype_name

log = logging.getLogger("async_ckpt")


def read_shared(storage, folder: str, manifest: Manifest, wanted: list[tuple[str, str]],
                topo: Topology, link: StoreLink | None, load_seq: int, allow_pickle: bool,
                verify: bool, session: ReadSession | None = None, views: frozenset[str] = frozenset()
                ) -> dict[tuple[str, str], object]:
    """The states of the (component, shard) copies in `wanted`, read once on this node; empty
    when there is no other rank on this node to share with (the caller reads them itself).
    Components in `views` (their stateful copies what it loads and keeps no reference:
    ``copies_on_load``) get views of the node's one shared buffer instead of private copies, so
    a full state (``ModelState(full_state_dict=True)``) is materialised once per node, not once
    per rank."""
    if link is None or topo.local_world_size == 1 or not wanted:
        return {}
    seq, key = f"load{load_seq}", f"shared/{topo.node}"
    if topo.is_node_writer:
        return _read_and_share(storage, folder, manifest, wanted, topo, link, seq, key, allow_pickle,
                               verify, session)
    answer = link.gather(seq, {0: key}, SharedCopies, f"node writer of node {topo.node}", range(0),
                         stop_on_outcome=False)[0]
    if answer.error:
        raise CorruptCheckpointError(f"the node writer (local rank 0) could not read the shared "
                                     f"state of {storage.child_url(folder)}: {answer.error}")
    mapped = attach_shared(answer.shm, answer.capacity, unlink=False)
    try:
        states = {}
        for copy in answer.copies:
            tensors = []
            for t in copy.tensors:
                dt = dtype_from_name(t.dtype, f"shared copy of {copy.component!r}")
                view = mapped[t.offset:t.offset + t.nbytes].view(dt).view(t.shape) if t.nbytes else None
                tensors.append(torch.empty(t.shape, dtype=dt) if view is None else
                               view if copy.component in views else view.clone())
            states[(copy.component, copy.shard)] = unflatten_owned(
                _tree(manifest, copy.component, copy.shard), tensors,
                f"{storage.child_url(folder)} component {copy.component!r}", allow_pickle)
    finally:
        del mapped
        _acknowledge(link, seq, key, topo, answer.shm)
    return states


def _acknowledge(link: StoreLink, seq: str, key: str, topo: Topology, shm: str) -> None:
    """The last reader removes the buffer, so the node writer never waits for the others. load()
    has no collective, so the Store's host (rank 0) may already have exited: this rank's copy is
    complete then, and the buffer (named after its dead creator) is swept when a node writer next
    starts on this machine."""
    try:
        last = link.increment(seq, f"ack/{topo.node}") == topo.local_world_size - 1
    except (StoreLost, RuntimeError, OSError) as exc:
        log.debug("[rank %d] could not acknowledge the node-shared read (%s); leaving %s to the "
                  "sweep", topo.rank, exc, shm)
        return
    if last:
        _unlink(shm)
        try:
            link.delete(seq, [key, f"ack/{topo.node}"])
        except (StoreLost, RuntimeError, OSError):
            pass


def _read_and_share(storage, folder, manifest, wanted, topo, link, seq, key, allow_pickle, verify,
                    session):
    try:
        read = {}
        for comp, shard in wanted:
            if manifest.components[comp].sharded is not None:     # REPLICATED in row blocks
                read[(comp, shard)] = whole_tensors(storage, folder, manifest, comp, verify, session)[1]
                continue
            entry = manifest.components[comp].shards[shard]
            check_files(storage, folder, manifest, {t.file for t in entry.tensors})
            read[(comp, shard)] = read_tensors(storage, folder, entry,
                                               f"{storage.child_url(folder)} component {comp!r}", verify,
                                               session)
        offset, copies = 0, []
        for (comp, shard), tensors in read.items():
            metas = []
            for t in tensors:
                nbytes = t.numel() * t.element_size()
                metas.append(SharedTensor(offset, dtype_name(t.dtype), tuple(t.shape), nbytes))
                offset = align_up(offset + nbytes)
            copies.append(SharedCopy(comp, shard, tuple(metas)))
        name, mapping = create_shared(offset)
    except Exception as exc:
        link.post(seq, key, SharedCopies(error=str(exc)))
        raise
    try:
        buf = torch.frombuffer(mapping, dtype=torch.uint8)
        for copy, tensors in zip(copies, read.values(), strict=True):
            for meta, t in zip(copy.tensors, tensors, strict=True):
                if meta.nbytes:
                    buf[meta.offset:meta.offset + meta.nbytes].view(t.dtype).view(t.shape).copy_(t)
        del buf
    except BaseException as exc:
        _unlink(name)
        link.post(seq, key, SharedCopies(error=str(exc)))
        raise
    link.post(seq, key, SharedCopies(name, max(offset, 1), tuple(copies)))
    return {ks: unflatten_owned(_tree(manifest, *ks), tensors,
                                f"{storage.child_url(folder)} component {ks[0]!r}", allow_pickle)
            for ks, tensors in read.items()}


def _tree(manifest: Manifest, component: str, shard: str) -> object:
    entry = manifest.components[component]
    return entry.sharded.tree if entry.sharded is not None else entry.shards[shard].tree


def _unlink(name: str) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass
