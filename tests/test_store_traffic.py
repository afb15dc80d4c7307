"""Store requests per save on a real 2 x 2 torchrun run (4 ranks, LOCAL_WORLD_SIZE=2, two
simulated nodes), counted inside every rank by operation and key, against the formulas of
docs/distributed.md ("What a save costs the Store"); the request rate of every rank while a
save is in flight (node 1's writer made slow): a few per second, not hundreds; and a node whose
outcome board goes silent (dist/relay.py): its other rank still learns the outcome, through the
Store, within one Store check."""
from __future__ import annotations

import pytest

from async_ckpt.dist.relay import STORE_CHECK_S
from support.dist import run
from support.paths import HELPERS

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]
SLOW_S = 6.0
# Requests a waiting thread makes per wake (at most one wake a second with the default
# timeout_s): its event counter and peers' heartbeats in one request, the first time an existence
# check of the heartbeat keys, and "did rank 0 enter this save" until its progress shows it.
WAKE_OPS = {"add nev", "multi_get hb", "check hb", "check vh", "check outcome"}


def expected(rank: int) -> tuple[dict[str, int], int]:
    """(requests per steady-state save other than the wakes, the "add nev" of them that are not
    wakes) for this rank of the 2 x 2 run: the formulas of docs/distributed.md. Every thread of a
    process that waits on a save shares one blocking wait for its outcome."""
    worker = {"set vh": 1, "delete_key vh": 1}
    if rank in (1, 3):                      # local rank 1: hands its job to its node writer and
        return {**worker, "set job": 1, "delete_key job": 1}, 1   # reads the outcome off its board
    worker.update({"wait outcome": 1, "get outcome": 1})    # local rank 0: from the Store
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
    assert sum(totals) == 3 * (5 + 5 + 13 + 23)                   # 46 per save on 2 x 2
    for rank in (1, 3):     # the board told them at once: well before their first Store check
        assert all(save["seconds"] < STORE_CHECK_S for save in results[rank]["saves"]), results[rank]
    for rank, res in sorted(results.items()):
        waiting = res["waiting"]
        assert waiting["in_flight"], (rank, waiting)
        rate = waiting["requests"] / waiting["seconds"]
        print(f"rank {rank}: {rate:.2f} requests/s while a save was in flight ({waiting['ops']}); "
              f"per save: {[sum(s['ops'].values()) for s in res['saves']]} incl. heartbeats")
        # Heartbeat (2/s) + one wake per second per waiting thread (rank 0: two); a rank reading
        # its board: one Store check every STORE_CHECK_S once rank 0 entered the save.
        assert rate <= (5.0 if rank in (0, 2) else 2.0 + 2 * 2 / STORE_CHECK_S + 0.5), (rank, rate, waiting)
    # Node 1's board went silent for step 6: its other rank found the outcome in the Store at
    # its next check (no Store wait), and every rank committed.
    for rank, res in sorted(results.items()):
        assert res["silent_board"]["step"] == 6, (rank, res["silent_board"])
    late = results[3]["silent_board"]
    assert late["ops"].get("get outcome") == 1 and "wait outcome" not in late["ops"], late
    assert late["seconds"] <= STORE_CHECK_S + 5.0, late
