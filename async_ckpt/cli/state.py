"""What a committed checkpoint holds, as the commands see it: its components' copies, every leaf
of each copy with its key path (tensors and plain values), who wrote each tensor, and verified
reads of chosen tensors in batches (for progress bars and bounded memory).

Built only on `format` (the manifest, the skeleton's `leaves`) and `load.reader` (verified ranged
reads): no second parser, no second hash or decompress path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..format.manifest import Manifest, ShardEntry, TensorEntry
from ..format.names import step_dir
from ..format.tree import PickledLeaf, TensorLeaf, leaves
from ..load.reader import check_files, read_tensors
from ..storage import Storage
from .common import CliError

BATCH_BYTES = 256 << 20     # tensors read per request batch (progress granularity, peak memory)
_WRITER_RE = re.compile(r"^data-(?:n(\d+)-)?r(\d+)-")


def writer_of(file: str) -> tuple[int | None, int | None]:
    """(node, rank) that wrote a data file, from its name (``data-n<node>-r<rank>-...``; files of
    earlier releases name only the rank)."""
    match = _WRITER_RE.match(file)
    if not match:
        return None, None
    node, rank = match.groups()
    return (int(node) if node is not None else None), int(rank)


def dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) if path else "<root>"


@dataclass(frozen=True)
class Copy:
    """One stored copy of a component (``global``, ``replicated``, ``rank<r>``, ...)."""
    component: str
    name: str
    shard: ShardEntry
    leaves: list[tuple[tuple[Any, ...], Any]]

    def tensors(self) -> list[tuple[tuple[Any, ...], TensorLeaf, TensorEntry]]:
        return [(p, leaf, self.shard.tensors[leaf.index]) for p, leaf in self.leaves
                if isinstance(leaf, TensorLeaf)]

    def values(self) -> list[tuple[tuple[Any, ...], Any]]:
        return [(p, v) for p, v in self.leaves if not isinstance(v, TensorLeaf)]


def copies(manifest: Manifest, where: str, component: str | None = None,
           copy: str | None = None) -> list[Copy]:
    """The copies of the checkpoint (of one component, one copy name), in manifest order."""
    if component is not None and component not in manifest.components:
        raise CliError(f"step {manifest.step} has no component {component!r} at {where} "
                       f"(it has: {', '.join(manifest.components) or 'none'})")
    out = []
    for key, comp in manifest.components.items():
        if component is not None and key != component:
            continue
        for name, shard in comp.shards.items():
            if copy is not None and name != copy:
                continue
            for _, leaf in (found := leaves(shard.tree, f"{where} component {key!r} copy {name!r}")):
                if isinstance(leaf, TensorLeaf) and leaf.index >= len(shard.tensors):
                    raise CliError(f"{where}: component {key!r} copy {name!r} refers to tensor "
                                   f"#{leaf.index}, which its manifest lacks")
            out.append(Copy(key, name, shard, found))
    if copy is not None and not out:
        names = sorted({n for k, c in manifest.components.items() if component in (None, k) for n in c.shards})
        raise CliError(f"no copy {copy!r} in step {manifest.step} at {where} (copies: {', '.join(names)})")
    return out


def read_batches(storage: Storage, manifest: Manifest, cp: Copy, indices: list[int],
                 on_bytes: Callable[[int], None] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """The tensors `indices` of a copy, verified, as dicts {index: tensor} of about BATCH_BYTES."""
    folder = step_dir(manifest.step)
    shard = cp.shard
    check_files(storage, folder, manifest, {shard.tensors[i].file for i in indices})
    where = f"{storage.child_url(folder)} component {cp.component!r} shard {cp.name!r}"
    batch: list[int] = []
    size = 0
    ordered = sorted(set(indices), key=lambda i: (shard.tensors[i].file, shard.tensors[i].offset))
    for pos, index in enumerate(ordered):
        batch.append(index)
        size += shard.tensors[index].length
        if size >= BATCH_BYTES or pos == len(ordered) - 1:
            part = ShardEntry(None, tuple(shard.tensors[i] for i in batch), shard.owners)
            tensors = read_tensors(storage, folder, part, where)
            if on_bytes is not None:
                on_bytes(size)
            yield dict(zip(batch, tensors, strict=True))
            batch, size = [], 0


def leaf_value(leaf: Any) -> Any:
    """A non-tensor leaf for printing and JSON (pickled leaves are never unpickled)."""
    if isinstance(leaf, PickledLeaf):
        return f"<pickled, {leaf.nbytes} bytes>"
    if isinstance(leaf, torch.dtype):
        return str(leaf)
    if isinstance(leaf, tuple):
        return list(leaf)
    return leaf
