"""Coordination between ranks through the process group's Store, from background threads only.

Never a collective on the training process group: a node writer or rank worker talks to the
Store (TCPStore) with its own client connection, and every wait has a deadline whose message says
which ranks or nodes were missing. Keys live under one namespace per checkpointer and save
sequence number (``<ns>/<seq>/...``); what each key holds is a typed message of `dist.messages`
(the table of keys is there). ``err/<rank>`` keys are counted in ``nerr`` for cheap polling.

A world of one uses the same link over an in-process ``HashStore`` (`StoreLink.in_process`):
the save path is the same code at every world size, its waits simply have no peers.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from ..errors import CheckpointError
from .messages import Outcome, RankError, decode, encode

M = TypeVar("M")
T = TypeVar("T")


def _is_timeout(exc: BaseException) -> bool:
    """A Store call that waited too long (the Store itself is fine)."""
    return "timeout" in type(exc).__name__.lower() or "Timeout" in str(exc)


class LinkTimeout(CheckpointError):
    """Peers did not answer within the deadline; `missing` names them (ranks or nodes)."""

    def __init__(self, message: str, missing: list):
        super().__init__(message)
        self.missing = missing


class StoreLost(CheckpointError):
    """The torch.distributed Store stopped answering (its host process died, or the network to it
    did): no save can be coordinated any more. The message names the host."""


def store_host() -> str:
    """Who hosts the default group's Store, for messages: torchrun's agent on node 0 (workers
    reuse its store) or, without torchrun, rank 0's process; at MASTER_ADDR:MASTER_PORT."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"the torchrun agent of node 0 at {where}"
    return f"rank 0's process at {where}"


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


