"""Every message that crosses ranks, as a frozen dataclass, and their one JSON encoding.

Messages travel through the Store (`dist.link.StoreLink`) under ``<namespace>/<seq>/<key>``; the
key names below are the only ones a save or a load uses. Adding a field to a message is adding a
field here (with a default, so that a peer of the same release always fills it): nothing is
unpacked by position anywhere.

========================  =====================  ==============================================
key                       message                posted by -> read by
========================  =====================  ==============================================
``job/<rank>``            `JobDescriptor`        a rank that is not its node's writer -> that
                                                 node's writer (where its staged buffer is)
``begun/<node>``          `Begun`                node writer of node > 0 -> coordinator
``node/<node>``           `NodeReport`           node writer of node > 0 -> coordinator
``vh/<rank>``             `Announcement`         every rank's worker -> coordinator (REPLICATED
                                                 layouts as `layout_hash`es)
``errors``                `RankError` lines      every rank whose save() or worker failed
                                                 (``Store.append``) -> all
``nev``                   a counter              bumped after each ``errors`` line, failed
                                                 ``outcome`` and ``fullreq``: the one thing a
                                                 waiter reads (with the heartbeats) per wake
``fullreq``               `FullRequest`          coordinator -> ranks holding odd replicas
``full/<rank>``           `FullAnswer`           those ranks -> coordinator
``outcome``               `Outcome`              coordinator -> the node writers' processes'
                                                 workers (the node's other ranks read it
                                                 from their node's board, `dist.relay`,
                                                 or, without one, from here)
``shared/<node>`` (load)  `SharedCopies`         node writer -> the node's other ranks
``step`` (load)           `LoadStep`             rank 0 -> every rank (load() of the newest)
``verdict/<rank>`` (load) `LoadVerdict`          every rank -> every rank, before any
                                                 load_state_dict
========================  =====================  ==============================================

Outside the save and load sequence numbers: ``board/<node>`` (`BoardName`: local rank 0 -> its
node's other ranks, once per checkpointer), ``hb/<rank>`` ("<beats>:<saves called>", the
heartbeat, `dist.liveness`), ``close/departed/<rank>`` (a counter, close()) and
``delete/deleted/<step>/<n>`` (created by rank 0 once the n-th delete(step) is done).

Who deletes what (no rank deletes W keys per save): every rank deletes its own keys of save N
(``vh``, ``job``, ``full``, a node writer also ``begun``/``node``) once it has read N's
``outcome``: the coordinator had read all of them before publishing it. The coordinator deletes
N's ``outcome``, ``nev``, ``errors`` and ``fullreq`` once every rank has announced N + 1: a rank
worker handles saves in order, so it has read N's outcome by then. Keys carry the sequence number,
so saves in flight together (``max_pending`` > 1: the training thread posts ``job/<rank>`` of
N + 1 while N is written) never share a key, and a Store wait (which waits for a key to exist)
can never be woken by an earlier save's key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar, Union

M = TypeVar("M")


# -- save: hand-over from a rank to its node writer ------------------------------------------------
@dataclass(frozen=True)
class ChunkInfo:
    """SHARDED: which box of which global tensor a record is (save.chunking.ChunkMeta)."""
    path: tuple[Any, ...]
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    layout: str = ""


@dataclass(frozen=True)
class Slot:
    """One staged tensor a node writer must write: where it sits in the rank's staging buffer."""
    index: int            # position in the component's tensor list
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int           # in the rank's staging buffer
    chunk: ChunkInfo | None = None


@dataclass(frozen=True)
class ShardDescriptor:
    """One copy (shard) of a component as one rank resolved it at this save."""
    component: str
    pattern: str
    shard: str            # the copy's name (sharing.copy_name)
    num_tensors: int      # in the whole copy (REPLICATED: over all ranks)
    tree_source: bool     # this rank's skeleton goes into the manifest
    tree: Any             # the skeleton (only when tree_source)
    required: bool
    validation: str
    metadata: dict | None
    members: tuple[int, ...]   # PER_GROUP: the group's ranks
    slots: tuple[Slot, ...] = ()
    chunked: bool = False      # records are chunks of global tensors (SHARDED, split REPLICATED)


