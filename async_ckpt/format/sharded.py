"""Sharded tensors in the manifest (format_version 2): global tensors stored as chunk records.

A SHARDED component (DTensor state: FSDP2, tensor parallel, 2-D meshes) is stored as one merged
state skeleton and a list of *global* tensors, each addressed by its key path in the state
(``["state", "layer.weight", "exp_avg"]``) and made of *chunks*: boxes of the global tensor
(``offsets``/``sizes`` per dimension), each one ordinary record (`manifest.TensorEntry`) in a
data file. Chunks that several ranks held (replicated along a mesh dimension, or plain tensors)
are written once. Together the chunks of a tensor tile its global shape exactly: no gaps, no
overlaps, nothing outside it. The reader checks all of that before any byte is read (`parse`),
so a loader can reshard by intersecting boxes (`overlap`) without guarding against hostile input.

This module owns the JSON form of these entries and the box geometry; manifest.py embeds them.
"""
from __future__ import annotations

import bisect
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import CheckpointError
from .tree import TensorLeaf, dtype_from_name, leaves

Box = tuple[tuple[int, ...], tuple[int, ...]]      # (offsets, sizes)
# check_tiling's work bounds, per box of a tensor: grid cells (a writer's layouts have exactly
# one per box) and, for tilings that are not grids, overlap pairs examined
_CELLS_PER_BOX = 4
_PAIRS_PER_BOX = 16


@dataclass(frozen=True)
class Chunk:
    """One box of a global tensor and the record holding its bytes (C-contiguous, its own shape)."""
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    record: Any          # manifest.TensorEntry (shape == sizes)


@dataclass(frozen=True)
class GlobalTensor:
    """A tensor of a SHARDED component: its key path, global dtype/shape and chunks. ``layout``
    says where it came from (mesh shape, dimension names, placements), for tools only."""
    path: tuple[Any, ...]
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    layout: dict | None = None


@dataclass(frozen=True)
class ShardedEntry:
    """The stored form of a SHARDED component: one skeleton whose tensor references ``{"t": i}``
    index ``tensors``, and the ranks that wrote chunks."""
    tree: Any
    tensors: tuple[GlobalTensor, ...]
    owners: tuple[int, ...]


def to_json(entry: ShardedEntry, record_json: Callable[[Any], dict]) -> dict:
    return {"owners": list(entry.owners), "tree": entry.tree, "tensors": [
        {"path": list(t.path), "dtype": t.dtype, "shape": list(t.shape),
         **({"layout": t.layout} if t.layout else {}),
         "chunks": [chunk_json(c, record_json) for c in t.chunks]} for t in entry.tensors]}


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in path) or "/"


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                          for x in v):
        raise ValueError(f"{what} must be a list of integers >= 0")
    return tuple(v)


def parse_chunk(c: Any, cw: str, dtype: str, shape: tuple[int, ...],
                parse_record: Callable[[Any, str], Any]) -> Chunk:
    """One chunk object of a tensor of `dtype` and global `shape`: its box lies inside the shape
    and its record holds exactly that box."""
    if not isinstance(c, dict):
        raise ValueError(f"{cw} must be an object")
    offsets, sizes = _ints(c.get("offsets"), f"{cw}.offsets"), _ints(c.get("sizes"), f"{cw}.sizes")
    record = parse_record(c, cw)
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise ValueError(f"{cw}: offsets/sizes do not have the {len(shape)} dimensions of the tensor")
    if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
        raise ValueError(f"{cw}: box {list(offsets)}+{list(sizes)} lies outside the global "
                         f"shape {list(shape)}")
    if record.dtype != dtype or tuple(record.shape) != sizes:
        raise ValueError(f"{cw}: record is {record.dtype}{list(record.shape)}, the chunk "
                         f"says {dtype}{list(sizes)}")
    return Chunk(offsets, sizes, record)


def chunk_json(c: Chunk, record_json: Callable[[Any], dict]) -> dict:
    return {"offsets": list(c.offsets), "sizes": list(c.sizes), **record_json(c.record)}


