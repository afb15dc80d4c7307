"""The node's outcome board: the node writer's process tells its node's other ranks how their
saves stand, through shared memory, instead of every rank waiting on the Store.

Without it every rank holds a blocking Store wait for each save's ``outcome`` and makes about
one request a second while it waits (its coordinator's heartbeat and the save's event counter),
so the Store serves W waiters. With it the Store serves one per node: local rank 0's rank worker
(in the node writer's process) waits as before and copies what it learns onto the board; the
node's other ranks read the board, a few bytes of a shared mapping, without a system call.

Call sequence (who calls what):

1. local rank 0, when its checkpointer starts saving (several ranks, several local ranks):
   `BoardWriter.create()`, then posts the board's name as ``board/<node>`` (`BoardName`);
2. local rank 0's rank worker, on every wake of its wait for save N (at most one a second) and
   once it has the verdict: ``publish(N, events, outcome)`` (the save's event counter ``nev``, and
   the coordinator's `Outcome` once known);
3. another local rank's rank worker, waiting for save N: ``read(N)`` every `POLL_S`: the newest
   events and, once published, the outcome. It still checks through the Store what it checked on
   every wake before (the coordinator's heartbeat and progress, the event counter, and whether the
   outcome exists), every `STORE_CHECK_S` instead of every second: a board that stops being
   written (local rank 0's worker hung while its process lives) delays an outcome by that much,
   and can never hold it back or hide a failure;
4. close(): the creator unlinks the board's name (mappings stay valid); readers unmap.

Layout: a 64-byte header (magic, version, slot count, slot size, creator pid), then `SLOTS` slots;
save N uses slot N mod SLOTS. A slot: generation (u64), seq (i64), events (i64), state (u32: 0
nothing yet, 1 outcome inline, 2 outcome too big: read it from the Store), payload length (u32),
xxh3-128 of those fields and the payload (16 bytes), then the payload (the `Outcome` as JSON). One
writer per board; a writer makes the generation odd while it writes and even after, and a reader
takes a slot only when the generation is even and unchanged across its read and the digest
matches (so a torn read, on any memory model, is discarded and read again at the next poll).
The board is created here and mapped by name only from /dev/shm with this package's prefix
(`dist.shm`); anything else, or a board that does not parse, counts as no board (the Store path).
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass

import xxhash

from .messages import Outcome, decode, encode
from .shm import create_shared, is_ours

log = logging.getLogger("async_ckpt")

MAGIC = b"ACKB"
VERSION = 1
SLOTS = 8
SLOT_SIZE = 16 << 10
POLL_S = 0.02            # a reader's board read interval (no system call)
STORE_CHECK_S = 5.0      # a reader's Store check interval while the board speaks for the Store
_HEADER = struct.Struct("<4sIIII")          # magic, version, slots, slot size, creator pid
_HEADER_SIZE = 64
_SLOT = struct.Struct("<QqqII16s")          # generation, seq, events, state, length, digest
NOTHING, INLINE, IN_STORE = 0, 1, 2


@dataclass(frozen=True)
class Seen:
    """What the board says about one save: its event counter and, once known, its outcome
    (``outcome`` None and ``in_store`` True: published, but too big for the board)."""
    events: int
    outcome: Outcome | None = None
    in_store: bool = False


def _digest(seq: int, events: int, state: int, payload: bytes) -> bytes:
    return xxhash.xxh3_128_digest(struct.pack("<qqI", seq, events, state) + payload)


def board_size() -> int:
    return _HEADER_SIZE + SLOTS * SLOT_SIZE


class BoardWriter:
    """The board of this node, created in local rank 0's process; written by its rank worker."""

    def __init__(self, name: str, mapped: mmap.mmap):
        self.name, self._map = name, mapped
        self._gens = [0] * SLOTS

    @classmethod
    def create(cls) -> "BoardWriter":
        name, mapped = create_shared(board_size())
        _HEADER.pack_into(mapped, 0, MAGIC, VERSION, SLOTS, SLOT_SIZE, os.getpid())
        return cls(name, mapped)

    def publish(self, seq: int, events: int, outcome: Outcome | None = None) -> None:
        payload = b"" if outcome is None else encode(outcome).encode()
        state = NOTHING if outcome is None else INLINE
        if len(payload) > SLOT_SIZE - _SLOT.size:
            payload, state = b"", IN_STORE
        index = seq % SLOTS
        at = _HEADER_SIZE + index * SLOT_SIZE
        gen = self._gens[index] + 1                           # odd: being written
        struct.pack_into("<Q", self._map, at, gen)
        self._map[at + _SLOT.size: at + _SLOT.size + len(payload)] = payload
        _SLOT.pack_into(self._map, at, gen, seq, events, state, len(payload),
                        _digest(seq, events, state, payload))
        self._gens[index] = gen + 1                           # even: complete
        struct.pack_into("<Q", self._map, at, gen + 1)

    def close(self) -> None:
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass
        self._map.close()


class BoardReader:
    """Another local rank's view of its node's board (see the module)."""

    def __init__(self, mapped: mmap.mmap):
        self._map = mapped

    @classmethod
    def attach(cls, name: str) -> "BoardReader | None":
        """Map the board `name` (as posted by local rank 0); None if it is not one (the caller
        then uses the Store, as without a board)."""
        if not is_ours(name):
            log.warning("ignoring the outcome board %r: not an async_ckpt shared-memory file", name)
            return None
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError as exc:        # gone (its creator closed), or on another machine
            log.debug("no outcome board at %s: %s", name, exc)
            return None
        try:
            if os.fstat(fd).st_size != board_size():
                return None
            mapped = mmap.mmap(fd, board_size(), prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, version, slots, slot_size, _pid = _HEADER.unpack_from(mapped, 0)
        if (magic, version, slots, slot_size) != (MAGIC, VERSION, SLOTS, SLOT_SIZE):
            mapped.close()
            return None
        return cls(mapped)

    def read(self, seq: int) -> Seen | None:
        """What the board says about save `seq`, or None (nothing yet, or caught mid-write)."""
        at = _HEADER_SIZE + (seq % SLOTS) * SLOT_SIZE
        gen, got_seq, events, state, length, digest = _SLOT.unpack_from(self._map, at)
        if gen % 2 or got_seq != seq or length > SLOT_SIZE - _SLOT.size:
            return None
        payload = self._map[at + _SLOT.size: at + _SLOT.size + length]
        if struct.unpack_from("<Q", self._map, at)[0] != gen or _digest(seq, events, state, payload) != digest:
            return None
        if state == INLINE:
            try:
                return Seen(events, decode(Outcome, payload))
            except ValueError:
                return None
        return Seen(events, None, state == IN_STORE)

    def close(self) -> None:
        self._map.close()