@dataclass(frozen=True)
class JobDescriptor:
    """A rank's staged save, as its node writer needs it (``shm``: the shared-memory buffer)."""
    rank: int
    step: int
    shm: str | None
    capacity: int
    shards: tuple[ShardDescriptor, ...]


@dataclass(frozen=True)
class Begun:
    """A node writer has started this save (the coordinator's hand-over deadline ends)."""
    node: int


# -- save: what a node wrote ----------------------------------------------------------------------
@dataclass(frozen=True)
class WrittenTensor:
    """One record as written: where it is and how to check it."""
    index: int
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    length: int           # stored bytes
    nbytes: int           # raw bytes
    hash: str
    frames: tuple[int, ...]
    codec: str
    chunk: ChunkInfo | None = None


@dataclass(frozen=True)
class WrittenShard:
    """The records one rank's copy of a component got in its node's data file."""
    rank: int
    shard: ShardDescriptor       # without slots
    tensors: tuple[WrittenTensor, ...]


@dataclass(frozen=True)
class WrittenFile:
    name: str
    size: int
    hash: str
    segments: tuple[tuple[int, int, str], ...] = ()   # a node object: (offset, length, hash) per rank


@dataclass(frozen=True)
class FragmentInfo:
    """A multi-node save: the manifest fragment a node writer wrote (format/fragments.py), as the
    root will list it."""
    name: str
    size: int
    hash: str
    ranks: tuple[int, ...]
    copies: dict[str, dict[str, tuple[int, ...]]]    # component -> copy -> members
    chunks: tuple[str, ...]                          # chunked components with chunks in it
    nbytes: int                                      # raw bytes of its records
    described: tuple[ShardDescriptor, ...] = ()      # each component of `copies` (no slots, tree)


@dataclass(frozen=True)
class PathTotal:
    """A node's chunks of one global tensor, summed: what the coordinator checks their tiling by
    (the chunks themselves stay in the node's fragment)."""
    path: tuple[Any, ...]
    dtype: str
    global_shape: tuple[int, ...]
    layout: str
    volume: int             # elements in the node's (distinct) chunks of it


@dataclass(frozen=True)
class ChunkedPart:
    """A node's share of a chunked component (SHARDED, split REPLICATED) in a multi-node save:
    its ranks' distinct skeletons (rank, skeleton) and per-tensor totals."""
    shard: ShardDescriptor       # without slots or tree
    trees: tuple[tuple[int, Any], ...]
    totals: tuple[PathTotal, ...]
    writers: tuple[int, ...]


@dataclass(frozen=True)
class NodeReport:
    """A node writer's result for one save: its files and records, or why it failed. A multi-node
    save reports here only the records the root manifest keeps (`shards`: GLOBAL, REPLICATED,
    PER_GROUP); the rest are in the node's `fragment`, summarised by `chunked`."""
    node: int
    rank: int
    files: tuple[WrittenFile, ...] = ()
    shards: tuple[WrittenShard, ...] = ()
    write_s: float = 0.0
    causes: dict[int, str] = field(default_factory=dict)   # non-empty: the node failed
    fragment: FragmentInfo | None = None
    chunked: tuple[ChunkedPart, ...] = ()

    @property
    def failed(self) -> bool:
        return bool(self.causes)


# -- save: every rank's view, and the verdict -----------------------------------------------------
@dataclass(frozen=True)
class Announcement:
    """What one rank resolved at this save, for the coordinator to check that ranks agree, and
    the digests of its REPLICATED replicas (see save.replicas)."""
    patterns: dict[str, tuple[str, str]]              # component -> (pattern, validation level)
    replicated_shapes: dict[str, tuple[tuple[str, tuple[int, ...]], ...]]   # -> ((dtype, shape), ...)
    digests: dict[str, dict[str, Any]]
    groups: dict[str, tuple[int, ...]]                # PER_GROUP component -> its ranks
    # REPLICATED component -> `layout_hash` of its layout: ranks send these instead of
    # `replicated_shapes` (30 KB per rank at 1,000 tensors); the coordinator has rank 0's
    # layouts in process and checks every rank's hash against them.
    layout_hashes: dict[str, str] = field(default_factory=dict)


