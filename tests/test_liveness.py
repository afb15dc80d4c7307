"""Bounded waits on the Store: a lost Store is named (and every later call fails at once), the
heartbeat stops after the Store is gone, a live peer that never called save() is named within
seconds, and the Store's host waits for its peers to depart, briefly."""
from __future__ import annotations

import datetime
import multiprocessing as mp
import threading
import time

import pytest
import torch.distributed as dist

from async_ckpt.dist import liveness
from async_ckpt.dist import messages as msg
from async_ckpt.dist.link import StoreLink, StoreLost
from async_ckpt.dist.liveness import CallerWatch, Heartbeat, NotCalled, await_departures, depart
from support.net import free_port


def _host_store(port: int, ready) -> None:
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    store.set("up", "1")
    ready.set()
    time.sleep(600)


@pytest.fixture
def remote_store():
    """A TCPStore hosted by another process (as torchrun's agent hosts it), and a way to kill it."""
    ctx = mp.get_context("spawn")
    port, ready = free_port(), ctx.Event()
    proc = ctx.Process(target=_host_store, args=(port, ready), daemon=True)
    proc.start()
    assert ready.wait(60), "the store host did not start"
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    yield client, proc
    proc.kill()
    proc.join()


def test_a_lost_store_is_named_and_every_later_call_fails_at_once(remote_store):
    client, host = remote_store
    link = StoreLink(client, "t", timeout_s=5.0, host="the test's store host")
    link.post(1, "outcome", msg.Outcome(True))
    assert link.has(1, "outcome")
    host.kill()
    host.join()
    start = time.monotonic()
    with pytest.raises(StoreLost, match="the test's store host"):
        for _ in range(50):                    # the first call after the kill may still succeed
            link.has(1, "outcome")             # from a buffered reply; none after that
            time.sleep(0.05)
    assert time.monotonic() - start < 10
    assert link.lost is not None
    start = time.monotonic()
    with pytest.raises(StoreLost):
        link.post_error(1, 0, "anything")      # no network call: fails at once
    seen: list[BaseException] = []

    def another_thread() -> None:       # no client of its own yet: must not try to connect
        try:
            link.errors(1, range(2))
        except StoreLost as exc:
            seen.append(exc)
    t = threading.Thread(target=another_thread)
    t.start()
    t.join(5)
    assert seen and time.monotonic() - start < 6


def test_creating_a_client_is_bounded_when_the_host_is_gone(remote_store):
    client, host = remote_store
    link = StoreLink(client, "t", timeout_s=2.0, host="the test's store host")   # liveness_s = 2
    host.kill()
    host.join()
    start = time.monotonic()
    with pytest.raises(StoreLost, match="could not connect|lost the torch.distributed Store"):
        link.has(1, "x")                      # this thread has no client yet: clone() must be bounded
    assert time.monotonic() - start < 8


def test_the_heartbeat_marks_the_link_lost_and_stops(remote_store):
    client, host = remote_store
    link = StoreLink(client, "t", timeout_s=2.0, host="the test's store host")
    beat = Heartbeat(link, 0, lambda: 3)
    time.sleep(0.6)
    assert link.progress_of(0) == 3 and link.heartbeat_of(0) >= 1
    host.kill()
    host.join()
    deadline = time.monotonic() + 15
    while link.lost is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert link.lost is not None and "the test's store host" in link.lost
    beat._thread.join(10)
    assert not beat._thread.is_alive(), "the heartbeat kept going after the Store was lost"


def test_a_live_peer_that_never_called_save_is_named_fast(monkeypatch):
    monkeypatch.setattr(liveness, "PEER_LAG_S", 0.3)
    link = StoreLink.in_process("t", timeout_s=60.0)
    moved = {"on": False}
    link.moved_on = lambda seq: moved["on"]
    link.publish_progress(1, 4)              # rank 1 called 4 saves; this is save number 5
    watch = CallerWatch(link, 5, 50, {1: 1})
    start = time.monotonic()
    with pytest.raises(NotCalled) as info:
        link.gather(5, {1: "vh/1"}, msg.Announcement, "rank(s)", range(2),
                    watch=lambda found: (moved.update(on=time.monotonic() - start > 0.5), watch(found)))
    took = time.monotonic() - start
    assert 0.8 <= took < 5, took                  # not before this rank moved on, then quickly
    assert "rank 1 has not called save(step 50)" in str(info.value) and info.value.missing == [1]
    # A peer that did call it is waited for as long as the deadline allows.
    link.publish_progress(1, 5)
    moved["on"] = True
    with pytest.raises(Exception) as late:
        link.gather(5, {1: "vh/1"}, msg.Announcement, "rank(s)", range(2),
                    deadline=time.monotonic() + 1.0, watch=CallerWatch(link, 5, 50, {1: 1}))
    assert not isinstance(late.value, NotCalled) and "did not answer within" in str(late.value)


def test_the_store_host_waits_for_departures_briefly():
    link = StoreLink.in_process("t", timeout_s=60.0)
    for peer in (1, 2):
        link.beat(peer)
    depart(link, 1)

    def rank2_closes_later() -> None:
        for _ in range(6):
            link.beat(2)
            time.sleep(0.2)
        depart(link, 2)
    t = threading.Thread(target=rank2_closes_later)
    start = time.monotonic()
    t.start()
    await_departures(link, 0, 3)
    assert 1.0 <= time.monotonic() - start < 5          # waited for rank 2's departure
    t.join()
    link.beat(3)
    start = time.monotonic()
    await_departures(link, 0, 4, quiet_s=0.5)           # rank 3 never departs and stops beating
    assert time.monotonic() - start < 3
