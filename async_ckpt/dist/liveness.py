"""Telling a slow rank from a dead one, and from one that never called: heartbeats, progress,
the misuse check, and the departure handshake. All through the Store, from background threads.

Call sequence (who calls what):

- every rank, at construction (several ranks only): `Heartbeat(link, rank, progress)` starts a
  daemon thread that, twice a second, sets ``hb/<rank>`` to "<beats>:<saves called>" (one
  request; a waiter reads every peer's liveness and progress with one ``multi_get``). Calls
  that fail are retried with backoff;
  once the Store has been unreachable for ``liveness_s`` the thread marks the link lost
  (`StoreLink.lose`: every later call raises StoreLost naming the Store's host) and stops, so a
  dead Store costs a few log lines, not two a second forever;
- any thread waiting for a peer's message of save ``seq`` passes a `CallerWatch` to
  `StoreLink.gather`: a peer that is alive (its heartbeat goes on) but whose progress stays
  below ``seq`` for ``PEER_LAG_S`` while this rank has moved past that save (it called a later
  save(), or it waits in wait()/close()) has not called save() for that step: `NotCalled`
  names it within seconds instead of after ``timeout_s``;
- every rank, in close(): `depart(link, rank)`; the rank that hosts the Store (rank 0 without
  torchrun; torchrun's agent hosts it otherwise) then `await_departures`, so it never takes the
  Store down while a peer still needs it to read a verdict.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from .link import LinkTimeout, StoreLink
from .waits import exiting

log = logging.getLogger("async_ckpt")
PEER_LAG_S = 5.0          # how long a live peer may trail a save this rank has moved past
BEAT_EVERY_S = 0.5


class NotCalled(LinkTimeout):
    """A live rank has not called save() for a step its peers are saving."""


class Heartbeat:
    """This rank's heartbeat and progress in the Store, from a daemon thread; see the module."""

    def __init__(self, link: StoreLink, rank: int, progress: Callable[[], int]):
        self._link, self._rank, self._progress = link, rank, progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckpt-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        link, failing_since, pause = self._link, None, BEAT_EVERY_S
        while not self._stop.is_set() and link.lost is None and not exiting():
            try:
                link.beat(self._rank, self._progress())
                failing_since, pause = None, BEAT_EVERY_S
            except Exception as exc:  # noqa: BLE001 - a hiccup may pass; a dead Store does not
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= link.liveness_s:
                    link.lose(f"the torch.distributed Store ({link.host}) has not answered for "
                              f"{link.liveness_s:g} s ({exc}); its host process has probably died")
                    log.error("[rank %d] %s", self._rank, link.lost)
                    break
                pause = min(pause * 2, 4.0)
            self._stop.wait(pause)

    def stop(self) -> None:
        self._stop.set()


class CallerWatch:
    """For `StoreLink.gather` (and the rank worker's wait): raises NotCalled for a live peer that
    has not called save number `seq` (for `step`) while this rank has moved past it for
    PEER_LAG_S. `callers`: the gathered ident -> the rank that must post it. The waiter hands it
    the peers' states it read anyway (`see`); without them it reads each caller's progress."""

    def __init__(self, link: StoreLink, seq: int, step: int, callers: dict[Any, int]):
        self.link, self.seq, self.step, self.callers = link, seq, step, callers
        self._since: dict[int, float] = {}
        self._states: dict[int, tuple[int, int]] | None = None

    def see(self, states: dict[int, tuple[int, int]]) -> None:
        """Peers' (beats, saves called) as just read by the waiter."""
        self._states = states

    def _progress(self, rank: int) -> int:
        if self._states is not None and rank in self._states:
            return self._states[rank][1]
        return self.link.progress_of(rank)

    def __call__(self, found: set) -> None:
        link, now = self.link, time.monotonic()
        if not link.moved_on(self.seq):
            self._since.clear()
            return
        for ident, rank in self.callers.items():
            if ident in found or self._progress(rank) >= self.seq:
                self._since.pop(rank, None)
                continue
            since = self._since.setdefault(rank, now)
            if now - since >= PEER_LAG_S:
                raise NotCalled(
                    f"rank {rank} has not called save(step {self.step}); every rank must call "
                    f"save() for the same steps (rank {rank} is alive: its heartbeat goes on, but "
                    f"it has called {self._progress(rank)} save(s), this is save number "
                    f"{self.seq})", [ident])


def hosts_store(rank: int) -> bool:
    """Whether this process hosts the default group's Store: rank 0, unless torchrun's agent
    hosts it (its workers then only connect to it)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() in ("1", "true")
    return rank == 0 and not agent


def depart(link: StoreLink, rank: int) -> None:
    """Tell the peers this rank's checkpointer is closed (never raises)."""
    try:
        link.increment("close", f"departed/{rank}")
    except Exception as exc:  # noqa: BLE001 - a lost Store cannot be told anything
        log.debug("[rank %d] could not announce departure: %s", rank, exc)


def await_departures(link: StoreLink, rank: int, world: int, quiet_s: float = 2.0) -> None:
    """On the Store's host: wait until every other rank has departed or stopped beating for
    `quiet_s` (its process exited, or this checkpointer of it is gone), at most liveness_s:
    peers read a verdict right after it is posted, this only covers that window. Never raises."""
    start = time.monotonic()
    waiting = set(range(world)) - {rank}
    beats: dict[int, tuple[int, float]] = {}
    try:
        while waiting:
            now = time.monotonic()
            if now - start > link.liveness_s:
                log.warning("[rank %d] closing although rank(s) %s have not closed their "
                            "checkpointers within %g s", rank, sorted(waiting), link.liveness_s)
                return
            for peer in sorted(waiting):
                if link.increment("close", f"departed/{peer}", 0):
                    waiting.discard(peer)
                    continue
                count = link.heartbeat_of(peer)
                if peer not in beats or beats[peer][0] != count:
                    beats[peer] = (count, now)
                elif now - beats[peer][1] > quiet_s:
                    waiting.discard(peer)
            time.sleep(0.05)
    except Exception as exc:  # noqa: BLE001 - best effort on the way out
        log.debug("[rank %d] departure wait ended: %s", rank, exc)