def layout_hash(shapes: Any) -> str:
    """A short hash of one component's REPLICATED layout ((dtype, shape), ...), the same on every
    rank for the same layout."""
    text = json.dumps([[str(d), list(s)] for d, s in shapes], separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class RankError:
    """A rank failed while saving; every waiter stops at once."""
    rank: int
    message: str


@dataclass(frozen=True)
class FullItem:
    """FULL validation: compare replicas of one tensor with the written record. ``pairs``:
    (rank that compares, rank whose result it is)."""
    component: str
    tensor: int
    pairs: tuple[tuple[int, int], ...]
    record: WrittenTensor


@dataclass(frozen=True)
class FullRequest:
    items: tuple[FullItem, ...]


@dataclass(frozen=True)
class FullResult:
    component: str
    tensor: int
    report_as: int
    max_abs_diff: float | None
    differing: int


@dataclass(frozen=True)
class FullAnswer:
    results: tuple[FullResult, ...]


@dataclass(frozen=True)
class CommittedInfo:
    """The committed checkpoint, as every rank's CheckpointInfo reports it."""
    url: str
    nbytes: int
    stored_nbytes: int
    created: str
    timings: dict[str, Any]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """The coordinator's verdict on one save; every rank's handle resolves with it."""
    ok: bool
    message: str = ""
    causes: dict[int, str] = field(default_factory=dict)
    replication: bool = False
    info: CommittedInfo | None = None


@dataclass(frozen=True)
class BoardName:
    """Where a node's outcome board is (`dist.relay`): a shared-memory file of local rank 0's."""
    name: str


# -- load -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SharedTensor:
    offset: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class SharedCopy:
    component: str
    shard: str
    tensors: tuple[SharedTensor, ...]


@dataclass(frozen=True)
class SharedCopies:
    """GLOBAL/REPLICATED copies read once on a node: a shared-memory buffer, or an error."""
    shm: str = ""
    capacity: int = 0
    copies: tuple[SharedCopy, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class LoadStep:
    """The step every rank loads when load() is asked for the newest (-1: none committed)."""
    step: int


@dataclass(frozen=True)
class LoadVerdict:
    """One rank's verdict on a load, after reading and checking and before any load_state_dict:
    every rank restores, or none does."""
    rank: int
    ok: bool
    error_type: str = ""
    message: str = ""


# -- the encoding ---------------------------------------------------------------------------------
def encode(message: Any) -> str:
    """Compact JSON of a message dataclass (tuples become lists, int keys become strings)."""
    if not dataclasses.is_dataclass(message) or isinstance(message, type):
        raise TypeError(f"not a message: {type(message).__name__}")
    return json.dumps(dataclasses.asdict(message), separators=(",", ":"))


def decode(kind: type[M], text: str | bytes) -> M:
    """The `kind` message encoded in `text`; ValueError if it does not have that shape."""
    try:
        return _decoder(kind)(json.loads(text))
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"malformed {kind.__name__} message: {exc}") from None


_DECODERS: dict[Any, Callable[[Any], Any]] = {}


def _identity(value: Any) -> Any:
    return value


def _decoder(tp: Any) -> Callable[[Any], Any]:
    """A function building a value of type `tp` from its JSON form, made once per type (the
    coordinator decodes thousands of messages per save: no type introspection per value)."""
    found = _DECODERS.get(tp)
    if found is None:
        found = _DECODERS[tp] = _make_decoder(tp)
    return found


def _make_decoder(tp: Any) -> Callable[[Any], Any]:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = typing.get_type_hints(tp)
        fields = [(f.name, _decoder(hints[f.name])) for f in dataclasses.fields(tp)]
        cls = tp

        def build(value: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"{cls.__name__} must be an object, got {type(value).__name__}")
            return cls(**{name: dec(value[name]) for name, dec in fields if name in value})
        return build
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            return _identity
        inner = _decoder(options[0])
        return lambda value: None if value is None else inner(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _decoder(args[0])
            if item is _identity:
                return tuple
            return lambda value: tuple(item(v) for v in value)
        items = [_decoder(a) for a in args]
        return lambda value: tuple(dec(v) for dec, v in zip(items, value))
    if origin is dict:
        kt, vt = args
        val = _decoder(vt)
        if kt is int:
            return lambda value: {int(k): val(v) for k, v in value.items()}
        return lambda value: {k: val(v) for k, v in value.items()}
    if tp is float:
        return lambda value: float(value) if isinstance(value, int) else value
    return _identity
