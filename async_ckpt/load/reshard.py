"""Loading a SHARDED component into the live state, whatever topology saved it (resharding).

Called by `load.restore.Loader` on the caller's thread of every rank, before any
``load_state_dict``. The target is the component's live ``state_dict()`` (as DCP loads in place;
a stateful may offer ``load_target()`` instead, whose result has a place for every saved entry,
as `training.state.OptimizerState` does for an optimizer that has not stepped yet):
its structure is kept, and each leaf is taken from the checkpoint by its key path:

- a DTensor gets the box of its global tensor that this rank's placements cover: the saved
  chunks that intersect it are read (whole records, each verified against its hash), the
  overlaps copied into a new local tensor, and a DTensor built on the live mesh and placements;
- a plain tensor gets the whole global tensor, assembled the same way;
- any other leaf gets the saved value.

Nothing live is modified here. Every mismatch (a live key the checkpoint lacks, another global
shape or dtype, a tensor saved as a non-tensor, an empty live container where the checkpoint holds
entries, such as an optimizer without state yet) raises CheckpointError naming the key.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, CorruptCheckpointError, translate_storage_error
from ..format.codec import byte_view, new_hasher
from ..format.manifest import ComponentEntry, Manifest, ShardEntry, TensorEntry
from ..format.sharded import Box, Chunk, GlobalTensor, ShardedEntry, merge_trees, overlap, remap_refs
from ..format.tree import PickledLeaf, TensorLeaf, dtype_name, leaves, unflatten
from ..storage import Storage, StorageError
from .readbuf import ReadSession
from .reader import check_files, read_tensors, unflatten_owned

_MISSING = object()


@dataclass
class _Want:
    """One live tensor leaf to fill."""
    path: tuple[Any, ...]
    live: Any                 # the live tensor or DTensor
    saved: GlobalTensor
    box: Box                  # the region of the global tensor this rank needs
    value: Any = None


def _box_of(live: Any, where: str) -> Box:
    from torch.distributed.tensor import DTensor
    if isinstance(live, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        sizes, offsets = compute_local_shape_and_global_offset(live.shape, live.device_mesh,
                                                              live.placements)
        if tuple(live.to_local().shape) != tuple(sizes):
            raise CheckpointError(f"{where}: the live DTensor's local shard does not match its "
                                  "placements; cannot tell which part of the tensor it needs")
        return tuple(int(o) for o in offsets), tuple(int(s) for s in sizes)
    return (0,) * live.dim(), tuple(live.shape)


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(k) for k in path) or "/"


def _node_at(tree: Any, path: tuple[Any, ...]) -> Any:
    """The skeleton node at a key path (which `leaves` produced from the same skeleton)."""
    node = tree
    for key in path:
        if isinstance(node.get("d"), list):
            node = next(v for k, v in node["d"] if k == key)
        else:
            node = node.get("l", node.get("u"))[key]
    return node


def _plan(live_state: Any, entry: ComponentEntry, where: str, allow_pickle: bool = False
          ) -> tuple[Any, list[_Want]]:
    """The loaded state's structure (tensor leaves still to fill) and the tensors to fill."""
    assert entry.sharded is not None
    saved_tensors = entry.sharded.tensors
    saved = dict(leaves(entry.sharded.tree, where))
    for path, leaf in saved.items():
        if isinstance(leaf, PickledLeaf):   # unpickled only with the opt-in (unflatten refuses)
            saved[path] = unflatten(_node_at(entry.sharded.tree, path), [], where, allow_pickle)
    prefixes = {path[:k] for path in saved for k in range(len(path))}
    wants: list[_Want] = []
    missing: list[str] = []

    def walk(obj: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(obj, torch.Tensor):
            leaf = saved.get(path, _MISSING)
            if leaf is _MISSING:
                missing.append(_path_str(path))
                return obj
            if not isinstance(leaf, TensorLeaf):
                raise CheckpointError(f"{where}: {_path_str(path)!r} is a tensor in the live state "
                                      f"but was saved as {type(leaf).__name__}")
            g = saved_tensors[leaf.index]
            live_dtype = dtype_name(obj.dtype)
            if g.dtype != live_dtype or tuple(g.shape) != tuple(obj.shape):
                raise CheckpointError(
                    f"{where}: tensor {_path_str(path)!r} was saved as {g.dtype}{list(g.shape)} "
                    f"(global), the live one is {live_dtype}{list(obj.shape)}; the model or "
                    "optimizer differs from the one that saved it")
            want = _Want(path, obj, g, _box_of(obj, f"{where} tensor {_path_str(path)!r}"))
            wants.append(want)
            return want
        if isinstance(obj, dict):
            if not obj and path in prefixes:
                raise CheckpointError(
                    f"{where}: {_path_str(path)!r} is empty in the live state but the checkpoint "
                    "holds entries under it (an optimizer without state yet?); initialise it "
                    "before loading (ac.OptimizerState does) so every entry has a place to go")
            out: dict = (collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {})
            for k, v in obj.items():
                out[k] = walk(v, path + (k,))
            if hasattr(obj, "_metadata"):
                out._metadata = obj._metadata  # type: ignore[attr-defined]
            return out
        if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
            if not obj and path in prefixes:
                raise CheckpointError(f"{where}: {_path_str(path)!r} is empty in the live state "
                                      "but the checkpoint holds entries under it")
            values = [walk(v, path + (i,)) for i, v in enumerate(obj)]
            return values if isinstance(obj, list) else tuple(values)
        leaf = saved.get(path, _MISSING)
        if leaf is _MISSING:
            missing.append(_path_str(path))
            return obj
        if isinstance(leaf, TensorLeaf):
            raise CheckpointError(f"{where}: {_path_str(path)!r} was saved as a tensor, the live "
                                  f"state has a {type(obj).__name__} there")
        return leaf

    structure = walk(live_state, ())
    if missing:
        raise CheckpointError(f"{where}: the live state has {len(missing)} entr"
                              f"{'y' if len(missing) == 1 else 'ies'} the checkpoint lacks: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return structure, wants


def _fill(structure: Any) -> Any:
    if isinstance(structure, _Want):
        return structure.value
    if isinstance(structure, dict):
        out: dict = collections.OrderedDict() if isinstance(structure, collections.OrderedDict) else {}
        for k, v in structure.items():
            out[k] = _fill(v)
        if hasattr(structure, "_metadata"):
            out._metadata = structure._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(structure, list):
        return [_fill(v) for v in structure]
    if isinstance(structure, tuple):
        return tuple(_fill(v) for v in structure)
    return structure


def whole_tensors(storage: Storage, folder: str, manifest: Manifest, key: str, verify: bool = True,
                  session: ReadSession | None = None) -> tuple[Any, list[torch.Tensor]]:
    """A chunked component's skeleton and every global tensor, whole (its chunks read, verified
    and put together): how a REPLICATED component split into row blocks is loaded."""
    entry = manifest.components[key]
    assert entry.sharded is not None
    where = f"{storage.child_url(folder)} component {key!r}"
    records = [c.record for t in entry.sharded.tensors for c in t.chunks]
    check_files(storage, folder, manifest, {r.file for r in records})
    read = iter(read_tensors(storage, folder, ShardEntry(None, tuple(records), ()), where, verify, session))
    out = []
    for t in entry.sharded.tensors:
        parts = [(c, next(read)) for c in t.chunks]
        if len(parts) == 1:
            out.append(parts[0][1])
            continue
        whole = torch.empty(t.shape, dtype=parts[0][1].dtype)
        for chunk, data in parts:
            dst = whole
            for d, (o, n) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                dst = dst.narrow(d, o, n)
            dst.copy_(data)
        out.append(whole)
    return entry.sharded.tree, out


def load_whole(storage: Storage, folder: str, manifest: Manifest, key: str, allow_pickle: bool,
               verify: bool = True, session: ReadSession | None = None) -> Any:
    """A chunked REPLICATED component's state, rebuilt from its saved skeleton (as any copy is)."""
    tree, tensors = whole_tensors(storage, folder, manifest, key, verify, session)
    return unflatten_owned(tree, tensors, f"{storage.child_url(folder)} component {key!r}", allow_pickle)


def by_key(entry: ComponentEntry, where: str) -> ComponentEntry | None:
    """A PER_RANK component's copies as one SHARDED-like entry, when their keys allow it: no key
    path is in two copies (pipeline stages: each stage its own parameters), so every key names
    one value. Then a run of another pipeline degree loads each live key from whichever rank saved
    it. None when copies share keys (RNG states, per-rank counters): those belong to their rank."""
    seen: set[tuple[Any, ...]] = set()
    tensors: list[GlobalTensor] = []
    merged: Any = None
    for name in sorted(entry.shards):
        copy = entry.shards[name]
        mapping = {}
        for path, leaf in leaves(copy.tree, where):
            if path in seen:
                return None
            seen.add(path)
            if isinstance(leaf, TensorLeaf):
                if not 0 <= leaf.index < len(copy.tensors):
                    return None
                record = copy.tensors[leaf.index]
                mapping[leaf.index] = len(tensors)
                tensors.append(GlobalTensor(path, record.dtype, tuple(record.shape), (
                    Chunk((0,) * len(record.shape), tuple(record.shape), record),)))
        tree = remap_refs(copy.tree, mapping)
        merged = tree if merged is None else merge_trees(merged, tree, (), where)
    return ComponentEntry(entry.sharing_pattern, entry.required, entry.validation_level,
                          entry.metadata, {}, ShardedEntry(merged, tuple(tensors), ()))


def load_sharded(storage: Storage, folder: str, manifest: Manifest, key: str, live_state: Any,
                 verify: bool = True, session: ReadSession | None = None,
                 entry: ComponentEntry | None = None, allow_pickle: bool = False) -> Any:
    """The state to pass to the component's load_state_dict: `live_state`'s structure with every
    leaf taken from the checkpoint (see the module docstring); `entry`: another view of the
    component (`by_key`)."""
    entry = entry or manifest.components[key]
    where = f"{storage.child_url(folder)} component {key!r}"
    structure, wants = _plan(live_state, entry, where, allow_pickle)
    # every chunk that any wanted box intersects, read once (shared by tied tensors); a box made
    # of whole raw chunks that each fill full rows of it is read straight into its place instead
    needed: dict[tuple[int, int], TensorEntry] = {}
    pieces, direct = [], []
    for w in wants:
        parts = []
        for chunk in w.saved.chunks:
            ov = overlap(w.box, (chunk.offsets, chunk.sizes))
            if ov is not None:
                parts.append((chunk, (id(w.saved), w.saved.chunks.index(chunk)), ov))
        in_place = len(parts) > 1 and all(_fills_rows(w.box, c) for c, _, _ in parts)
        if not in_place:
            for _, ident, _ in parts:
                needed.setdefault(ident, next(c.record for c, i, _ in parts if i == ident))
        pieces.append(parts)
        direct.append(in_place)
    records = list(needed.values())
    check_files(storage, folder, manifest, {r.file for r in records} |
                {c.record.file for parts, d in zip(pieces, direct, strict=True) if d for c, _, _ in parts})
    read = read_tensors(storage, folder, ShardEntry(None, tuple(records), ()), where, verify, session)
    by_ident = dict(zip(needed, read, strict=True))
    for w, parts, in_place in zip(wants, pieces, direct, strict=True):
        offsets, sizes = w.box
        dtype = w.live.dtype
        exact = [p for p in parts if p[0].offsets == offsets and p[0].sizes == sizes]
        if exact and not in_place:
            local = by_ident[exact[0][1]]
        elif in_place:
            local = torch.empty(sizes, dtype=dtype)
            flat = byte_view(local.view(-1).view(torch.uint8)) if local.numel() else memoryview(b"")
            row = local.element_size() * math.prod(sizes[1:])
            for chunk, _, _ in parts:
                start = (chunk.offsets[0] - offsets[0]) * row
                _read_in_place(storage, folder, chunk.record, flat[start:start + chunk.record.nbytes],
                               verify, where)
        else:
            local = torch.empty(sizes, dtype=dtype)
            for chunk, ident, ov in parts:
                src, dst = by_ident[ident], local
                for d, (o, n) in enumerate(zip(*ov, strict=True)):
                    src = src.narrow(d, o - chunk.offsets[d], n)
                    dst = dst.narrow(d, o - offsets[d], n)
                dst.copy_(src)
        w.value = _as_live(w.live, local)
    return _fill(structure)


def _fills_rows(box: Box, chunk: Chunk) -> bool:
    """A raw chunk lying wholly inside `box` and spanning it in every dimension but the first:
    its bytes are one contiguous slab of the box's C-contiguous tensor."""
    (bo, bs), co, cs = box, chunk.offsets, chunk.sizes
    return (chunk.record.codec == "raw" and len(bo) > 0 and co[1:] == bo[1:] and cs[1:] == bs[1:]
            and bo[0] <= co[0] and co[0] + cs[0] <= bo[0] + bs[0])


def _read_in_place(storage: Storage, folder: str, record: TensorEntry, out: memoryview, verify: bool,
                   where: str) -> None:
    """One raw record's bytes read into `out` and checked against its hash there: the resharding
    copy and the read are one pass (as a load into the live tensors would be)."""
    path = f"{folder}/{record.file}"
    try:
        if record.length:
            storage.read_into(path, record.offset, out)
    except StorageError as exc:
        raise translate_storage_error(exc) from exc
    except (OSError, EOFError) as exc:
        raise CorruptCheckpointError(f"cannot read {where} record at {storage.child_url(path)} "
                                     f"offset {record.offset}: {exc}") from exc
    if verify:
        hasher = new_hasher()
        hasher.update(out)
        if hasher.hexdigest() != record.hash:
            raise CorruptCheckpointError(f"hash mismatch for {where} record of {record.dtype}"
                                         f"{list(record.shape)} in {record.file}: the data is corrupt")


def _as_live(live: Any, local: torch.Tensor) -> Any:
    """`local` in the live leaf's form: a DTensor on the live mesh and placements, or a tensor."""
    from torch.distributed.tensor import DTensor
    if isinstance(live, DTensor):
        local = local.to(live.to_local().device)
        return DTensor.from_local(local, live.device_mesh, live.placements, run_check=False,
                                  shape=live.shape, stride=live.stride())
    return local
