"""The manifest: the single JSON document whose presence means "committed".

Frozen dataclasses, a writer (`to_json`) and a validating reader (`parse_manifest`). The writer
seals the document with a hash of its own bytes (`manifest_hash`, see seal.py); the reader checks
it before parsing a byte, then treats the document as hostile all the same (a seal stops damage,
not an editor who reseals): every field is type-checked, file names are single path components,
records must fit inside their files, sizes must agree with dtypes and shapes, shapes must be ones
torch can build, and zstd frames must be long enough to hold what they claim (so a record's
decoded size is bounded by its stored bytes before anything is allocated).
"""
from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from . import seal, sharded
from .codec import (CODECS, HASH_ALGO, PIECE, codec_width, frames_per_piece, min_frame_size, piece_sizes,
                    segments_hash)
from .planes import PlanesWidth, planes_width
from .shuffle import shuffle_width
from ..errors import CheckpointError, CorruptCheckpointError
from .tree import dtype_from_name
from ..types import SharingPattern

FORMAT_VERSION = 1                 # what a checkpoint without format 2 features is written as
SHARDED_VERSION = 2                # the first version with SHARDED components (format/sharded.py)
FRAGMENT_VERSION = 3               # the first version with per-node fragments (format/fragments.py)
#                                    and data files made of segments (node objects)
SUPPORTED_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
HASH_KEY = "manifest_hash"         # the seal: xxh3-128 of the manifest without it (seal.py)
# Readers read at most this much of a manifest and writers refuse to write more: ~1.3 M tensor
# entries. Bigger jobs need manifests split into fragments.
MAX_BYTES = 256 << 20
_INT64_MAX = (1 << 63) - 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HASH_RE = re.compile(r"^[0-9a-f]{32}$")
FRAGMENT_RE = re.compile(r"^fragment-n[0-9]{5}-[0-9a-f]{8}\.json$")
# Patterns whose copies a multi-node save puts in its nodes' fragments (the rest stay in the root)
IN_FRAGMENTS = (SharingPattern.PER_RANK.value, SharingPattern.PER_NODE.value)
_PATTERNS = tuple(p.value for p in SharingPattern)


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    length: int        # stored bytes
    nbytes: int        # raw bytes
    codec: str
    hash: str          # of the stored bytes
    frames: tuple[int, ...] = ()   # zstd codecs: stored length of each frame (one per piece;
    #                                zstd-planes<W>: of each plane, W per piece)


@dataclass(frozen=True)
class ShardEntry:
    tree: Any
    tensors: tuple[TensorEntry, ...]
    owners: tuple[int, ...]           # ranks that wrote this copy
    members: tuple[int, ...] = ()     # PER_GROUP: the ranks of the group that reload it


@dataclass(frozen=True)
class ComponentEntry:
    sharing_pattern: str
    required: bool
    validation_level: str
    metadata: dict | None
    shards: dict[str, ShardEntry]
    sharded: sharded.ShardedEntry | None = None     # SHARDED components (their `shards` is empty)


@dataclass(frozen=True)
class FileEntry:
    size: int
    hash: str          # segments: `codec.segments_hash` of them, else of the whole file
    # A node's data object (format_version 3): (offset, length, xxh3-128 of the bytes) of each
    # local rank's segment, in file order; every record of the file lies inside one of them.
    segments: tuple[tuple[int, int, str], ...] = ()
    node: int | None = None     # format_version 3, multi-node: the node whose writer wrote it


