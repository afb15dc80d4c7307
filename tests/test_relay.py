"""The node's outcome board (async_ckpt/dist/relay.py): what local rank 0 publishes, another
local rank reads back exactly, and nothing else: not another save's slot, not a torn or damaged
slot, not a file that is not a board. The real 2 x 2 runs (tests/test_store_traffic.py) check
that the node's other ranks wait without a Store wait and still learn a save's outcome through
the Store when the board goes silent."""
from __future__ import annotations

import os
import struct

import pytest

from async_ckpt.dist.messages import CommittedInfo, Outcome
from async_ckpt.dist.relay import SLOT_SIZE, SLOTS, BoardReader, BoardWriter, Seen, board_size

OK = Outcome(ok=True, info=CommittedInfo(url="file:///x/step-3", nbytes=10, stored_nbytes=8,
                                         created="now", timings={"commit_s": 0.1}, metrics={"loss": 1.5}))


@pytest.fixture
def board():
    writer = BoardWriter.create()
    reader = BoardReader.attach(writer.name)
    assert reader is not None
    yield writer, reader
    reader.close()
    writer.close()


def _slot_at(seq: int) -> int:
    return 64 + (seq % SLOTS) * SLOT_SIZE


def test_events_then_the_outcome_read_back_exactly(board):
    writer, reader = board
    assert reader.read(3) is None                      # nothing published yet
    writer.publish(3, 0)
    assert reader.read(3) == Seen(0)
    writer.publish(3, 2)
    assert reader.read(3) == Seen(2)
    writer.publish(3, 2, OK)
    assert reader.read(3) == Seen(2, OK)
    failed = Outcome(ok=False, message="rank 1: disk full", causes={1: "disk full"}, replication=True)
    writer.publish(4, 1, failed)
    assert reader.read(4) == Seen(1, failed)
    assert reader.read(3) == Seen(2, OK)               # another slot


def test_a_slot_is_reused_only_by_the_save_it_now_holds(board):
    writer, reader = board
    writer.publish(1, 0, OK)
    writer.publish(1 + SLOTS, 5)
    assert reader.read(1) is None                      # the slot now holds a later save
    assert reader.read(1 + SLOTS) == Seen(5)


def test_an_outcome_too_big_for_the_board_says_read_the_store(board):
    writer, reader = board
    big = Outcome(ok=False, message="x" * SLOT_SIZE, causes={r: "failed" for r in range(10)})
    writer.publish(7, 3, big)
    assert reader.read(7) == Seen(3, None, in_store=True)


def test_a_torn_or_damaged_slot_is_not_read(board):
    writer, reader = board
    writer.publish(2, 1, OK)
    at = _slot_at(2)
    with open(writer.name, "r+b") as f:
        f.seek(at)
        gen = struct.unpack("<Q", f.read(8))[0]
        f.seek(at)
        f.write(struct.pack("<Q", gen + 1))            # odd: a write in progress
    assert reader.read(2) is None
    with open(writer.name, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<Q", gen))
        f.seek(at + 64)
        byte = f.read(1)
        f.seek(at + 64)
        f.write(bytes([byte[0] ^ 1]))                 # one payload bit flipped
    assert reader.read(2) is None
    writer.publish(2, 1, OK)                           # the next publish is read again
    assert reader.read(2) == Seen(1, OK)


def test_only_a_board_of_this_package_is_mapped(board, tmp_path):
    writer, _ = board
    outside = tmp_path / "async_ckpt-board"
    outside.write_bytes(b"\0" * board_size())
    assert BoardReader.attach(str(outside)) is None                     # not under /dev/shm
    folder = os.path.dirname(writer.name)
    assert BoardReader.attach(os.path.join(folder, "someone-else")) is None
    assert BoardReader.attach(writer.name + "-gone") is None            # no such file
    wrong = writer.name + "-short"
    with open(wrong, "wb") as f:
        f.write(b"\0" * 100)
    try:
        assert BoardReader.attach(wrong) is None                        # not a board's size
    finally:
        os.unlink(wrong)


def test_closing_the_writer_removes_the_name_but_not_a_readers_view():
    writer = BoardWriter.create()
    reader = BoardReader.attach(writer.name)
    assert reader is not None
    writer.publish(9, 0, OK)
    name = writer.name
    writer.close()
    assert not os.path.exists(name)
    assert reader.read(9) == Seen(0, OK)
    assert BoardReader.attach(name) is None
    reader.close()


def test_a_rank_that_cannot_map_its_nodes_board_stops_looking_after_a_completed_save():
    """Ranks in containers that do not share /dev/shm: the name is posted but cannot be mapped;
    once a save of the node has completed the rank waits in the Store for good (no lookups)."""
    from async_ckpt.dist.messages import BoardName
    from async_ckpt.dist.topology import Topology
    from async_ckpt.save.rank_worker import RankWorker

    class Link:
        lookups = 0

        def has(self, seq, name):
            Link.lookups += 1
            return True

        def get(self, seq, name, kind):
            return BoardName("/dev/shm/async_ckpt-0-elsewhere")

    worker = RankWorker.__new__(RankWorker)
    worker.link, worker.topo = Link(), Topology(1, 4, 1, 2, 0)
    worker._board_reader, worker._no_board = None, False
    assert worker._reader() is None and Link.lookups == 1          # before a save completed: retried
    assert worker._reader(settled=True) is None and Link.lookups == 2
    assert worker._reader() is None and worker._reader() is None and Link.lookups == 2