class StoreLink:
    """Thread-safe access to the Store: each thread gets its own cloned client.

    Every call is bounded: a client is created (``clone()``, a TCP connect) within
    ``liveness_s`` or the link counts the Store as lost; a call that fails because the Store is
    unreachable raises `StoreLost` naming its host, and so does every later call, at once, without
    touching the network again (``lost`` holds the reason). Peers' liveness and progress are read
    through `dist.liveness`.
    """

    def __init__(self, store: Any, ns: str, timeout_s: float, host: str = "the Store's host"):
        self._base, self.ns, self.timeout_s, self.host = store, ns, timeout_s, host
        self._local = threading.local()
        self.lost: str | None = None
        # Set by the checkpointer: whether this rank has moved past save number `seq` (a later
        # save() was called, or it is blocked waiting), see gather's `callers`.
        self.moved_on: Callable[[int], bool] = lambda seq: False

    @classmethod
    def from_default_group(cls, ns: str, timeout_s: float) -> "StoreLink":
        from torch.distributed import distributed_c10d
        return cls(distributed_c10d._get_default_store(), ns, timeout_s, store_host())

    @classmethod
    def in_process(cls, ns: str, timeout_s: float) -> "StoreLink":
        """A link whose Store lives in this process: the world of one."""
        from torch.distributed import HashStore
        return cls(HashStore(), ns, timeout_s)

    def _client(self) -> Any:
        if self.lost is not None:
            raise StoreLost(self.lost)
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._connect()
            client.set_timeout(datetime.timedelta(seconds=max(self.timeout_s, 30)))
            self._local.client = client
        return client

    def _connect(self) -> Any:
        """A new client connection, within liveness_s (TCPStore's own connect retries for as long
        as the store's timeout, up to hours, when its host is gone)."""
        if not hasattr(self._base, "clone"):
            return self._base
        box: dict[str, Any] = {}

        def connect() -> None:
            try:
                box["client"] = self._base.clone()
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
        try:
            return decode(kind, raw)
        except ValueError as exc:
            raise CheckpointError(f"unreadable {name!r} message in the Store: {exc}") from None

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

    def post_error(self, seq: int, rank: int, message: str) -> None:
        self.post(seq, f"err/{rank}", RankError(rank, message))
        self.increment(seq, "nerr")

    def errors(self, seq: int, ranks: Iterable[int]) -> dict[int, str]:
        if self.increment(seq, "nerr", 0) == 0:
            return {}
        return {r: self.get(seq, f"err/{r}", RankError).message
                for r in ranks if self.has(seq, f"err/{r}")}

    def failed_outcome(self, seq: int) -> "RemoteFailure | None":
        """The coordinator's published failure of this save, if it published one."""
        if not self.has(seq, "outcome"):
            return None
        outcome = self.get(seq, "outcome", Outcome)
        if outcome.ok:
            return None
        return RemoteFailure(dict(outcome.causes) or {-1: outcome.message or "save failed"})

    # -- liveness -----------------------------------------------------------------------------
    def beat(self, rank: int) -> None:
        self._call(lambda c: c.add(f"{self.ns}/hb/{rank}", 1))

    def heartbeat_of(self, rank: int) -> int:
        return self._call(lambda c: c.add(f"{self.ns}/hb/{rank}", 0))

    def publish_progress(self, rank: int, seq: int) -> None:
        """How many saves this rank has called (its latest save number)."""
        self._call(lambda c: c.set(f"{self.ns}/progress/{rank}", str(seq)))

    def progress_of(self, rank: int) -> int:
        key = f"{self.ns}/progress/{rank}"
        return self._call(lambda c: int(c.get(key)) if c.check([key]) else 0)

    @property
    def liveness_s(self) -> float:
        """How long a rank's heartbeat may stand still before it counts as dead."""
        return min(self.timeout_s, 30.0)

    # -- waiting ------------------------------------------------------------------------------
    def gather(self, seq: int | str, names: dict[Any, str], kind: type[M], what: str, world: range,
               deadline: float | None = None, stop_on_outcome: bool = True,
               alive: dict[Any, int] | None = None, forever: bool = False,
               watch: Callable[[set], None] | None = None) -> dict[Any, M]:
        """Wait until every key in `names` exists and return their `kind` messages.

        Raise RemoteFailure as soon as any rank of `world` reports an error (or a failed outcome
        is published); LinkTimeout naming the missing ones when the deadline (default: timeout_s
        from now; `forever`: none) passes, or when the rank expected to post a key (`alive`:
        ident -> rank) stops beating for liveness_s: it died. A legitimately long wait (a node
        writing a huge state) is therefore bounded by liveness, not by a guess of its duration.
        `watch`, called with the idents found so far on every round, may raise too (e.g.
        `liveness.CallerWatch`: a live peer that never called this save).
        """
        start = time.monotonic()
        deadline = start + self.timeout_s if deadline is None else deadline
        found: dict[Any, M] = {}
        beats: dict[int, tuple[int, float]] = {}
        pause = 0.002
        while True:
            for ident, name in names.items():
                if ident not in found and self.has(seq, name):
                    found[ident] = self.get(seq, name, kind)
            if len(found) == len(names):
                return found
            errors = self.errors(seq, world) if isinstance(seq, int) else {}
            if errors:
                raise RemoteFailure(errors)
            if stop_on_outcome and isinstance(seq, int) and (failed := self.failed_outcome(seq)):
                raise failed
            now = time.monotonic()
            if watch is not None:
                watch(set(found))
            for ident, rank in (alive or {}).items():
                if ident in found:
                    continue
                count = self.heartbeat_of(rank)
                if rank not in beats or beats[rank][0] != count:
                    beats[rank] = (count, now)
                elif now - beats[rank][1] > self.liveness_s:
                    raise LinkTimeout(f"rank {rank} stopped answering (no heartbeat for "
                                      f"{self.liveness_s:g} s) while {what} {ident} was awaited: "
                                      "it died or hangs", [ident])
            if not forever and now > deadline:
                missing = sorted(i for i in names if i not in found)
                raise LinkTimeout(
                    f"{what} {', '.join(map(str, missing))} did not answer within "
                    f"{self.timeout_s:g} s (crashed, hung, or far behind?); raise the "
                    "checkpointer's timeout_s if ranks legitimately reach save() that far apart",
                    missing)
            time.sleep(pause)
            pause = min(pause * 1.5, 0.01)