@dataclass(frozen=True)
class FragmentRef:
    """format_version 3: one node's manifest fragment as the root lists it (format/fragments.py):
    its bytes' size and xxh3-128, the node and ranks that wrote it, the copies it holds
    (component -> copy -> PER_GROUP-style members, empty for PER_RANK/PER_NODE) and the chunked
    components it holds chunks of."""
    size: int
    hash: str
    node: int
    ranks: tuple[int, ...]
    copies: dict[str, dict[str, tuple[int, ...]]]
    chunks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    step: int
    created: str
    topology: dict
    metrics: dict
    files: dict[str, FileEntry]
    components: dict[str, ComponentEntry]
    nbytes: int
    stored_nbytes: int
    timings: dict
    versions: dict
    format_version: int = 0          # 0: the lowest version that can hold this manifest
    retention: dict = field(default_factory=dict)   # the writer's policy (keep_last, ...), for tools
    fragments: dict[str, FragmentRef] = field(default_factory=dict)   # format_version 3
    merged: frozenset[str] = frozenset()   # the fragments whose records are in `components`

    def version(self) -> int:
        """The format_version this manifest is written as: the lowest that holds everything in
        it, so that older releases still read checkpoints that use no newer feature."""
        if self.format_version:
            return self.format_version
        if self.fragments or any(f.segments for f in self.files.values()):
            return FRAGMENT_VERSION
        return SHARDED_VERSION if any(c.sharded for c in self.components.values()) else FORMAT_VERSION

    def copies(self, key: str) -> dict[str, tuple[int, ...]]:
        """Every stored copy of a component (name -> members), whether its records are in the
        root or in a fragment not read yet."""
        entry = self.components[key]
        found = {name: tuple(e.members) for name, e in entry.shards.items()}
        for ref in self.fragments.values():
            found.update(ref.copies.get(key, {}))
        return found

    def fragments_of(self, key: str, copy: str | None = None) -> list[str]:
        """The fragments holding records of component `key` (of its copy `copy` only, if given)."""
        return sorted(name for name, ref in self.fragments.items()
                      if (copy in ref.copies.get(key, {}) if copy is not None
                          else key in ref.copies or key in ref.chunks))

    def to_json(self) -> bytes:
        doc = {
            "format_version": self.version(), "step": self.step, "created": self.created,
            "hash_algorithm": HASH_ALGO, "versions": self.versions, "topology": self.topology,
            "metrics": self.metrics, "nbytes": self.nbytes, "stored_nbytes": self.stored_nbytes,
            "timings": self.timings, **({"retention": self.retention} if self.retention else {}),
            "files": {n: file_json(f) for n, f in sorted(self.files.items())},
            **({"fragments": {n: ref_json(r) for n, r in sorted(self.fragments.items())}}
               if self.fragments else {}),
            "components": {k: {
                "sharing_pattern": c.sharing_pattern, "required": c.required,
                "validation_level": c.validation_level, "metadata": c.metadata,
                "shards": {s: {"owners": list(e.owners), **({"members": list(e.members)} if e.members else {}),
                               "tree": e.tree, "tensors": [record_json(t) for t in e.tensors]}
                           for s, e in c.shards.items()},
                **({"sharded": sharded.to_json(c.sharded, record_json)} if c.sharded else {}),
            } for k, c in self.components.items()},
        }
        sealed = seal.seal(json.dumps(doc, allow_nan=False, separators=(",", ":")).encode(), HASH_KEY)
        if len(sealed) > MAX_BYTES:
            raise CheckpointError(f"the manifest of step {self.step} would take {len(sealed)} bytes, "
                                  f"more than the {MAX_BYTES} a reader accepts; save fewer, larger "
                                  "tensors (e.g. flatten parameter groups) or split the state")
        return sealed


def ref_json(ref: FragmentRef) -> dict:
    return {"size": ref.size, "hash": ref.hash, "node": ref.node, "ranks": list(ref.ranks),
            "copies": {k: {c: list(m) for c, m in sorted(v.items())} for k, v in sorted(ref.copies.items())},
            **({"chunks": list(ref.chunks)} if ref.chunks else {})}


def file_json(f: FileEntry) -> dict:
    """The JSON form of one data file's entry (``segments`` only when it has some)."""
    return {"size": f.size, "hash": f.hash,
            **({"segments": [list(seg) for seg in f.segments]} if f.segments else {}),
            **({"node": f.node} if f.node is not None else {})}


def record_json(t: TensorEntry) -> dict:
    """The JSON form of one record (a tensor of a copy, or a chunk of a sharded tensor)."""
    return {"dtype": t.dtype, "shape": list(t.shape), "file": t.file, "offset": t.offset,
            "length": t.length, "nbytes": t.nbytes, "codec": t.codec, "hash": t.hash,
            **({"frames": list(t.frames)} if t.frames else {})}


