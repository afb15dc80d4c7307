"""Assembling a SHARDED component's manifest entry from every rank's chunks and skeleton.

A multi-node save (format_version 3) splits the work: each node writer keeps its chunks for its
fragment and reports a summary (`node_part`), and the coordinator builds the root's entry from
the summaries (`build_root`). A single node's save is assembled whole (`build`):
called by `save.assemble` (on the coordinator, once every node reported) with the skeleton each
rank flattened and the chunk records the node writers wrote. It gives every distinct key path one
global tensor (in the order the ranks' skeletons first name them), merges the skeletons into one
whose tensor references index that list (pipeline stages hold different keys; their union is the
component), and checks that the chunks of every tensor tile its global shape. Ranks that disagree
(on a non-tensor value, a dtype, a global shape) fail the save with a message naming the path.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

from ..dist.messages import ChunkedPart, PathTotal, ShardDescriptor, WrittenTensor
from ..errors import CheckpointError, ReplicationError
from ..format.manifest import TensorEntry
from ..format.sharded import Chunk, GlobalTensor, ShardedEntry, check_tiling, merge_trees, remap_refs
from ..format.tree import TensorLeaf, leaves

log = logging.getLogger("async_ckpt")


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in path) or "/"


def _merge(component: str, trees: dict[int, Any]) -> tuple[dict[tuple[Any, ...], int], Any]:
    """The global tensor index of each key path, and the ranks' skeletons merged into one."""
    index_of: dict[tuple[Any, ...], int] = {}
    merged: Any = None
    for rank in sorted(trees):
        mapping = {}
        for path, leaf in leaves(trees[rank], f"component {component!r}"):
            # a tied tensor (one tensor under two paths) is known by its first path, the one
            # its chunks carry; later references point at the same global tensor
            if isinstance(leaf, TensorLeaf) and leaf.index not in mapping:
                mapping[leaf.index] = index_of.setdefault(path, len(index_of))
        tree = remap_refs(trees[rank], mapping)
        merged = tree if merged is None else merge_trees(merged, tree, (), component)
    return index_of, merged


def by_box(component: str, level: str, chunks: list[tuple[WrittenTensor, int]]
           ) -> dict[tuple[Any, ...], dict[tuple[int, ...], tuple[WrittenTensor, int]]]:
    """The chunk records by key path and box; a box written twice is kept once (its copies must
    agree)."""
    by_path: dict[tuple[Any, ...], dict[tuple[int, ...], tuple[WrittenTensor, int]]] = {}
    for written, rank in chunks:
        info = written.chunk
        if info is None:
            raise CheckpointError(f"component {component!r}: rank {rank} wrote a record without "
                                  "its chunk; ranks run different releases?")
        boxes = by_path.setdefault(tuple(info.path), {})
        seen = boxes.get(tuple(info.offsets))
        if seen is None:
            boxes[tuple(info.offsets)] = (written, rank)
            continue
        # the same box written twice: replicas on meshes of their own whose replica group was not
        # given (process_group); keep one, and the copies must agree
        other, other_rank = seen
        if (other.hash != written.hash or other.codec != written.codec) and level != "none":
            raise ReplicationError(
                f"component {component!r}: ranks {other_rank} and {rank} hold different data for "
                f"chunk {list(info.offsets)} of {_path_str(tuple(info.path))!r}; replicas must be identical")
        log.debug("component %r: chunk %s of %s written by ranks %d and %d (pass the replica group "
                  "as process_group to write it once)", component, list(info.offsets),
                  _path_str(tuple(info.path)), other_rank, rank)
    return by_path


def node_part(meta: ShardDescriptor, trees: dict[int, Any], chunks: list[tuple[WrittenTensor, int]]
              ) -> tuple[ChunkedPart, list[tuple[tuple[Any, ...], Chunk]]]:
    """A node's share of a chunked component in a multi-node save: the summary its report carries
    (distinct skeletons, per-tensor totals) and the chunks its fragment holds."""
    distinct: dict[str, tuple[int, Any]] = {}
    for rank in sorted(trees):
        distinct.setdefault(json.dumps(trees[rank], sort_keys=True), (rank, trees[rank]))
    kept, totals = [], []
    for path, boxes in by_box(meta.component, meta.validation, chunks).items():
        first = next(iter(boxes.values()))[0]
        assert first.chunk is not None
        for offsets, (w, _) in sorted(boxes.items()):
            kept.append((path, Chunk(offsets, tuple(w.shape), _record(w))))
        totals.append(PathTotal(path, first.dtype, tuple(first.chunk.global_shape), first.chunk.layout,
                                sum(math.prod(w.shape) for w, _ in boxes.values())))
        for w, _ in boxes.values():
            assert w.chunk is not None
            if w.dtype != first.dtype or tuple(w.chunk.global_shape) != tuple(first.chunk.global_shape):
                raise CheckpointError(f"component {meta.component!r} tensor {_path_str(path)!r}: "
                                      "ranks disagree on its dtype or global shape")
    part = ChunkedPart(dataclasses.replace(meta, slots=(), tree=None, tree_source=False),
                       tuple(distinct.values()), tuple(totals),
                       tuple(sorted({rank for _, rank in chunks})))
    return part, kept


