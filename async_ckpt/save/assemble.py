"""The one place a manifest is built: from the node reports of one save (a world of one has one).

Called by the coordinator once every node has reported. It puts each rank's records under their
component's copy, checks that every copy is complete (its skeleton and every tensor reported
exactly once), and computes the totals. It also returns, for replica validation, which rank wrote
each tensor of a REPLICATED component or PER_GROUP copy, and each copy's skeleton.

A multi-node save (format_version 3) is assembled from less: each node writer has already put its
PER_RANK/PER_NODE copies and its chunks into its fragment (`save.fragment`, using `gather` and
`finish` from here), so the root gets the fragments' references, the root-level copies, and the
chunked components' skeletons and global tensors from the nodes' totals (`sharded.build_root`).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from ..dist.messages import ChunkedPart, NodeReport, ShardDescriptor, WrittenTensor
from ..dist.topology import Topology
from ..errors import CheckpointError
from ..format.manifest import ComponentEntry, FileEntry, FragmentRef, Manifest, ShardEntry, TensorEntry
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
class Copy:
    meta: ShardDescriptor
    tree: Any = None
    tree_seen: bool = False
    tensors: dict[int, tuple[TensorEntry, int]] = field(default_factory=dict)
    owners: set[int] = field(default_factory=set)


def _entry(t: WrittenTensor) -> TensorEntry:
    return TensorEntry(t.dtype, tuple(t.shape), t.file, t.offset, t.length, t.nbytes, t.codec,
                       t.hash, tuple(t.frames))


def gather(shards: Any, copies: dict[tuple[str, str], Copy],
           chunked: dict[str, tuple[ShardDescriptor, dict[int, Any], list[tuple[WrittenTensor, int]]]]
           ) -> None:
    """Sort written shards into complete-able copies and chunked components' trees and records."""
    for written in shards:
        meta = written.shard
        if meta.chunked or meta.pattern == SharingPattern.SHARDED.value:
            _, trees_of, records = chunked.setdefault(meta.component, (meta, {}, []))
            if meta.tree_source:
                trees_of[written.rank] = meta.tree
            records.extend((t, written.rank) for t in written.tensors)
            continue
        part = copies.setdefault((meta.component, meta.shard), Copy(meta))
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


def finish(key: str, shard: str, part: Copy) -> tuple[ShardEntry, list[int]]:
    """The stored copy and the writer rank of each of its tensors; CheckpointError if incomplete."""
    meta, tensors = part.meta, part.tensors
    if not part.tree_seen or sorted(tensors) != list(range(meta.num_tensors)):
        raise CheckpointError(f"component {key!r} shard {shard!r} is incomplete: no node "
                              f"reported {'its skeleton' if not part.tree_seen else 'all its tensors'}")
    ordered = [tensors[i] for i in range(meta.num_tensors)]
    return (ShardEntry(part.tree, tuple(t for t, _ in ordered), tuple(sorted(part.owners)),
                       tuple(meta.members)), [rank for _, rank in ordered])


def assemble(step: int, topo: Topology, reports: list[NodeReport], metrics: dict[str, float],
             timings: dict[str, Any], versions: dict[str, str]) -> Assembled:
    """The manifest of this save, or CheckpointError if a copy is incomplete. A multi-node save's
    reports carry only the root's records plus their nodes' fragments (format_version 3)."""
    files: dict[str, FileEntry] = {}
    copies: dict[tuple[str, str], Copy] = {}
    # SHARDED components: (meta, rank -> skeleton, chunk records with their writer)
    chunked: dict[str, tuple[ShardDescriptor, dict[int, Any], list[tuple[WrittenTensor, int]]]] = {}
    parts: dict[str, list[ChunkedPart]] = {}
    refs: dict[str, FragmentRef] = {}
    nodes = topo.num_nodes > 1
    nbytes = 0
    for report in reports:
        for f in report.files:
            files[f.name] = FileEntry(f.size, f.hash, tuple(tuple(seg) for seg in f.segments),  # type: ignore[misc]
                                      report.node if nodes else None)
        gather(report.shards, copies, chunked)
        for chunked_part in report.chunked:
            parts.setdefault(chunked_part.shard.component, []).append(chunked_part)
        if (frag := report.fragment) is not None:
            refs[frag.name] = FragmentRef(frag.size, frag.hash, report.node, tuple(frag.ranks),
                                          {k: dict(v) for k, v in frag.copies.items()}, tuple(frag.chunks))
            nbytes += frag.nbytes
    components: dict[str, ComponentEntry] = {}
    owners: dict[str | tuple[str, str], list[int]] = {}
    trees: dict[tuple[str, str], Any] = {}
    for (key, shard), part in sorted(copies.items()):
        meta = part.meta
        stored, writers = finish(key, shard, part)
        entry = components.setdefault(key, ComponentEntry(
            meta.pattern, meta.required, meta.validation, meta.metadata, {}))
        entry.shards[shard] = stored
        nbytes += sum(t.nbytes for t in stored.tensors)
        trees[(key, shard)] = part.tree
        if meta.pattern == SharingPattern.REPLICATED.value:
            owners[key] = writers
        elif meta.pattern == SharingPattern.PER_GROUP.value:
            owners[(key, shard)] = writers
    for key, (meta, trees_of, records) in sorted(chunked.items()):
        entry_s = sharded.build(key, meta.validation, trees_of, records)
        components[key] = ComponentEntry(meta.pattern, meta.required, meta.validation, meta.metadata,
                                         {}, entry_s)
        nbytes += sum(c.record.nbytes for t in entry_s.tensors for c in t.chunks)
    for key, found in sorted(parts.items()):
        meta = found[0].shard
        components[key] = ComponentEntry(meta.pattern, meta.required, meta.validation, meta.metadata,
                                         {}, sharded.build_root(key, found))
    for ref in refs.values():     # components whose every copy is in fragments
        for key in ref.copies:
            if key not in components:
                meta = _meta_of(reports, key)
                components[key] = ComponentEntry(meta.pattern, meta.required, meta.validation,
                                                 meta.metadata, {})
    manifest = Manifest(
        step=step,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        topology=topo.as_json(), metrics=encode(metrics), files=files, components=components,
        nbytes=nbytes, timings=dict(timings), versions=versions, fragments=refs,
        stored_nbytes=sum(sum(seg[1] for seg in f.segments) if f.segments else f.size  # not holes
                          for f in files.values()))
    return Assembled(manifest, owners, trees)


def _meta_of(reports: list[NodeReport], key: str) -> ShardDescriptor:
    for report in reports:
        for meta in report.fragment.described if report.fragment is not None else ():
            if meta.component == key:
                return meta
    raise CheckpointError(f"component {key!r}: no node described it")
