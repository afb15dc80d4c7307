"""Store requests per save on a real 2 x 2 torchrun run (4 ranks, LOCAL_WORLD_SIZE=2, two
simulated nodes), counted inside every rank by operation and key, against the formulas of
docs/distributed.md ("What a save costs the Store"); and the request rate of every rank while a
save is in flight (node 1's writer made slow): a few per second, not hundreds."""
from __future__ import annotations

import pytest

from support.dist import run
from support.paths import HELPERS

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]
SLOW_S = 6.0
# Requests a waiting thread makes per wake (at most one wake a second with the default
# timeout_s): its event counter and peers' heartbeats in one request, the first time an existence
# check of the heartbeat keys, and "did rank 0 enter this save" until its progress shows it.
WAKE_OPS = {"add nev", "multi_get hb", "check hb", "check vh"}


def expected(rank: int) -> tuple[dict[str, int], int]:
    """(requests per steady-state save other than the wakes, the "add nev" of them that are not
    wakes) for this rank of the 2 x 2 run: the formulas of docs/distributed.md. Every thread of a
    process that waits on a save shares one blocking wait for its outcome."""
    worker = {"set vh": 1, "wait outcome": 1, "get outcome": 1, "delete_key vh": 1}
    if rank in (1, 3):                      # local rank 1: hands its job to its node writer
        return {**worker, "set job": 1, "delete_key job": 1}, 1
    writer = {"wait job": 1, "multi_get job": 1}           # gathers the local peer's job
    if rank == 2:                           # node 1's writer: 13 requests
        return {**worker, **writer, "set begun": 1, "set node": 1, "delete_key begun": 1,
                "delete_key node": 1}, 3
    coordinator = {"wait begun": 1, "multi_get begun": 1, "wait node": 1, "multi_get node": 1,
                   "wait vh": 1, "multi_get vh": 1, "set outcome": 1, "delete_key outcome": 1,
                   "delete_key nev": 1, "delete_key errors": 1, "delete_key fullreq": 1}
    return {**worker, **writer, **coordinator}, 6    # rank 0: 23 requests


def test_store_requests_per_save_match_the_formulas_and_waiting_is_quiet(tmp_path):
    results = run("traffic", tmp_path / "ckpt", tmp_path / "out", args=(str(SLOW_S),), timeout=300,
                  worker=HELPERS / "store_traffic_worker.py")
    totals = []
    for rank, res in sorted(results.items()):
        fixed, nev = expected(rank)
        for save in res["saves"]:
            ops = {k: v for k, v in save["ops"].items() if not k.endswith(" hb") or k in WAKE_OPS}
            plain = {k: v for k, v in ops.items() if k not in WAKE_OPS}
            assert plain == fixed, (rank, save)
            wakes = sum(v for k, v in ops.items() if k in WAKE_OPS) - nev
            # Each waiting thread (rank 0: its worker and its node writer / coordinator) wakes at
            # most once a second; a wake costs at most two requests.
            assert ops.get("add nev", 0) >= nev and 0 <= wakes <= 2 * 2 * (save["seconds"] + 1), (rank, save)
            totals.append(sum(plain.values()) + nev)
    assert sum(totals) == 3 * (7 + 7 + 13 + 23)                   # 50 per save on 2 x 2
    for rank, res in sorted(results.items()):
        waiting = res["waiting"]
        assert waiting["in_flight"], (rank, waiting)
        rate = waiting["requests"] / waiting["seconds"]
        print(f"rank {rank}: {rate:.2f} requests/s while a save was in flight ({waiting['ops']}); "
              f"per save: {[sum(s['ops'].values()) for s in res['saves']]} incl. heartbeats")
        # Heartbeat (2/s) + one wake per second per waiting thread (rank 0: two).
        assert rate <= 5.0, (rank, rate, waiting)
