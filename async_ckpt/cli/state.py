"""What a committed checkpoint holds, as the commands see it: its components' copies, every leaf
of each copy with its key path (tensors and plain values), who wrote each tensor, and verified
reads of chosen tensors in batches (for progress bars and bounded memory).

A SHARDED component (format_version 2) is one copy, ``sharded``, whose tensors are its *global*
tensors: `Copy.shard` lists one summary record per global tensor (dtype, global shape, the bytes
of all its chunks, their codecs, and a digest of its chunk boxes and hashes, so two steps chunked
and stored alike compare equal without a read) and `Copy.sharded` keeps the chunks.
`read_batches` assembles each global tensor from its chunks (every chunk read verified), so the
commands see the same tensors a one-process load into plain tensors gives.

Built only on `format` (the manifest, the skeleton's `leaves`) and `load.reader` (verified ranged
reads): no second parser, no second hash or decompress path.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..format.codec import new_hasher
from ..format.manifest import Manifest, ShardEntry, TensorEntry
from ..format.sharded import GlobalTensor, ShardedEntry
from ..format.names import step_dir
from ..format.tree import PickledLeaf, TensorLeaf, dtype_from_name, leaves
from ..load.reader import check_files, read_tensors
from ..storage import Storage
from .common import CliError

BATCH_BYTES = 256 << 20     # tensors read per request batch (progress granularity, peak memory)
_WRITER_RE = re.compile(r"^data-(?:n(\d+)-)?(?:r(\d+)-)?")
SHARDED_COPY = "sharded"       # the name of a SHARDED component's one copy


def writer_of(file: str, offset: int = 0, manifest: Manifest | None = None) -> tuple[int | None, int | None]:
    """(node, rank) that wrote the record at `offset` of a data file: from the file's name
    (``data-n<node>-r<rank>-...``; files of earlier releases name only the rank) or, for a node's
    one data object (``data-n<node>-<rand>``), from the segment holding it (segment i: the node's
    local rank i, ranks numbered ``node * local_world_size + local rank``)."""
    match = _WRITER_RE.match(file)
    if not match:
        return None, None
    node, rank = (int(g) if g is not None else None for g in match.groups())
    entry = manifest.files.get(file) if manifest is not None else None
    local = manifest.topology.get("local_world_size") if manifest is not None else None
    if rank is None and node is not None and entry is not None and entry.segments and isinstance(local, int):
        i = bisect.bisect_right(entry.segments, offset, key=lambda seg: seg[0]) - 1
        if 0 <= i < local:
            rank = node * local + i
    return node, rank


def dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) if path else "<root>"


@dataclass(frozen=True)
class Copy:
    """One stored copy of a component (``global``, ``replicated``, ``rank<r>``, ...)."""
    component: str
    name: str
    shard: ShardEntry
    leaves: list[tuple[tuple[Any, ...], Any]]
    sharded: ShardedEntry | None = None     # SHARDED: the chunks of the global tensors

    def chunks(self, index: int) -> GlobalTensor | None:
        """The global tensor `index` of a SHARDED copy, with its chunks (None for other copies)."""
        return None if self.sharded is None else self.sharded.tensors[index]

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
        if comp.sharded is not None and copy in (None, SHARDED_COPY):
            found = leaves(comp.sharded.tree, f"{where} component {key!r}")
            out.append(Copy(key, SHARDED_COPY, _summary(comp.sharded), found, comp.sharded))
        for name, shard in comp.shards.items():
            if copy is not None and name != copy:
                continue
            for _, leaf in (found := leaves(shard.tree, f"{where} component {key!r} copy {name!r}")):
                if isinstance(leaf, TensorLeaf) and leaf.index >= len(shard.tensors):
                    raise CliError(f"{where}: component {key!r} copy {name!r} refers to tensor "
                                   f"#{leaf.index}, which its manifest lacks")
            out.append(Copy(key, name, shard, found))
    if copy is not None and not out:
        names = sorted({n for k, c in manifest.components.items() if component in (None, k)
                        for n in [*c.shards, *([SHARDED_COPY] if c.sharded else [])]})
        raise CliError(f"no copy {copy!r} in step {manifest.step} at {where} (copies: {', '.join(names)})")
    return out


def _summary(entry: ShardedEntry) -> ShardEntry:
    """One record per global tensor standing for all its chunks (see the module docstring)."""
    records = []
    for g in entry.tensors:
        digest = new_hasher()
        for c in g.chunks:
            digest.update(f"{list(c.offsets)}{list(c.sizes)}{c.record.codec}{c.record.hash};".encode())
        records.append(TensorEntry(
            g.dtype, g.shape, "", 0, sum(c.record.length for c in g.chunks),
            sum(c.record.nbytes for c in g.chunks),
            "+".join(sorted({c.record.codec for c in g.chunks})) or "raw", digest.hexdigest()))
    return ShardEntry(entry.tree, tuple(records), entry.owners)


def assemble(g: GlobalTensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """The global tensor from its chunks' tensors (in `g.chunks` order; the manifest's reader
    checked that they tile it)."""
    if len(parts) == 1 and tuple(parts[0].shape) == tuple(g.shape):
        return parts[0]
    out = torch.empty(g.shape, dtype=parts[0].dtype if parts else dtype_from_name(g.dtype, ""))
    for chunk, part in zip(g.chunks, parts, strict=True):
        dst = out
        for d, (o, s) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
            dst = dst.narrow(d, o, s)
        dst.copy_(part)
    return out


def _read_sharded(storage: Storage, folder: str, cp: Copy, batch: list[int], where: str
                  ) -> list[torch.Tensor]:
    assert cp.sharded is not None
    wanted = [cp.sharded.tensors[i] for i in batch]
    records = tuple(c.record for g in wanted for c in g.chunks)
    parts = read_tensors(storage, folder, ShardEntry(None, records, cp.shard.owners), where)
    out, pos = [], 0
    for g in wanted:
        out.append(assemble(g, parts[pos:pos + len(g.chunks)]))
        pos += len(g.chunks)
    return out


def read_batches(storage: Storage, manifest: Manifest, cp: Copy, indices: list[int],
                 on_bytes: Callable[[int], None] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """The tensors `indices` of a copy, verified, as dicts {index: tensor} of about BATCH_BYTES."""
    folder = step_dir(manifest.step)
    shard = cp.shard
    if cp.sharded is not None:
        check_files(storage, folder, manifest, {c.record.file for i in indices
                                                for c in cp.sharded.tensors[i].chunks})
    else:
        check_files(storage, folder, manifest, {shard.tensors[i].file for i in indices})
    where = f"{storage.child_url(folder)} component {cp.component!r} shard {cp.name!r}"
    batch: list[int] = []
    size = 0
    ordered = sorted(set(indices), key=lambda i: (shard.tensors[i].file, shard.tensors[i].offset))
    for pos, index in enumerate(ordered):
        batch.append(index)
        size += shard.tensors[index].length
        if size >= BATCH_BYTES or pos == len(ordered) - 1:
            if cp.sharded is not None:
                tensors = _read_sharded(storage, folder, cp, batch, where)
            else:
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
