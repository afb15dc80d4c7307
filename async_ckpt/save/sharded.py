"""Assembling a SHARDED component's manifest entry from every rank's chunks and skeleton.

Called by `save.assemble` (on the coordinator, once every node reported) with the skeleton each
rank flattened and the chunk records the node writers wrote. It gives every distinct key path one
global tensor (in the order the ranks' skeletons first name them), merges the skeletons into one
whose tensor references index that list (pipeline stages hold different keys; their union is the
component), and checks that the chunks of every tensor tile its global shape. Ranks that disagree
(on a non-tensor value, a dtype, a global shape) fail the save with a message naming the path.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from ..dist.messages import WrittenTensor
from ..errors import CheckpointError, ReplicationError
from ..format.manifest import TensorEntry
from ..format.sharded import Chunk, GlobalTensor, ShardedEntry, check_tiling, merge_trees, remap_refs
from ..format.tree import TensorLeaf, leaves

log = logging.getLogger("async_ckpt")


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in path) or "/"


def build(component: str, level: str, trees: dict[int, Any],
          chunks: list[tuple[WrittenTensor, int]]) -> ShardedEntry:
    """The component's entry. `trees`: rank -> its skeleton (local tensor indices); `chunks`:
    every written chunk record and the rank that wrote it."""
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
            out.append(Chunk(offsets, tuple(w.shape), TensorEntry(
                w.dtype, tuple(w.shape), w.file, w.offset, w.length, w.nbytes, w.codec, w.hash,
                tuple(w.frames))))
        try:
            check_tiling(shape, [(c.offsets, c.sizes) for c in out], where)
        except ValueError as exc:
            raise CheckpointError(f"{exc}; the ranks' shards do not make up the whole tensor "
                                  "(pipeline stages? pass the data-parallel process_group)") from None
        layout = json.loads(first.chunk.layout) if first.chunk.layout else None
        tensors.append(GlobalTensor(path, first.dtype, shape, tuple(out), layout))
    owners = tuple(sorted({rank for _, rank in chunks}))
    return ShardedEntry(merged, tuple(tensors), owners)