def parse(doc: Any, what: str, parse_record: Callable[[Any, str], Any], tiled: bool = True
          ) -> ShardedEntry:
    """Validate one SHARDED component's entry; ValueError naming the first problem. `tiled`
    False: the chunks are completed from fragments (format_version 3), which checks the tiling
    once they are all in (format/fragments.py)."""
    if not isinstance(doc, dict) or "tree" not in doc or not isinstance(doc.get("tensors"), list):
        raise ValueError(f"{what} needs a tree and a list of tensors")
    owners = _ints(doc.get("owners", []), f"{what}.owners")
    tensors, paths = [], set()
    for i, t in enumerate(doc["tensors"]):
        where = f"{what}.tensors[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("path"), list) or not isinstance(t.get("chunks"), list):
            raise ValueError(f"{where} needs a path and a list of chunks")
        path = tuple(t["path"])
        if not all(isinstance(k, (str, int)) or k is None for k in path) or path in paths:
            raise ValueError(f"{where}.path {list(path)[:8]} is malformed or repeated")
        paths.add(path)
        dtype = str(t.get("dtype"))
        dtype_from_name(t.get("dtype"), where)
        shape = _ints(t.get("shape"), f"{where}.shape")
        layout = t.get("layout")
        chunks = [parse_chunk(c, f"{where}.chunks[{j}]", dtype, shape, parse_record)
                  for j, c in enumerate(t["chunks"])]
        if tiled:
            check_tiling(shape, [(c.offsets, c.sizes) for c in chunks], where)
        tensors.append(GlobalTensor(path, dtype, shape, tuple(chunks),
                                    layout if isinstance(layout, dict) else None))
    _check_refs(doc["tree"], len(tensors), what)
    _check_paths(doc["tree"], tensors, what)
    return ShardedEntry(doc["tree"], tuple(tensors), owners)


def _check_paths(tree: Any, tensors: list[GlobalTensor], what: str) -> None:
    """Every tensor is referenced by the skeleton at its own key path (a loader places tensors by
    the skeleton, tools name them by ``path``: the two must agree, and no record goes unused).
    Decoding the skeleton here also refuses a malformed one before any byte is read."""
    refs = {(path, leaf.index) for path, leaf in leaves(tree, what) if isinstance(leaf, TensorLeaf)}
    for i, t in enumerate(tensors):
        if (t.path, i) not in refs:
            raise ValueError(f"{what}.tensors[{i}] (path {list(t.path)[:8]}) is not referenced by "
                             "the tree at that path")


