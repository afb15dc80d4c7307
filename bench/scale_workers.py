"""`bench.scale`'s rank workers and its waiting phase: the real `RankWorker` methods a simulated
rank runs (its announcement, its wait for the outcome, its clean-up), called on stubs that hold
only what they read, and `run_waiting`, which measures Store round trips per second of ranks
waiting for a save's outcome and of the coordinator waiting for node reports."""
from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from typing import Any

from async_ckpt.dist.link import StoreLink
from async_ckpt.dist.liveness import Heartbeat
from async_ckpt.dist.messages import Begun, NodeReport, Outcome
from async_ckpt.dist.relay import BoardReader, BoardWriter
from async_ckpt.dist.topology import Topology
from async_ckpt.save import rank_worker as rank_worker_module
from async_ckpt.save.coordinator import Coordinator
from async_ckpt.save.job import SaveJob
from async_ckpt.save.rank_worker import RankWorker

from .scale_store import Tally, link_for, warm

PER_NODE = 8


# -- the rank worker's steps, on stubs -------------------------------------------------------------
def announce(job: SaveJob, topo: Topology, link: StoreLink) -> Any:
    """The rank worker's real announcement (replica digests stubbed: nothing is staged)."""
    stub = RankWorker.__new__(RankWorker)
    stub.link, stub.topo = link, topo
    real = rank_worker_module.digest
    rank_worker_module.digest = lambda *a, **k: {"quick": "0" * 32}
    try:
        return RankWorker._announce(stub, job)
    finally:
        rank_worker_module.digest = real


def wait_outcome(job: SaveJob, topo: Topology, link: StoreLink, board: Any = None,
                 reader: Any = None) -> Outcome:
    """The real rank worker's wait; `board`: the node's outcome board, which a node writer's
    worker writes (dist.relay); `reader`: another rank's view of it, already found (else it
    finds it through the Store, once per checkpointer)."""
    stub = RankWorker.__new__(RankWorker)
    stub.link, stub.topo = link, topo
    stub.board = board if topo.is_node_writer else None
    stub._board_reader = None if topo.is_node_writer else reader
    stub._no_board = False
    try:
        return RankWorker._wait_outcome(stub, job)
    finally:
        if reader is None and stub._board_reader is not None:    # found it itself
            stub._board_reader.close()


def retire(job: SaveJob, topo: Topology, link: StoreLink) -> None:
    """The rank worker deleting its own keys once it has the outcome (where it does: before this
    change the coordinator deleted every rank's keys, counted in its column)."""
    if hasattr(RankWorker, "_retire"):
        stub = RankWorker.__new__(RankWorker)
        stub.link, stub.topo, stub._answered = link, topo, set()
        RankWorker._retire(stub, job)


# -- waiting ranks ------------------------------------------------------------------------------
def run_waiting(master: Any, world: int, waiters: int, window_s: float) -> dict:
    """Round trips per second of ranks waiting for the outcome (each: the real rank worker wait
    and the rank's real heartbeat, on its own Store clients) and of the coordinator waiting for
    node reports, while a save is in flight."""
    ns, seq, step = f"bench/wait/{world}", 1, 10
    local = min(PER_NODE, world)
    topos = [Topology(r, world, r % local, local, r // local) for r in range(world)]
    nodes = topos[0].num_nodes
    hb0 = Heartbeat(link_for(master, ns, Tally()), 0, lambda: seq)   # rank 0 is alive
    # Node writers are alive (beating) while they write.
    writer_beats = [Heartbeat(link_for(master, ns, Tally()), topos[0].node_writer_of(n), lambda: seq)
                    for n in range(1, nodes)]
    ranks = [r for r in range(1, world)][:: max(1, (world - 1) // waiters)][:waiters]
    tallies = {r: Tally() for r in ranks}
    links = {r: link_for(master, ns, tallies[r]) for r in ranks}
    for link in links.values():
        warm(link, 1)
    # Each sampled rank's node has its outcome board, as local rank 0 creates it (dist.relay).
    # (found through the Store once per checkpointer, so not in a save's figures)
    boards = {topos[r].node: BoardWriter.create() for r in ranks}
    readers = {node: BoardReader.attach(board.name) for node, board in boards.items()}
    beats = [Heartbeat(links[r], r, lambda: seq) for r in ranks]
    jobs = {r: SimpleJob(step, seq) for r in ranks}
    coord_tally = Tally()
    coord_link = link_for(master, ns, coord_tally)
    warm(coord_link)
    for n in range(1, nodes):
        coord_link.post(seq, f"begun/{n}", Begun(n))
    coordinator = Coordinator(None, topos[0], coord_link, None, {})  # type: ignore[arg-type]
    time.sleep(0.6)                    # every heartbeat has beaten once
    for tally in list(tallies.values()) + [coord_tally]:
        tally.ops.clear()
    results: dict[Any, Any] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(
        r, wait_outcome(jobs[r], topos[r], links[r], boards[topos[r].node],  # type: ignore[arg-type]
                        readers[topos[r].node])), daemon=True) for r in ranks]
    job0 = SimpleJob(step, seq)
    coord_thread = threading.Thread(target=lambda: results.__setitem__(
        "coordinator", coordinator._other_reports(job0)), daemon=True)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for t in threads + [coord_thread]:
        t.start()
    time.sleep(window_s)
    elapsed = time.perf_counter() - t0
    counts = {r: tallies[r].total() for r in ranks}
    coord_count = coord_tally.total()
    coord_link.post(seq, "outcome", Outcome(ok=True))
    for n in range(1, nodes):
        coord_link.post(seq, f"node/{n}", NodeReport(n, topos[0].node_writer_of(n)))
    for t in threads + [coord_thread]:
        t.join(30)
    for b in beats + writer_beats + [hb0]:
        b.stop()
    for node, board in boards.items():
        if readers[node] is not None:
            readers[node].close()  # type: ignore[union-attr]
        board.close()
    rates = [c / elapsed for c in counts.values()]
    return {"world": world, "waiters": len(ranks), "window_s": round(elapsed, 2),
            "rank_rt_per_s": round(statistics.mean(rates), 2), "rank_rt_per_s_max": round(max(rates), 2),
            "rank_ops": tallies[ranks[0]].snapshot(),
            "coordinator_rt_per_s": round(coord_count / elapsed, 1),
            "coordinator_ops": coord_tally.snapshot(),
            "offered_rt_per_s": round(statistics.mean(rates) * (world - 1) + coord_count / elapsed)}


@dataclasses.dataclass(eq=False)
class SimpleJob:
    """What the waits read of a SaveJob."""
    step: int
    seq: int
    published: threading.Event = dataclasses.field(default_factory=threading.Event)
    components: list = dataclasses.field(default_factory=list)
    plan: Any = None