def _int(v: Any, what: str, lo: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{what} must be an integer >= {lo}, got {v!r}")
    return v


def _get(d: Any, key: str, kind: type | tuple, what: str) -> Any:
    if (not isinstance(d, dict) or key not in d or not isinstance(d[key], kind)
            or (isinstance(d[key], bool) and kind is int)):
        raise ValueError(f"{what}.{key} is missing or not a {getattr(kind, '__name__', kind)}")
    return d[key]


def _frames(doc: dict, what: str) -> list:
    frames = doc.get("frames", [])
    if not isinstance(frames, list):
        raise ValueError(f"{what}.frames must be a list of stored lengths")
    return frames


def _check_frames(entry: TensorEntry, width: int, what: str) -> None:
    """zstd: one frame (>= 1 byte) per piece. zstd-planes<W>: W lengths per piece, each at most
    its plane's size (equal: stored raw, possibly empty; smaller: one zstd frame)."""
    per, count = frames_per_piece(width), max(1, -(-entry.nbytes // PIECE))
    # Counted before listing the pieces: a hostile nbytes must not make us build a huge list.
    if sum(entry.frames) != entry.length or len(entry.frames) != count * per:
        raise ValueError(f"{what}: zstd frames do not add up to the record length or are not "
                         f"{'one' if per == 1 else per} per {PIECE >> 20} MiB piece of "
                         f"{entry.nbytes} bytes")
    planar, pieces = isinstance(width, PlanesWidth), piece_sizes(entry.nbytes)
    for i, length in enumerate(entry.frames):
        plane = pieces[i // per] // per
        if planar and (length > plane or (plane and not length)):
            raise ValueError(f"{what}: plane {per - 1 - i % per} of piece {i // per} stores "
                             f"{length} bytes, " + ("more than its " if length else "none of its ")
                             + str(plane))
        if not planar and length < 1:
            raise ValueError(f"{what}: frame {i} is empty")
        # The codec's limit: a frame holds at most 128 KiB per 4 stored bytes, so a record cannot
        # claim more bytes than its stored length can decode to (checked before any allocation).
        content = plane if planar else pieces[i]
        if (not planar or length < plane) and length < min_frame_size(content):
            raise ValueError(f"{what}: frame {i} of {length} bytes cannot hold the {content} bytes "
                             f"it stands for (a zstd frame needs at least {min_frame_size(content)})")


def _check_shape(shape: tuple[int, ...], itemsize: int, what: str) -> None:
    """A shape torch can build: every dimension, and the bytes of its non-zero dimensions (what
    torch computes even for an empty tensor), fit in an int64."""
    size = itemsize
    for d in shape:
        size *= d or 1
        if d > _INT64_MAX or size > _INT64_MAX:
            raise ValueError(f"{what}: shape {list(shape)[:8]}{'...' if len(shape) > 8 else ''} is "
                             "larger than any tensor can be")


def _tensor(doc: Any, files: dict[str, FileEntry], what: str) -> TensorEntry:
    name = _get(doc, "file", str, what)
    if name not in files:
        raise ValueError(f"{what} points at {name!r}, which the manifest's file list lacks")
    dtype = dtype_from_name(_get(doc, "dtype", str, what), what)
    shape = tuple(_int(d, f"{what}.shape") for d in _get(doc, "shape", list, what))
    _check_shape(shape, dtype.itemsize, what)
    entry = TensorEntry(
        dtype=doc["dtype"], shape=shape, file=name, offset=_int(doc.get("offset"), f"{what}.offset"),
        length=_int(doc.get("length"), f"{what}.length"), nbytes=_int(doc.get("nbytes"), f"{what}.nbytes"),
        codec=_get(doc, "codec", str, what), hash=_get(doc, "hash", str, what),
        frames=tuple(_int(f, f"{what}.frames") for f in _frames(doc, what)))
    if entry.codec not in CODECS:
        raise ValueError(f"{what} has unknown codec {entry.codec!r}; this release reads {CODECS} "
                         "(upgrade async_ckpt if a newer release wrote it)")
    if not _HASH_RE.match(entry.hash):
        raise ValueError(f"{what} has a malformed hash")
    if entry.nbytes != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{what}: nbytes {entry.nbytes} does not match {entry.dtype}{list(shape)}")
    if entry.codec == "raw" and (entry.length != entry.nbytes or entry.frames):
        raise ValueError(f"{what}: raw record of {entry.length} bytes (frames {list(entry.frames)}) "
                         f"holds {entry.nbytes}")
    width = codec_width(entry.codec)
    if width and width != (planes_width(dtype) if isinstance(width, PlanesWidth)
                           else shuffle_width(dtype)):
        raise ValueError(f"{what}: codec {entry.codec} groups {width}-byte elements, which "
                         f"{entry.dtype} does not have")
    if entry.codec != "raw":
        _check_frames(entry, width, what)
    if entry.offset + entry.length > files[name].size:
        raise ValueError(f"{what} runs past the end of {name}")
    if files[name].segments and not _in_one_segment(entry, files[name].segments):
        raise ValueError(f"{what} does not lie inside one segment of {name}")
    return entry


def _file(f: Any, name: str, version: int) -> FileEntry:
    what = f"files.{name}"
    node = f.get("node") if isinstance(f, dict) else None
    entry = FileEntry(_int(f.get("size") if isinstance(f, dict) else None, f"{what}.size"),
                      _get(f, "hash", str, what), (),
                      None if node is None else _int(node, f"{what}.node"))
    if "segments" not in f:
        return entry
    doc = f["segments"]
    if version < FRAGMENT_VERSION or not isinstance(doc, list) or not doc:
        raise ValueError(f"{what}.segments must be a non-empty list, and only in format_version "
                         f"{FRAGMENT_VERSION} or later")
    segments, end = [], 0
    for i, seg in enumerate(doc):
        if not isinstance(seg, list) or len(seg) != 3:
            raise ValueError(f"{what}.segments[{i}] must be [offset, length, hash]")
        offset, length = _int(seg[0], f"{what}.segments[{i}]"), _int(seg[1], f"{what}.segments[{i}]")
        if not isinstance(seg[2], str) or not _HASH_RE.match(seg[2]):
            raise ValueError(f"{what}.segments[{i}] has a malformed hash")
        if offset < end or offset + length > entry.size:
            raise ValueError(f"{what}.segments[{i}] overlaps the one before it, is out of order or "
                             "runs past the end of the file")
        segments.append((offset, length, seg[2]))
        end = offset + length
    if segments_hash(segments) != entry.hash:
        raise ValueError(f"{what}.hash is not the hash of its segments")
    return FileEntry(entry.size, entry.hash, tuple(segments), entry.node)


def _in_one_segment(entry: TensorEntry, segments: tuple[tuple[int, int, str], ...]) -> bool:
    i = bisect.bisect_right(segments, entry.offset, key=lambda seg: seg[0]) - 1
    return i >= 0 and entry.offset + entry.length <= segments[i][0] + segments[i][1]


def _dict(doc: dict, key: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def parse_manifest(raw: bytes, where: str, expected_step: int | None = None) -> Manifest:
    """Validate and decode a manifest; CorruptCheckpointError naming `where` on any problem.
    Its seal (if any: manifests from before sealing have none) is checked before it is parsed."""
    try:
        if len(raw) > MAX_BYTES:
            raise ValueError(f"it holds {len(raw)} bytes, more than the {MAX_BYTES} a manifest may have")
        doc, _sealed = seal.loads(raw, HASH_KEY, "the manifest")
        version = _get(doc, "format_version", int, "manifest")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"format_version {version} is not one this release reads "
                             f"({SUPPORTED_VERSIONS}); upgrade async_ckpt")
        files = {}
        for name, f in _get(doc, "files", dict, "manifest").items():
            if not _NAME_RE.match(name) or name in (".", "..") or FRAGMENT_RE.match(name):
                raise ValueError(f"data file name {name!r} is not a plain name inside the folder")
            files[name] = _file(f, name, version)
        refs = _refs(doc, version)
        components = {}
        for key, c in _get(doc, "components", dict, "manifest").items():
            shards = {}
            for sid, s in _get(c, "shards", dict, f"components.{key}").items():
                what = f"components.{key}.shards.{sid}"
                tensors = tuple(_tensor(t, files, f"{what}.tensors[{i}]")
                                for i, t in enumerate(_get(s, "tensors", list, what)))
                owners = tuple(_int(o, f"{what}.owners") for o in _get(s, "owners", list, what))
                members_doc = s.get("members", [])
                if not isinstance(members_doc, list):
                    raise ValueError(f"{what}.members must be a list of ranks")
                members = tuple(_int(m, f"{what}.members") for m in members_doc)
                if "tree" not in s:
                    raise ValueError(f"{what} has no state tree")
                shards[sid] = ShardEntry(s["tree"], tensors, owners, members)
            meta = c.get("metadata")
            pattern = _get(c, "sharing_pattern", str, f"components.{key}")
            if pattern not in _PATTERNS or (pattern == SharingPattern.SHARDED.value
                                            and version < SHARDED_VERSION):
                raise ValueError(f"components.{key}.sharing_pattern {pattern!r} is not one of "
                                 f"format_version {version}'s patterns")
            entry = None
            chunked = pattern == SharingPattern.SHARDED.value or (
                pattern == SharingPattern.REPLICATED.value and "sharded" in c)   # split REPLICATED
            if chunked:
                if shards or "sharded" not in c or version < SHARDED_VERSION:
                    raise ValueError(f"components.{key} is {pattern} in chunks: it needs a "
                                     "'sharded' entry, no copies, and format_version 2")
                # format_version 3: chunks listed in fragments complete the tiling (fragments.py)
                entry = sharded.parse(c["sharded"], f"components.{key}.sharded",
                                      lambda doc, what: _tensor(doc, files, what),
                                      tiled=not any(key in r.chunks for r in refs.values()))
            elif "sharded" in c:
                raise ValueError(f"components.{key} is {pattern}, which has no 'sharded' entry")
            components[key] = ComponentEntry(
                pattern, bool(c.get("required", True)),
                str(c.get("validation_level", "none")), meta if isinstance(meta, dict) else None,
                shards, entry)
        _check_refs(refs, components)
        step = _int(doc.get("step"), "step")
        if expected_step is not None and step != expected_step:
            raise ValueError(f"it records step {step} but sits in the folder of step {expected_step}")
        return Manifest(
            step=step, created=_get(doc, "created", str, "manifest"),
            topology=_dict(doc, "topology"), metrics=_dict(doc, "metrics"), files=files,
            components=components, nbytes=_int(doc.get("nbytes"), "nbytes"),
            stored_nbytes=_int(doc.get("stored_nbytes"), "stored_nbytes"),
            timings=_dict(doc, "timings"), versions=_dict(doc, "versions"),
            format_version=version, retention=_dict(doc, "retention"), fragments=refs)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"malformed manifest {where}: {exc}") from None
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError, OverflowError) as exc:
        raise CorruptCheckpointError(f"malformed manifest {where}: {exc}") from None


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise ValueError(f"{what} must be a list of integers")
    return tuple(_int(x, what) for x in v)


def _refs(doc: dict, version: int) -> dict[str, FragmentRef]:
    """format_version 3: the root's list of fragments (format/fragments.py)."""
    if "fragments" not in doc:
        return {}
    if version < FRAGMENT_VERSION:
        raise ValueError(f"format_version {version} has no fragments")
    refs = {}
    for name, r in _get(doc, "fragments", dict, "manifest").items():
        what = f"fragments.{name}"
        if not FRAGMENT_RE.match(name):
            raise ValueError(f"fragment name {name!r} is not fragment-n<node>-<8 hex digits>.json")
        if not _HASH_RE.match(_get(r, "hash", str, what)):
            raise ValueError(f"{what} has a malformed hash")
        copies = {}
        for key, named in _get(r, "copies", dict, what).items():
            if not isinstance(named, dict):
                raise ValueError(f"{what}.copies.{key} must map copy names to members")
            copies[key] = {str(c): _ints(m, f"{what}.copies.{key}.{c}") for c, m in named.items()}
        chunks = r.get("chunks", [])
        if not isinstance(chunks, list) or not all(isinstance(k, str) for k in chunks):
            raise ValueError(f"{what}.chunks must be a list of component keys")
        node = _int(r.get("node"), f"{what}.node")
        if name != f"fragment-n{node:05d}-{name[-13:-5]}.json":
            raise ValueError(f"{what} is named for another node than its node {node}")
        refs[name] = FragmentRef(_int(r.get("size"), f"{what}.size"), r["hash"], node,
                                 _ints(_get(r, "ranks", list, what), f"{what}.ranks"), copies,
                                 tuple(chunks))
    return refs


def _check_refs(refs: dict[str, FragmentRef], components: dict[str, ComponentEntry]) -> None:
    """Each copy a fragment holds belongs to a component stored in fragments and is held by no
    other fragment (nor by the root); chunks only of chunked components; one fragment per node."""
    held: dict[tuple[str, str], str] = {}
    nodes: dict[int, str] = {}
    for name, ref in sorted(refs.items()):
        if ref.node in nodes:
            raise ValueError(f"fragments {nodes[ref.node]} and {name} both claim node {ref.node}")
        nodes[ref.node] = name
        for key, named in ref.copies.items():
            entry = components.get(key)
            if entry is None or entry.sharing_pattern not in IN_FRAGMENTS or entry.sharded is not None:
                raise ValueError(f"fragments.{name} holds copies of {key!r}, which is not a "
                                 "PER_RANK or PER_NODE component of this checkpoint")
            for copy in named:
                where = held.get((key, copy), "the root" if copy in entry.shards else "")
                if where:
                    raise ValueError(f"copy {copy!r} of component {key!r} is listed by both "
                                     f"{where} and {name}")
                held[(key, copy)] = name
        for key in ref.chunks:
            if key not in components or components[key].sharded is None:
                raise ValueError(f"fragments.{name} holds chunks of {key!r}, which is not a "
                                 "component stored in chunks")