def _check_refs(tree: Any, count: int, what: str) -> None:
    """Every tensor reference of the skeleton indexes the tensor list (the rest of the skeleton is
    checked by `_check_paths`, which decodes it)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "t" in node:
                i = node["t"]
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count:
                    raise ValueError(f"{what}.tree references tensor {i!r}, which does not exist")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def remap_refs(tree: Any, mapping: dict[int, int]) -> Any:
    """The skeleton with each tensor reference {"t": i} replaced by {"t": mapping[i]}."""
    if isinstance(tree, dict):
        if "t" in tree and isinstance(tree["t"], int):
            return {**tree, "t": mapping[tree["t"]]}
        return {k: remap_refs(v, mapping) for k, v in tree.items()}
    if isinstance(tree, list):
        return [remap_refs(v, mapping) for v in tree]
    return tree


def merge_trees(a: Any, b: Any, path: tuple[Any, ...], component: str) -> Any:
    """Two ranks' skeletons as one: dicts take the union of their keys, everything else must be
    equal (a non-tensor value that differs between ranks is not SHARDED state)."""
    if a == b:
        return a
    if isinstance(a, dict) and isinstance(b, dict) and isinstance(a.get("d"), list) and isinstance(b.get("d"), list):
        items = {json.dumps(k): [k, v] for k, v in a["d"]}
        for k, v in b["d"]:
            kk = json.dumps(k)
            items[kk] = [k, merge_trees(items[kk][1], v, path + (k,), component)] if kk in items else [k, v]
        return {**a, "d": list(items.values())}
    for tag in ("l", "u"):
        if (isinstance(a, dict) and isinstance(b, dict) and isinstance(a.get(tag), list)
                and isinstance(b.get(tag), list) and len(a[tag]) == len(b[tag])):
            return {**a, tag: [merge_trees(x, y, path + (i,), component)
                               for i, (x, y) in enumerate(zip(a[tag], b[tag], strict=True))]}
    raise CheckpointError(
        f"component {component!r} is SHARDED but ranks hold different non-tensor state at "
        f"{_path_str(path)!r} ({json.dumps(a)[:80]} vs {json.dumps(b)[:80]}); everything but "
        "DTensors must be the same on every rank holding it (keys that differ per rank, such as "
        "an optimizer's integer parameter ids on pipeline stages, need fully-qualified names: "
        "use ac.ModelState / ac.OptimizerState)")


def check_tiling(shape: tuple[int, ...], boxes: list[Box], what: str) -> None:
    """The boxes tile `shape` exactly: their volumes add up to it and no two overlap (gaps would
    leave part of a tensor unrestored; overlaps make it ambiguous).

    Work is linear in the number of boxes for every layout a writer makes (DTensor placements
    cut each dimension into ranges, so the boxes form a grid): the distinct box edges of every
    dimension cut the shape into cells, and each cell may be covered once. Other tilings (only
    hand-made ones) are swept pairwise, at most `_PAIRS_PER_BOX` pairs per box, so a manifest
    crafted to make the check quadratic is refused instead of taking hours."""
    total = math.prod(shape)
    if sum(math.prod(s) for _, s in boxes) != total:
        raise ValueError(f"{what}: chunks cover {sum(math.prod(s) for _, s in boxes)} of the "
                         f"{total} elements of {list(shape)} (gaps or overlaps)")
    full = [b for b in boxes if math.prod(b[1])]
    if total == 0 or len(full) < 2:
        return
    edges = [sorted({b[0][d] for b in full} | {b[0][d] + b[1][d] for b in full})
             for d in range(len(shape))]
    if math.prod(len(e) - 1 for e in edges) <= _CELLS_PER_BOX * len(full):
        _check_cells(full, edges, what)
    else:
        _check_pairs(full, what)


def _overlap_error(what: str, a: Box, b: Box) -> ValueError:
    return ValueError(f"{what}: chunks {list(a[0])}+{list(a[1])} and {list(b[0])}+{list(b[1])} overlap")


def _check_cells(boxes: list[Box], edges: list[list[int]], what: str) -> None:
    """Mark the grid cells each box covers (one byte per cell); a cell marked twice is an
    overlap. The volumes add up and the cell count is bounded (`check_tiling`), so this stops
    within that many marks."""
    index = [{v: i for i, v in enumerate(e)} for e in edges]
    strides = [1] * len(edges)
    for d in range(len(edges) - 2, -1, -1):
        strides[d] = strides[d + 1] * (len(edges[d + 1]) - 1)
    marked = bytearray(strides[0] * (len(edges[0]) - 1)) if edges else bytearray(1)
    for k, (off, size) in enumerate(boxes):
        ranges = [range(index[d][o] * strides[d], index[d][o + s] * strides[d], strides[d])
                  for d, (o, s) in enumerate(zip(off, size, strict=True))]
        for cell in itertools.product(*ranges):
            at = sum(cell)
            if marked[at]:
                other = next(b for j, b in enumerate(boxes) if j != k and overlap(b, (off, size)))
                raise _overlap_error(what, other, (off, size))
            marked[at] = 1


def _sweep_pairs(boxes: list[Box], dim: int) -> int:
    """How many pairs a sweep along `dim` examines: per box, the later boxes (by start) that
    start before it ends."""
    starts = sorted(b[0][dim] for b in boxes)
    ends = sorted((b[0][dim], b[0][dim] + b[1][dim]) for b in boxes)
    return sum(bisect.bisect_left(starts, end) - i - 1 for i, (_, end) in enumerate(ends))


def _check_pairs(boxes: list[Box], what: str) -> None:
    """Sweep along the dimension where the fewest pairs of boxes meet (only boxes whose ranges
    there meet can overlap); refused up front if even that is more than the budget."""
    cost, dim = min((_sweep_pairs(boxes, d), d) for d in range(len(boxes[0][0])))
    if cost > _PAIRS_PER_BOX * len(boxes):
        raise ValueError(f"{what}: {len(boxes)} chunks that do not form a grid are too many to "
                         "check for overlaps")
    ordered = sorted(boxes, key=lambda b: b[0][dim])
    for i, (off, size) in enumerate(ordered):
        for off2, size2 in ordered[i + 1:]:
            if off2[dim] >= off[dim] + size[dim]:
                break
            if overlap((off, size), (off2, size2)) is not None:
                raise _overlap_error(what, (off, size), (off2, size2))


def overlap(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes (global coordinates), or None if it is empty."""
    offsets, sizes = [], []
    for (ao, as_), (bo, bs) in zip(zip(*a, strict=True), zip(*b, strict=True), strict=True):
        lo, hi = max(ao, bo), min(ao + as_, bo + bs)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return tuple(offsets), tuple(sizes)