def build_root(component: str, parts: list[ChunkedPart]) -> ShardedEntry:
    """The root's entry of a chunked component of a multi-node save: skeleton and global tensors
    without chunks (they are in the fragments). Each tensor's chunks must cover exactly its
    elements, summed over the nodes (the reader checks their exact tiling when it merges them)."""
    index_of, merged = _merge(component, {rank: tree for p in parts for rank, tree in p.trees})
    found: dict[tuple[Any, ...], list[PathTotal]] = {}
    for p in parts:
        for total in p.totals:
            found.setdefault(tuple(total.path), []).append(total)
    tensors = []
    for path, _ in sorted(index_of.items(), key=lambda item: item[1]):
        where = f"component {component!r} tensor {_path_str(path)!r}"
        totals = found.pop(path, [])
        if not totals:
            raise CheckpointError(
                f"{where}: no rank wrote any chunk of it. Ranks hold different state (pipeline "
                "stages?): pass the data-parallel group as the component's process_group")
        first = totals[0]
        shape = tuple(first.global_shape)
        if any(t.dtype != first.dtype or tuple(t.global_shape) != shape for t in totals):
            raise CheckpointError(f"{where}: ranks on different nodes disagree on its dtype or "
                                  "global shape")
        volume = sum(t.volume for t in totals)
        if volume != math.prod(shape):
            raise CheckpointError(
                f"{where}: the nodes' chunks hold {volume} of its {math.prod(shape)} elements "
                "(gaps, or one box written on several nodes: pass the replica group as the "
                "component's process_group so that each box is written once)")
        tensors.append(GlobalTensor(path, first.dtype, shape, (),
                                    json.loads(first.layout) if first.layout else None))
    if found:
        raise CheckpointError(f"component {component!r}: chunks of {_path_str(next(iter(found)))!r}, "
                              "which no rank's state names")
    return ShardedEntry(merged, tuple(tensors), tuple(sorted({r for p in parts for r in p.writers})))


def _record(w: WrittenTensor) -> TensorEntry:
    return TensorEntry(w.dtype, tuple(w.shape), w.file, w.offset, w.length, w.nbytes, w.codec, w.hash,
                       tuple(w.frames))


def build(component: str, level: str, trees: dict[int, Any],
          chunks: list[tuple[WrittenTensor, int]]) -> ShardedEntry:
    """The component's entry. `trees`: rank -> its skeleton (local tensor indices); `chunks`:
    every written chunk record and the rank that wrote it."""
    index_of, merged = _merge(component, trees)
    by_path = by_box(component, level, chunks)
    tensors = []
    for path, _ in sorted(index_of.items(), key=lambda item: item[1]):
        found = by_path.get(path)
        where = f"component {component!r} tensor {_path_str(path)!r}"
        if not found:
            raise CheckpointError(
                f"{where}: no rank wrote any chunk of it. Ranks hold different state (pipeline "
                "stages?): pass the data-parallel group as the component's process_group")
        first = next(iter(found.values()))[0]
        assert first.chunk is not None
        shape = tuple(first.chunk.global_shape)
        out = []
        for offsets, (w, _) in sorted(found.items()):
            assert w.chunk is not None
            if w.dtype != first.dtype or tuple(w.chunk.global_shape) != shape:
                raise CheckpointError(f"{where}: ranks disagree on its dtype or global shape "
                                      f"({first.dtype}{list(shape)} vs {w.dtype}{list(w.chunk.global_shape)})")
            out.append(Chunk(offsets, tuple(w.shape), _record(w)))
        try:
            check_tiling(shape, [(c.offsets, c.sizes) for c in out], where)
        except ValueError as exc:
            raise CheckpointError(f"{exc}; the ranks' shards do not make up the whole tensor "
                                  "(pipeline stages? pass the data-parallel process_group)") from None
        layout = json.loads(first.chunk.layout) if first.chunk.layout else None
        tensors.append(GlobalTensor(path, first.dtype, shape, tuple(out), layout))
    owners = tuple(sorted({rank for _, rank in chunks}))
    return ShardedEntry(merged, tuple(tensors), owners)
