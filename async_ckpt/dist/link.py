"""Coordination between ranks through the process group's Store, from background threads only.

Never a collective on the training process group: a node writer or rank worker talks to the
Store (TCPStore) with its own client connection, and every wait has a deadline whose message says
which ranks or nodes were missing. Keys live under one namespace per checkpointer and save
sequence number (``<ns>/<seq>/...``); what each key holds is a typed message of `dist.messages`
(the table of keys is there).

Nothing polls. A wait blocks in the Store (``Store.wait``) on a background thread with a
connection of its own, while the waiting thread wakes every ``wake_s`` (at most 1 s) to check
what only the waiter can judge: deadlines, peers' liveness (one ``multi_get`` of their heartbeat
keys) and failures. A failure is one counter per save, ``nev`` (``Store.add``), and one list,
``errors`` (``Store.append``): a waiter reads the counter with the heartbeats in the same request
and the list once, instead of one key per rank. A waiting rank therefore makes about one request
per second (plus its heartbeat's two), whatever the world size.

Client connections are made once per process and Store, ahead of the first save, and shared
(`dist.waits`, which also runs the blocking waits): a TCPStore connect stalls for 5 s in about
one in 25 (torch 2.13, loopback).

A world of one uses the same link over an in-process ``HashStore`` (`StoreLink.in_process`):
the save path is the same code at every world size, its waits simply have no peers.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from ..errors import CheckpointError
from .messages import Outcome, RankError, decode, encode
from .waits import StoreLost, Waits, _clients_of, _is_timeout, exiting, in_store, store_host

__all__ = ["LinkTimeout", "RemoteFailure", "StoreLink", "StoreLost", "Waits", "causes_of", "namespace"]

log = logging.getLogger("async_ckpt")
M = TypeVar("M")
T = TypeVar("T")


class LinkTimeout(CheckpointError):
    """Peers did not answer within the deadline; `missing` names them (ranks or nodes)."""

    def __init__(self, message: str, missing: list):
        super().__init__(message)
        self.missing = missing


class RemoteFailure(CheckpointError):
    """Another rank reported an error for this save."""

    def __init__(self, causes: dict[int, str]):
        super().__init__("; ".join(f"rank {r}: {m}" for r, m in sorted(causes.items())))
        self.causes = causes


def causes_of(exc: BaseException, rank: int, what_missing: str) -> dict[int, str]:
    """Per-rank causes of a failure seen on `rank`: a peer's own report, the peers that did not
    answer (`what_missing` says what they failed to do), or this rank's exception."""
    if isinstance(exc, RemoteFailure):
        return dict(exc.causes)
    if isinstance(exc, LinkTimeout) and exc.missing:
        return {int(r): f"{what_missing} ({exc})" for r in exc.missing}
    return {rank: f"{type(exc).__name__}: {exc}"}


_instances: dict[str, int] = {}
_instances_lock = threading.Lock()


def namespace(root_url: str) -> str:
    """Same on every rank as long as ranks create their checkpointers in the same order."""
    digest = hashlib.sha1(root_url.encode()).hexdigest()[:12]
    with _instances_lock:
        _instances[digest] = _instances.get(digest, 0) + 1
        return f"async_ckpt/{digest}/{_instances[digest]}"


GET_BATCH = 16             # keys per multi_get
WAIT_HORIZON_S = 300.0    # a background Store wait is re-armed after this (c10d logs a warning then)


