"""Per-node manifest fragments (format_version 3): the records of a multi-node save, one document
per node, so that no document grows with ranks x tensors and a loading rank parses only its own.

A save with more than one node keeps in the root ``manifest.json`` only what every rank reads or
what is O(tensors): GLOBAL, REPLICATED and PER_GROUP copies, the skeleton and global tensors of
chunked components (SHARDED, split REPLICATED) *without* their chunks, every data file, and the list
of fragments (`manifest.FragmentRef`: size, xxh3-128, node, ranks, the copies and the chunked
components each holds). Each node writer writes its node's fragment,
``fragment-n<node>-<8 hex>.json``, before it reports (exclusive create), holding:

- ``copies``: its ranks' PER_RANK and its PER_NODE copies, as the root's ``shards`` of version 1,
  except that ``tree`` is an index into the fragment's ``trees`` (identical skeletons -- every rank
  of an FSDP job has the same -- are stored once);
- ``chunks``: per chunked component, the chunks its ranks wrote (version 2's chunk objects plus the
  ``path`` of their global tensor, since the global tensor list is the coordinator's to number).

The document is sealed like the manifest (``fragment_hash``) and the root carries its size and
hash, so a fragment is trusted only as the root that names it. A checkpoint still exists iff its
root does; a fragment no root lists is garbage like any unlisted file.

Reading (`complete`): the loader reads the root (`names.read_manifest(..., fragments=False)`),
decides which copies it needs, and merges only the fragments holding them (all fragments listing
a chunked component it reshards); tools merge all of them. Every check runs before a record is
used: the fragment is the size and hash the root says, of the root's step and node; it holds
exactly the copies the root lists for it; its records point only at data files its own node
wrote; its chunks name global tensors of the root, fit their boxes, and -- once every fragment
of the component is in -- tile each tensor exactly (`sharded.check_tiling`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import xxhash

from ..errors import CorruptCheckpointError, translate_storage_error
from ..storage import Storage, StorageError
from . import seal, sharded
from .manifest import (FRAGMENT_VERSION, HASH_ALGO, MAX_BYTES, Manifest, ShardEntry, TensorEntry, _get,
                       _int, _ints, _tensor, record_json)

FRAGMENT_KEY = "fragment_hash"
PathChunk = tuple[tuple[Any, ...], sharded.Chunk]     # (global tensor path, chunk)


def fragment_name(node: int, rand: str) -> str:
    return f"fragment-n{node:05d}-{rand}.json"


def digest(raw: bytes) -> str:
    """The hash the root lists for a fragment: xxh3-128 of its bytes."""
    return xxhash.xxh3_128_hexdigest(raw)


def to_json(step: int, node: int, ranks: tuple[int, ...], copies: dict[str, dict[str, ShardEntry]],
            chunks: dict[str, list[PathChunk]]) -> bytes:
    """The sealed fragment of one node."""
    trees: list[Any] = []
    index: dict[str, int] = {}

    def tree_ref(tree: Any) -> int:
        text = json.dumps(tree, sort_keys=True, separators=(",", ":"))
        if text not in index:
            index[text] = len(trees)
            trees.append(tree)
        return index[text]

    doc = {
        "format_version": FRAGMENT_VERSION, "step": step, "node": node, "ranks": list(ranks),
        "hash_algorithm": HASH_ALGO,
        "copies": {key: {name: {"owners": list(e.owners), **({"members": list(e.members)} if e.members else {}),
                                "tree": tree_ref(e.tree), "tensors": [record_json(t) for t in e.tensors]}
                         for name, e in sorted(named.items())}
                   for key, named in sorted(copies.items())},
        "chunks": {key: [{"path": list(path), **sharded.chunk_json(c, record_json)} for path, c in found]
                   for key, found in sorted(chunks.items())},
        "trees": trees,
    }
    body = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
    return seal.seal(body, FRAGMENT_KEY)


@dataclasses.dataclass(frozen=True)
class Fragment:
    """One parsed fragment: its copies (component -> copy -> entry) and chunks (component -> ...)."""
    copies: dict[str, dict[str, ShardEntry]]
    chunks: dict[str, list[PathChunk]]


def parse(raw: bytes, where: str, name: str, root: Manifest) -> Fragment:
    """Validate fragment `name` against the root that lists it; CorruptCheckpointError naming
    `where` on any problem."""
    ref = root.fragments[name]
    try:
        if len(raw) != ref.size or digest(raw) != ref.hash:
            raise ValueError(f"it has {len(raw)} bytes hashing to {digest(raw)}, the manifest lists "
                             f"{ref.size} bytes hashing to {ref.hash} (damaged or replaced)")
        doc, _ = seal.loads(raw, FRAGMENT_KEY, "the fragment")
        if _get(doc, "format_version", int, "fragment") != FRAGMENT_VERSION:
            raise ValueError(f"format_version {doc['format_version']} is not {FRAGMENT_VERSION}")
        if _int(doc.get("step"), "step") != root.step or _int(doc.get("node"), "node") != ref.node:
            raise ValueError(f"it is node {doc.get('node')}'s of step {doc.get('step')}, the manifest "
                             f"lists it as node {ref.node}'s of step {root.step}")
        if _ints(_get(doc, "ranks", list, "fragment"), "ranks") != ref.ranks:
            raise ValueError(f"it holds ranks {doc['ranks']}, the manifest says {list(ref.ranks)}")
        own = {f: e for f, e in root.files.items() if e.node == ref.node}

        def record(d: Any, what: str) -> TensorEntry:
            file = d.get("file") if isinstance(d, dict) else None
            if isinstance(file, str) and file in root.files and file not in own:
                raise ValueError(f"{what} points at {file!r}, which node {root.files[file].node} "
                                 f"wrote, not this fragment's node {ref.node}")
            return _tensor(d, own, what)

        trees = _get(doc, "trees", list, "fragment")
        copies: dict[str, dict[str, ShardEntry]] = {}
        for key, named in _get(doc, "copies", dict, "fragment").items():
            if not isinstance(named, dict) or set(named) != set(ref.copies.get(key, {})):
                raise ValueError(f"its copies of {key!r} are not the ones the manifest lists for it "
                                 f"({sorted(ref.copies.get(key, {}))})")
            copies[key] = {}
            for copy, s in named.items():
                what = f"copies.{key}.{copy}"
                tree = _int(s.get("tree") if isinstance(s, dict) else None, f"{what}.tree")
                if tree >= len(trees):
                    raise ValueError(f"{what}.tree indexes no tree (there are {len(trees)})")
                members = _ints(s.get("members", []), f"{what}.members")
                if members != ref.copies[key][copy]:
                    raise ValueError(f"{what}.members {list(members)} differ from the manifest's")
                tensors = tuple(record(t, f"{what}.tensors[{i}]")
                                for i, t in enumerate(_get(s, "tensors", list, what)))
                copies[key][copy] = ShardEntry(trees[tree], tensors,
                                               _ints(_get(s, "owners", list, what), f"{what}.owners"),
                                               members)
        if set(copies) != set(ref.copies):
            raise ValueError(f"it lacks the copies of {sorted(set(ref.copies) - set(copies))}")
        chunks: dict[str, list[PathChunk]] = {}
        found = _get(doc, "chunks", dict, "fragment")
        if set(found) != set(ref.chunks):
            raise ValueError(f"it holds chunks of {sorted(found)}, the manifest says {sorted(ref.chunks)}")
        for key, items in found.items():
            entry = root.components[key].sharded
            assert entry is not None      # manifest._check_refs
            globals_ = {t.path: t for t in entry.tensors}
            if not isinstance(items, list):
                raise ValueError(f"chunks.{key} must be a list")
            chunks[key] = []
            for j, c in enumerate(items):
                what = f"chunks.{key}[{j}]"
                raw_path = c.get("path") if isinstance(c, dict) else None
                path = tuple(raw_path) if isinstance(raw_path, list) else None
                if path is None or path not in globals_:
                    raise ValueError(f"{what} names no tensor of the component")
                t = globals_[path]
                chunks[key].append((path, sharded.parse_chunk(c, what, t.dtype, t.shape, record)))
        return Fragment(copies, chunks)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"malformed fragment {where}: {exc}") from None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError, OverflowError) as exc:
        raise CorruptCheckpointError(f"malformed fragment {where}: {exc}") from None


def merge(root: Manifest, parsed: dict[str, Fragment], where: str) -> Manifest:
    """The root with the records of `parsed` fragments in its components. A chunked component is
    completed only when every fragment holding its chunks is among them; its tiling is checked
    then."""
    merged = root.merged | frozenset(parsed)
    components = dict(root.components)
    for _, frag in sorted(parsed.items()):
        for key, copies in frag.copies.items():
            entry = components[key]
            components[key] = dataclasses.replace(entry, shards={**entry.shards, **copies})
    for key in sorted({k for frag in parsed.values() for k in frag.chunks}):
        holders = root.fragments_of(key)
        if not set(holders) <= merged:
            continue          # not needed whole by this reader: left without its chunks
        entry = components[key]
        assert entry.sharded is not None
        extra: dict[tuple[Any, ...], list[sharded.Chunk]] = {}
        for name in holders:
            if name in parsed:
                for path, chunk in parsed[name].chunks[key]:
                    extra.setdefault(path, []).append(chunk)
        tensors = []
        for i, t in enumerate(entry.sharded.tensors):
            chunks = t.chunks + tuple(extra.get(t.path, ()))
            try:
                sharded.check_tiling(t.shape, [(c.offsets, c.sizes) for c in chunks],
                                     f"components.{key}.sharded.tensors[{i}]")
            except ValueError as exc:
                raise CorruptCheckpointError(f"malformed manifest {where}: {exc} (over its "
                                             f"fragments {holders})") from None
            tensors.append(dataclasses.replace(t, chunks=chunks))
        components[key] = dataclasses.replace(
            entry, sharded=dataclasses.replace(entry.sharded, tensors=tuple(tensors)))
    return dataclasses.replace(root, components=components, merged=merged)


def complete(storage: Storage, folder: str, root: Manifest, names: list[str] | None = None) -> Manifest:
    """`root` with the fragments `names` (None: all of them) read, checked and merged in."""
    wanted = sorted(root.fragments) if names is None else sorted(set(names) - root.merged)
    parsed = {}
    for name in wanted:
        path = f"{folder}/{name}"
        url = storage.child_url(path)
        try:
            raw = storage.read_limited(path, min(root.fragments[name].size, MAX_BYTES) + 1)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"fragment {url} listed in the manifest is missing") from None
        except StorageError as exc:
            raise translate_storage_error(exc) from exc
        except OSError as exc:
            raise CorruptCheckpointError(f"cannot read fragment {url}: {exc}") from exc
        parsed[name] = parse(raw, url, name, root)
    return merge(root, parsed, storage.child_url(f"{folder}/manifest.json"))
