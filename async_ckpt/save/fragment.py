"""A node's manifest fragment (format_version 3, `format.fragments`), written by its node writer.

Call sequence, on a node writer's thread, once per save of a multi-node job, after the node's data
files are written and durable and before the node reports (`NodeWriter.write`):

1. ``split(shards)``: the node's written records sorted into what the root keeps (GLOBAL,
   REPLICATED, PER_GROUP: the coordinator still validates their replicas) and what the fragment
   holds (PER_RANK and PER_NODE copies, each checked complete here; the chunks of SHARDED and
   split REPLICATED components, one record per box);
2. ``write(...)``: the fragment created exclusively in the step folder (never overwritten; a
   killed attempt's fragment has another name and is garbage once no root lists it);
3. the `NodeReport` carries the `FragmentInfo` (name, size, hash, what it holds), the root's records
   and, per chunked component, a `ChunkedPart` (distinct skeletons, per-tensor totals): the
   coordinator never sees the fragment's records, so neither the Store nor the coordinator carries
   O(ranks x tensors).

A single-node save writes no fragment (its manifest stays format_version 1 or 2).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..dist.messages import ChunkedPart, FragmentInfo, ShardDescriptor, WrittenShard, WrittenTensor
from ..format import fragments
from ..format.manifest import IN_FRAGMENTS, ShardEntry
from ..storage import Storage
from ..types import SharingPattern
from . import sharded
from .assemble import Copy, finish, gather


@dataclasses.dataclass(frozen=True)
class Split:
    """A node's records, sorted for the root and for its fragment."""
    root: tuple[WrittenShard, ...]
    copies: dict[str, dict[str, ShardEntry]]
    chunks: dict[str, list[fragments.PathChunk]]
    parts: tuple[ChunkedPart, ...]
    described: tuple[ShardDescriptor, ...]


def split(shards: tuple[WrittenShard, ...]) -> Split:
    root: list[WrittenShard] = []
    mine: list[WrittenShard] = []
    for written in shards:
        meta = written.shard
        chunked = meta.chunked or meta.pattern == SharingPattern.SHARDED.value
        (mine if chunked or meta.pattern in IN_FRAGMENTS else root).append(written)
    copies: dict[tuple[str, str], Copy] = {}
    found: dict[str, tuple[ShardDescriptor, dict[int, Any], list[tuple[WrittenTensor, int]]]] = {}
    gather(mine, copies, found)
    stored: dict[str, dict[str, ShardEntry]] = {}
    described: dict[str, ShardDescriptor] = {}
    for (key, copy), part in sorted(copies.items()):
        stored.setdefault(key, {})[copy] = finish(key, copy, part)[0]
        described.setdefault(key, dataclasses.replace(part.meta, slots=(), tree=None, tree_source=False))
    chunks, parts = {}, []
    for key, (meta, trees, records) in sorted(found.items()):
        part_, kept = sharded.node_part(meta, trees, records)
        parts.append(part_)
        chunks[key] = kept
    return Split(tuple(root), stored, chunks, tuple(parts), tuple(described.values()))


def write(storage: Storage, folder: str, step: int, node: int, ranks: tuple[int, ...], parts: Split
          ) -> FragmentInfo | None:
    """Create the node's fragment in `folder`; None when the node holds nothing for one."""
    if not parts.copies and not parts.chunks:
        return None
    raw = fragments.to_json(step, node, ranks, parts.copies, parts.chunks)
    name = fragments.fragment_name(node, os.urandom(4).hex())
    storage.create_exclusive(f"{folder}/{name}", raw)
    nbytes = (sum(t.nbytes for named in parts.copies.values() for e in named.values() for t in e.tensors)
              + sum(c.record.nbytes for found in parts.chunks.values() for _, c in found))
    return FragmentInfo(name, len(raw), fragments.digest(raw), ranks,
                        {key: {copy: tuple(e.members) for copy, e in named.items()}
                         for key, named in parts.copies.items()},
                        tuple(sorted(parts.chunks)), nbytes, parts.described)