class StoreLink:
    """Thread-safe access to the Store, over this process's shared connections (`_Clients`).

    Every call is bounded: a client is created (``clone()``, a TCP connect) within
    ``liveness_s`` or the link counts the Store as lost; a call that fails because the Store is
    unreachable raises `StoreLost` naming its host, and so does every later call, at once, without
    touching the network again (``lost`` holds the reason). Peers' liveness and progress are one
    key per rank, ``hb/<rank>`` = "<beats>:<saves called>", written by `dist.liveness.Heartbeat`.
    """

    def __init__(self, store: Any, ns: str, timeout_s: float, host: str = "the Store's host"):
        self._base, self.ns, self.timeout_s, self.host = store, ns, timeout_s, host
        self._pool = _clients_of(store)
        self.lost: str | None = None
        self._beats: dict[int, int] = {}
        self._progress: dict[int, int] = {}
        self._existing: set[str] = set()      # heartbeat keys known to exist (never deleted)
        self._outcomes: dict[int, Waits] = {}  # one blocking wait per save for its outcome
        self._outcomes_lock = threading.Lock()
        # Set by the checkpointer: whether this rank has moved past save number `seq` (a later
        # save() was called, or it is blocked waiting), see gather's `watch`.
        self.moved_on: Callable[[int], bool] = lambda seq: False

    @classmethod
    def from_default_group(cls, ns: str, timeout_s: float) -> "StoreLink":
        from torch.distributed import distributed_c10d
        link = cls(distributed_c10d._get_default_store(), ns, timeout_s, store_host())
        link.prepare(waiters=2)
        return link

    @classmethod
    def in_process(cls, ns: str, timeout_s: float) -> "StoreLink":
        """A link whose Store lives in this process: the world of one."""
        from torch.distributed import HashStore
        return cls(HashStore(), ns, timeout_s)

    # -- connections ----------------------------------------------------------------------------
    @property
    def liveness_s(self) -> float:
        """How long a rank's heartbeat may stand still before it counts as dead."""
        return min(self.timeout_s, 30.0)

    @property
    def wake_s(self) -> float:
        """How often a waiting thread wakes to check deadlines, liveness and failures."""
        return max(0.02, min(1.0, self.liveness_s / 4))

    def prepare(self, waiters: int) -> None:
        """Connect the shared client and `waiters` waiting ones in the background now, so that a
        slow connect never lands on a save (the first save takes them when they are ready)."""
        if not hasattr(self._base, "clone"):
            return

        def connect() -> None:
            try:
                self._client()
                with self._pool.lock:
                    missing = waiters - len(self._pool.idle)
                for _ in range(max(0, missing)):
                    if exiting():
                        return
                    self._release_waiter(self._connect())
            except Exception as exc:  # noqa: BLE001 - the first real call reports it
                log.debug("connecting to the Store ahead of time failed: %s", exc)
        threading.Thread(target=connect, name="ckpt-store-connect-ahead", daemon=True).start()

    def _client(self) -> Any:
        if self.lost is not None:
            raise StoreLost(self.lost)
        pool = self._pool
        client = pool.shared
        if client is None:
            with pool.connect_lock:
                if pool.shared is None:
                    pool.shared = self._connect()
                client = pool.shared
        return client

    def _waiter(self) -> Any:
        """A connection for one blocking wait (an idle one, or a new one)."""
        if self.lost is not None:
            raise StoreLost(self.lost)
        with self._pool.lock:
            if self._pool.idle:
                return self._pool.idle.pop()
        return self._connect()

    def _release_waiter(self, client: Any) -> None:
        with self._pool.lock:
            if client is not self._base and len(self._pool.idle) < 8:
                self._pool.idle.append(client)

    def _connect(self) -> Any:
        """A new client connection, within liveness_s (TCPStore's own connect retries for as long
        as the store's timeout, up to hours, when its host is gone)."""
        if not hasattr(self._base, "clone"):
            return self._base
        box: dict[str, Any] = {}

        def connect() -> None:
            try:
                with in_store(self):
                    client = self._base.clone()
                    client.set_timeout(datetime.timedelta(seconds=max(self.timeout_s, 30)))
                box["client"] = client
            except Exception as exc:  # noqa: BLE001 - reported below
                box["error"] = exc
        thread = threading.Thread(target=connect, name="ckpt-store-connect", daemon=True)
        thread.start()
        thread.join(self.liveness_s)
        if "client" in box:
            return box["client"]
        reason = (f"could not connect to the torch.distributed Store ({self.host}) within "
                  f"{self.liveness_s:g} s" + (f": {box['error']}" if "error" in box else ""))
        self.lose(reason + "; its host process has probably died")
        raise StoreLost(self.lost or reason)

    def lose(self, reason: str) -> None:
        """Count the Store as gone for good: every later call raises StoreLost at once."""
        if self.lost is None:
            self.lost = reason

    def _call(self, fn: Callable[[Any], T]) -> T:
        """One Store call; a failure to reach the Store becomes StoreLost (and sticks)."""
        client = self._client()
        try:
            with in_store(self):
                return fn(client)
        except (RuntimeError, OSError) as exc:   # torch's DistNetworkError/DistStoreError
            if self.lost is None and not _is_timeout(exc):
                self.lose(f"lost the torch.distributed Store ({self.host}): {exc}; its host "
                          "process has probably died")
            raise StoreLost(self.lost or f"the torch.distributed Store ({self.host}) timed out: {exc}") from exc

    def _key(self, seq: int | str, name: str) -> str:
        return f"{self.ns}/{seq}/{name}"

    # -- primitives ---------------------------------------------------------------------------
    def post(self, seq: int | str, name: str, message: Any) -> None:
        """Publish a `dist.messages` message under ``<seq>/<name>``."""
        text = encode(message)
        self._call(lambda c: c.set(self._key(seq, name), text))

    def has(self, seq: int | str, name: str) -> bool:
        return self._call(lambda c: c.check([self._key(seq, name)]))

    def get(self, seq: int | str, name: str, kind: type[M]) -> M:
        """The `kind` message under ``<seq>/<name>`` (it must exist)."""
        raw = self._call(lambda c: c.get(self._key(seq, name)))
        return self._decode(name, kind, raw)

    @staticmethod
    def _decode(name: str, kind: type[M], raw: Any) -> M:
        try:
            return decode(kind, raw)
        except ValueError as exc:
            raise CheckpointError(f"unreadable {name!r} message in the Store: {exc}") from None

    def get_many(self, seq: int | str, names: dict[Any, str], kind: type[M]) -> dict[Any, M]:
        """Several messages (all must exist), `GET_BATCH` per request (TCPStore's multi_get
        slows down per byte on large answers: measured with torch 2.13, 4,096 keys of 2 KB in
        batches of 16 took 0.06 s against 0.33 s in one request and 0.28 s one by one)."""
        if not names:
            return {}
        keys = [self._key(seq, n) for n in names.values()]
        raws: list = []
        for i in range(0, len(keys), GET_BATCH):
            batch = keys[i:i + GET_BATCH]
            raws += self._call(lambda c, batch=batch: c.multi_get(batch))  # type: ignore[misc]
        return {ident: self._decode(name, kind, raw)
                for (ident, name), raw in zip(names.items(), raws, strict=True)}

    def increment(self, seq: int | str, name: str, by: int = 1) -> int:
        """Add `by` to the counter ``<seq>/<name>`` and return its new value (0 reads it)."""
        return self._call(lambda c: c.add(self._key(seq, name), by))

    def delete(self, seq: int | str, names: Iterable[str]) -> None:
        def delete_all(client: Any) -> None:
            for name in names:
                try:
                    client.delete_key(self._key(seq, name))
                except NotImplementedError:
                    pass
        self._call(delete_all)

    def retire(self, seq: int | str, names: Iterable[str]) -> None:
        """Delete keys nobody reads any more; never raises (a lost Store has nothing to free)."""
        try:
            self.delete(seq, names)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.debug("could not delete keys of save %s: %s", seq, exc)

    def waits(self, seq: int | str, groups: list[list[str]], horizon_s: float = WAIT_HORIZON_S) -> Waits:
        """Start blocking waits (see `Waits`) for the keys ``<seq>/<name>`` of each group."""
        if self.lost is not None:
            raise StoreLost(self.lost)
        return Waits(self, [[self._key(seq, n) for n in group] for group in groups], horizon_s)

    def outcome_wait(self, seq: int) -> Waits:
        """The blocking wait for save `seq`'s ``outcome``, shared by every thread of this process
        that waits on that save (the rank worker, the node writer's and coordinator's gathers):
        one connection per save, not one per waiter."""
        with self._outcomes_lock:
            waits = self._outcomes.get(seq)
            if waits is None:
                waits = self._outcomes[seq] = self.waits(seq, [["outcome"]])
            return waits

    def end_save(self, seq: int) -> None:
        """This process is done with save `seq` (its rank worker resolved it): stop its wait for
        the outcome if the outcome never came, and those of earlier saves."""
        with self._outcomes_lock:
            ended = [s for s in self._outcomes if s <= seq]
            for s in ended:
                self._outcomes.pop(s).abandon()

    # -- failures: one counter and one list per save --------------------------------------------
    def post_error(self, seq: int, rank: int, message: str) -> None:
        """Tell every waiter of save `seq` that `rank` failed: appended to ``errors``, then
        ``nev`` (the save's event counter) bumped."""
        line = encode(RankError(rank, message)) + "\n"
        self._call(lambda c: c.append(self._key(seq, "errors"), line))
        self.bump(seq)

    def bump(self, seq: int | str) -> int:
        """Count an event of save `seq` (a failure, a FULL request) for its waiters."""
        return self.increment(seq, "nev")

    def events(self, seq: int | str) -> int:
        return self.increment(seq, "nev", 0)

    def errors(self, seq: int, ranks: Iterable[int] = ()) -> dict[int, str]:
        """Every rank's first reported error of save `seq` (one request when there is none)."""
        if self.events(seq) == 0 or not self.has(seq, "errors"):
            return {}
        raw = self._call(lambda c: c.get(self._key(seq, "errors")))
        found: dict[int, str] = {}
        for line in (raw.decode() if isinstance(raw, bytes) else str(raw)).splitlines():
            if line.strip():
                error = self._decode("errors", RankError, line)
                found.setdefault(error.rank, error.message)
        return found

    def failed_outcome(self, seq: int) -> "RemoteFailure | None":
        """The coordinator's published failure of this save, if it published one."""
        if not self.has(seq, "outcome"):
            return None
        outcome = self.get(seq, "outcome", Outcome)
        if outcome.ok:
            return None
        return RemoteFailure(dict(outcome.causes) or {-1: outcome.message or "save failed"})

    # -- liveness -----------------------------------------------------------------------------
    def _hb(self, rank: int) -> str:
        return f"{self.ns}/hb/{rank}"

    def beat(self, rank: int, progress: int | None = None) -> None:
        """One heartbeat of `rank` (and how many saves it has called): one request."""
        count = self._beats[rank] = self._beats.get(rank, 0) + 1
        if progress is not None:
            self._progress[rank] = progress
        value = f"{count}:{self._progress.get(rank, 0)}"
        self._call(lambda c: c.set(self._hb(rank), value))

    def publish_progress(self, rank: int, seq: int) -> None:
        """How many saves this rank has called (its latest save number)."""
        self._progress[rank] = seq
        value = f"{self._beats.get(rank, 0)}:{seq}"
        self._call(lambda c: c.set(self._hb(rank), value))

    def peer_states(self, ranks: Iterable[int], counter: tuple[int | str, str] | None = None
                    ) -> tuple[dict[int, tuple[int, int]], int]:
        """(rank -> (beats, saves called), the value of `counter`) in one request: ranks that
        never beat read (0, 0). `counter` (seq, name), if given, must exist (create it with
        ``increment(seq, name, 0)``)."""
        ranks = list(ranks)
        keys = [self._hb(r) for r in ranks]
        unknown = [k for k in keys if k not in self._existing]
        if unknown:
            if self._call(lambda c: c.check(unknown)):
                self._existing.update(unknown)
            else:
                for key in unknown:
                    if self._exists(key):
                        self._existing.add(key)
        present = [k for k in keys if k in self._existing]
        extra = [self._key(*counter)] if counter is not None else []
        raws = self._call(lambda c: c.multi_get(present + extra)) if present or extra else []
        values = dict(zip(present, raws[:len(present)]))
        states = {r: _parse_beat(values.get(k)) for r, k in zip(ranks, keys)}
        return states, (int(raws[-1]) if extra else 0)

    def _exists(self, key: str) -> bool:
        return self._call(lambda c: c.check([key]))

    def heartbeat_of(self, rank: int) -> int:
        return self.peer_states([rank])[0][rank][0]

    def progress_of(self, rank: int) -> int:
        return self.peer_states([rank])[0][rank][1]

    # -- waiting ------------------------------------------------------------------------------
    def gather(self, seq: int | str, names: dict[Any, str], kind: type[M], what: str, world: range,
               deadline: float | None = None, stop_on_outcome: bool = True,
               alive: dict[Any, int] | None = None, forever: bool = False,
               watch: Callable[[set], None] | None = None) -> dict[Any, M]:
        """Wait until every key in `names` exists and return their `kind` messages.

        One blocking Store wait for all the keys (and, for a save with `stop_on_outcome`, one
        for its outcome), then one ``multi_get``. Meanwhile, every ``wake_s``: raise
        RemoteFailure as soon as any rank reports an error (or a failed outcome is published);
        LinkTimeout naming the missing ones when the deadline (default: timeout_s from now;
        `forever`: none) passes, or when the rank expected to post a key (`alive`: ident -> rank)
        stops beating for liveness_s: it died. A legitimately long wait (a node writing a huge
        state) is therefore bounded by liveness, not by a guess of its duration. `watch`, called
        with the idents known to be there on every wake, may raise too (e.g.
        `liveness.CallerWatch`: a live peer that never called this save).
        """
        start = time.monotonic()
        deadline = start + self.timeout_s if deadline is None else deadline
        save = isinstance(seq, int)
        if save and self.events(seq):
            self._raise_failure(seq, stop_on_outcome)
        wake = threading.Event()
        waits = self.waits(seq, [list(names.values())],
                           WAIT_HORIZON_S if forever else max(0.05, deadline - start))
        waits.observe(wake)
        outcome = self.outcome_wait(seq) if isinstance(seq, int) and stop_on_outcome else None
        if outcome is not None:
            outcome.observe(wake)
        found: set = set()
        beats: dict[int, tuple[int, float]] = {}
        seen_events = 0
        ranks = sorted(set((alive or {}).values()) | set(getattr(watch, "callers", {}).values()))
        try:
            while True:
                pause = (self.wake_s if forever else
                         min(self.wake_s, max(0.0, deadline - time.monotonic())))
                wake.wait(pause)
                wake.clear()
                if waits.wait(0):
                    return self.get_many(seq, names, kind)
                if outcome is not None and outcome.wait(0):
                    self._raise_failure(seq, True)   # the outcome came first: it can only be a failure
                states, events = (self.peer_states(ranks, (seq, "nev") if save else None)
                                  if ranks else ({}, self.events(seq) if save else 0))
                if events != seen_events:       # a failure, or a FULL request (not ours to judge)
                    seen_events = events
                    self._raise_failure(seq, stop_on_outcome)
                now = time.monotonic()
                if watch is not None:
                    see = getattr(watch, "see", None)
                    if see is not None:
                        see(states)
                    try:
                        watch(set(found))
                    except LinkTimeout as exc:
                        if not self._posted(seq, names, exc.missing, found):
                            raise
                for ident, rank in (alive or {}).items():
                    if ident in found:
                        continue
                    count = states.get(rank, (0, 0))[0]
                    if rank not in beats or beats[rank][0] != count:
                        beats[rank] = (count, now)
                    elif now - beats[rank][1] > self.liveness_s and not self._posted(seq, names, [ident], found):
                        raise LinkTimeout(f"rank {rank} stopped answering (no heartbeat for "
                                          f"{self.liveness_s:g} s) while {what} {ident} was awaited: "
                                          "it died or hangs", [ident])
                if not forever and now >= deadline:
                    missing = sorted(i for i in names if not self._posted(seq, names, [i], found))
                    if not missing:
                        continue
                    raise LinkTimeout(
                        f"{what} {', '.join(map(str, missing))} did not answer within "
                        f"{self.timeout_s:g} s (crashed, hung, or far behind?); raise the "
                        "checkpointer's timeout_s if ranks legitimately reach save() that far apart",
                        missing)
        finally:
            waits.abandon()

    def _posted(self, seq: int | str, names: dict[Any, str], idents: list, found: set) -> bool:
        """Whether every key of `idents` exists (then they count as found)."""
        if all(self.has(seq, names[i]) for i in idents if i in names):
            found.update(idents)
            return True
        return False

    def _raise_failure(self, seq: int | str, stop_on_outcome: bool) -> None:
        if not isinstance(seq, int):
            return
        if stop_on_outcome and (failed := self.failed_outcome(seq)):
            raise failed
        errors = self.errors(seq)
        if errors:
            raise RemoteFailure(errors)


def _parse_beat(raw: Any) -> tuple[int, int]:
    if raw is None:
        return 0, 0
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    beats, _, progress = text.partition(":")
    try:
        return int(beats), int(progress or 0)
    except ValueError:
        return 0, 0
