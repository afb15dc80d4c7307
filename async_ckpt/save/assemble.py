"""The one place a manifest is built: from the node reports of one save (a world of one has one).

Called by the coordinator once every node has reported. It puts each rank's records under their
component's copy, checks that every copy is complete (its skeleton and every tensor reported
exactly once), and computes the totals. It also returns, for replica validation, which rank wrote
each tensor of a REPLICATED component or PER_GROUP copy, and each copy's skeleton.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from ..dist.messages import NodeReport, ShardDescriptor, WrittenTensor
from ..dist.topology import Topology
from ..errors import CheckpointError
from ..format.manifest import ComponentEntry, FileEntry, Manifest, ShardEntry, TensorEntry
from ..format.metrics_file import encode
from ..types import SharingPattern
from . import sharded


@dataclass(frozen=True)
class Assembled:
    manifest: Manifest
    # the writer rank of each tensor: REPLICATED by component, PER_GROUP copies by (component, copy)
    owners: dict[str | tuple[str, str], list[int]]
    trees: dict[tuple[str, str], Any]       # (component, copy) -> its skeleton


@dataclass
class _Copy:
    meta: ShardDescriptor
    tree: Any = None
    tree_seen: bool = False
    tensors: dict[int, tuple[TensorEntry, int]] = field(default_factory=dict)
    owners: set[int] = field(default_factory=set)


def _entry(t: WrittenTensor) -> TensorEntry:
    return TensorEntry(t.dtype, tuple(t.shape), t.file, t.offset, t.length, t.nbytes, t.codec,
                       t.hash, tuple(t.frames))


def assemble(step: int, topo: Topology, reports: list[NodeReport], metrics: dict[str, float],
             timings: dict[str, Any], versions: dict[str, str]) -> Assembled:
    """The manifest of this save, or CheckpointError if a copy is incomplete."""
    files: dict[str, FileEntry] = {}
    copies: dict[tuple[str, str], _Copy] = {}
    # SHARDED components: (meta, rank -> skeleton, chunk records with their writer)
    chunked: dict[str, tuple[ShardDescriptor, dict[int, Any], list[tuple[WrittenTensor, int]]]] = {}
    for report in reports:
        for f in report.files:
            files[f.name] = FileEntry(f.size, f.hash, tuple(tuple(seg) for seg in f.segments))  # type: ignore[misc]
        for written in report.shards:
            meta = written.shard
            if meta.chunked or meta.pattern == SharingPattern.SHARDED.value:
                _, trees_of, records = chunked.setdefault(meta.component, (meta, {}, []))
                if meta.tree_source:
                    trees_of[written.rank] = meta.tree
                records.extend((t, written.rank) for t in written.tensors)
                continue
            part = copies.setdefault((meta.component, meta.shard), _Copy(meta))
            if meta.tree_source:
                part.tree, part.tree_seen = meta.tree, True
                part.owners.add(written.rank)
            for t in written.tensors:
                if t.index in part.tensors:
                    raise CheckpointError(f"component {meta.component!r} copy {meta.shard!r}: tensor "
                                          f"#{t.index} was written twice (ranks {part.tensors[t.index][1]} "
                                          f"and {written.rank}); ranks disagree on the plan")
                part.tensors[t.index] = (_entry(t), written.rank)
                part.owners.add(written.rank)
    components: dict[str, ComponentEntry] = {}
    owners: dict[str | tuple[str, str], list[int]] = {}
    trees: dict[tuple[str, str], Any] = {}
    nbytes = 0
    for (key, shard), part in sorted(copies.items()):
        meta, tensors = part.meta, part.tensors
        if not part.tree_seen or sorted(tensors) != list(range(meta.num_tensors)):
            raise CheckpointError(f"component {key!r} shard {shard!r} is incomplete: no node "
                                  f"reported {'its skeleton' if not part.tree_seen else 'all its tensors'}")
        entry = components.setdefault(key, ComponentEntry(
            meta.pattern, meta.required, meta.validation, meta.metadata, {}))
        ordered = [tensors[i] for i in range(meta.num_tensors)]
        entry.shards[shard] = ShardEntry(part.tree, tuple(t for t, _ in ordered),
                                         tuple(sorted(part.owners)), tuple(meta.members))
        nbytes += sum(t.nbytes for t, _ in ordered)
        trees[(key, shard)] = part.tree
        if meta.pattern == SharingPattern.REPLICATED.value:
            owners[key] = [rank for _, rank in ordered]
        elif meta.pattern == SharingPattern.PER_GROUP.value:
            owners[(key, shard)] = [rank for _, rank in ordered]
    for key, (meta, trees_of, records) in sorted(chunked.items()):
        entry_s = sharded.build(key, meta.validation, trees_of, records)
        components[key] = ComponentEntry(meta.pattern, meta.required, meta.validation, meta.metadata,
                                         {}, entry_s)
        nbytes += sum(c.record.nbytes for t in entry_s.tensors for c in t.chunks)
    manifest = Manifest(
        step=step,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        topology=topo.as_json(), metrics=encode(metrics), files=files, components=components,
        nbytes=nbytes, timings=dict(timings), versions=versions,
        stored_nbytes=sum(sum(seg[1] for seg in f.segments) if f.segments else f.size  # not holes
                          for f in files.values()))
    return Assembled(manifest, owners, trees)
