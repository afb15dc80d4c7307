"""Multi-node saving and loading with real gloo process groups.

Every run is two torchrun launchers (``--nnodes=2 --node-rank=0|1``, 2 ranks each) on this
machine: 4 ranks, 2 nodes. The ranks run tests/helpers/dist_worker.py and report what they saw.
A launch costs every rank a torch import and a rendezvous, so the scenarios that end with every
rank alive share launches (`runs`: one launch of 2 ranks, one of 4, each running its scenarios
one after the other); those that kill a process have their own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.dist import launch, run_plan
from support.fragments import merged_doc

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(900)]


def manifest(root: Path, step: int) -> dict:
    return merged_doc(root / f"step-{step:010d}")     # 2 nodes: the root and its fragments


@pytest.fixture(scope="module")
def saved(dist_saved):
    """Steps 1 and 2 saved by 4 ranks on 2 nodes with every sharing pattern (support.dist's
    session fixture, shared with test_cli_dist.py): root, its folder, each rank's results."""
    root, results = dist_saved
    return root, root.parent, results


SLOW_TIMEOUT = 3.0
SLOW_DELAY = 2 * SLOW_TIMEOUT + 8


@dataclass(frozen=True)
class Runs:
    """The shared launches' results: `runs[label]` is that scenario's results by rank, and
    `base / label` its checkpoint root (but load's and resize's: `saved`'s; grow's: base/grow)."""
    base: Path
    results: dict[str, dict[int, dict]]

    def __getitem__(self, label: str) -> dict[int, dict]:
        return self.results[label]


@pytest.fixture(scope="module")
def runs(saved, tmp_path_factory) -> Runs:
    """Two launches after `saved`: 2 ranks (one node) load the 4-rank checkpoint and save a
    2-rank one; then a fresh 4-rank launch loads both and runs the save/delete/validation
    scenarios, each in its own root."""
    root = saved[0]
    base = tmp_path_factory.mktemp("dist-runs")
    grown = base / "grow"
    two = run_plan([("resize", "resize", root, ()), ("grow_save", "grow", grown, ("save",))],
                   base / "out-2", nnodes=1, nproc=2)
    four = run_plan([("load", "load", root, ()),
                     ("grow", "grow", grown, ("load",)),
                     ("replicas", "replicas", base / "replicas", ()),
                     ("group_replicas", "group_replicas", base / "group_replicas", ()),
                     ("delete", "delete", base / "delete", ()),
                     ("load_verdict", "load_verdict", base / "load_verdict", ()),
                     ("slow", "slow", base / "slow", (str(SLOW_TIMEOUT), str(SLOW_DELAY))),
                     ("misuse", "misuse", base / "misuse", ())], base / "out-4")
    return Runs(base, {**two, **four})


def test_every_rank_commits_the_same_checkpoints(saved):
    root, _, results = saved
    assert {r: res["steps"] for r, res in results.items()} == {r: [1, 2] for r in range(4)}
    assert len({res["url"] for res in results.values()}) == 1
    assert sorted(p.name for p in root.iterdir()) == ["step-0000000001", "step-0000000002"]


def test_manifest_owners_follow_the_patterns(saved):
    root = saved[0]
    doc = manifest(root, 2)
    assert doc["topology"] == {"world_size": 4, "local_world_size": 2, "num_nodes": 2}
    comps = doc["components"]
    owners = {key: {sid: shard["owners"] for sid, shard in c["shards"].items()} for key, c in comps.items()}
    assert owners["global"] == {"global": [0]}
    assert owners["per_rank"] == {f"rank{r}": [r] for r in range(4)}
    # PER_NODE: exactly one process per node (the node writer) wrote that node's copy...
    assert owners["per_node"] == {"node0": [0], "node1": [2]}
    files_of = {sid: {t["file"] for t in shard["tensors"]} for sid, shard in comps["per_node"]["shards"].items()}
    assert all(name.startswith("data-n00000-") for name in files_of["node0"])
    assert all(name.startswith("data-n00001-") for name in files_of["node1"])
    # ...one data object per node, written by its node's writer, one segment per local rank...
    assert sorted(name[:12] for name in doc["files"]) == ["data-n00000-", "data-n00001-"]
    assert doc["format_version"] == 3 and all(len(f["segments"]) == 2 for f in doc["files"].values())
    # PER_GROUP: one copy per disjoint group, written by one of its members, who reload it.
    groups = comps["per_group"]["shards"]
    assert sorted(groups) == ["group0", "group1"]
    assert groups["group0"]["members"] == [0, 2] and groups["group1"]["members"] == [1, 3]
    assert len(groups["group0"]["owners"]) == 1 and groups["group0"]["owners"][0] in (0, 2)
    assert len(groups["group1"]["owners"]) == 1 and groups["group1"]["owners"][0] in (1, 3)
    # REPLICATED: one copy whose tensors are spread over ranks on both nodes.
    for key in ("model", "optim"):
        shard = comps[key]["shards"]["replicated"]
        assert set(comps[key]["shards"]) == {"replicated"}
        assert len(shard["owners"]) >= 3, shard["owners"]
        assert {t["file"][:12] for t in shard["tensors"]} == {"data-n00000-", "data-n00001-"}


def test_replicated_bytes_are_spread_over_nodes(saved):
    doc = manifest(saved[0], 2)
    per_node: dict[str, int] = {}
    for key in ("model", "optim"):
        for t in doc["components"][key]["shards"]["replicated"]["tensors"]:
            per_node[t["file"][:12]] = per_node.get(t["file"][:12], 0) + t["nbytes"]
    total = sum(per_node.values())
    assert len(per_node) == 2 and max(per_node.values()) < 0.75 * total, per_node


def test_dynamic_pattern_is_resolved_at_each_save(saved):
    root = saved[0]
    assert manifest(root, 1)["components"]["dynamic"]["sharing_pattern"] == "replicated"
    assert manifest(root, 2)["components"]["dynamic"]["sharing_pattern"] == "per_rank"


def test_fresh_launch_reloads_each_ranks_share(saved, runs):
    root, _, before = saved
    after = runs["load"]
    for rank, res in after.items():
        node, local = rank // 2, rank % 2
        group_min = rank % 2
        assert res["step"] == 2
        assert res["model"] == before[rank]["model"]                    # REPLICATED model
        assert res["opt_steps"] == [3, 3, 3, 3]                           # REPLICATED optimizer
        assert res["draws"] == before[rank]["draws"], f"rank {rank} RNG not restored"
        assert res["per_rank"] == {"v": [float(rank)] * 5, "name": f"rank{rank}"}
        assert res["global"] == {"v": [0.0] * 3, "note": "from 0"}        # rank 0's state
        assert res["per_node"] == {"v": [float(node * 10)] * 4}          # the node writer's
        assert res["per_group"]["v"] == [100.0 + group_min] * 2         # the group's copy
        assert res["dynamic"] == {"v": [float(rank)] * 2}
        assert local in (0, 1)
    # All ranks drew different random numbers: per-rank RNG streams really are per rank.
    assert len({json.dumps(res["draws"]) for res in after.values()}) == 4
    # GLOBAL/REPLICATED bytes were read from storage once per node, by the node writer.
    doc = manifest(root, 2)
    shared = [(t["file"], t["offset"], t["offset"] + t["length"])
              for key in ("model", "optim", "global") for shard in doc["components"][key]["shards"].values()
              for t in shard["tensors"]]

    def covered(rank, record):
        return any(f == record[0] and a <= record[1] and record[2] <= b for f, a, b in after[rank]["reads"])

    def touched(rank, record):
        return any(f == record[0] and a < record[2] and record[1] < b for f, a, b in after[rank]["reads"])
    for record in shared:
        assert covered(0, record) and covered(2, record), record
        assert not touched(1, record) and not touched(3, record), record


def test_other_world_size_loads_shared_state_and_refuses_per_rank(saved, runs):
    before = saved[2]
    results = runs["resize"]
    assert sorted(results) == [0, 1]
    for rank, res in results.items():
        assert res["step"] == 2
        assert res["model"] == before[0]["model"]
        assert res["global"] == [0.0] * 3
        assert "PER_RANK" in res["strict_error"] and "4 rank(s)" in res["strict_error"]
        assert res["lenient_step"] == 2


def test_replica_mismatch_fails_every_rank_and_commits_nothing(runs):
    results = runs["replicas"]
    for rank, res in results.items():
        for level in ("tensor", "quick", "full"):
            bad = res[f"{level}_bad"]
            assert bad["failed"] and bad["cause_type"] == "ReplicationError", (rank, level, bad)
            assert "'model'" in bad["message"] and "'optim'" in bad["message"]
            assert sorted(bad["causes"]) == ["1", "3"], bad["causes"]
            assert not res[f"{level}_fixed"]["failed"], res[f"{level}_fixed"]
        tensor = res["tensor_bad"]["message"]
        assert "'0.weight' on rank(s) [3]" in tensor
        assert "'scale16' on rank(s) [1]" in tensor                      # bf16 buffer
        assert "'state/2/exp_avg' on rank(s) [1]" in tensor               # nested optimizer state
        full = res["full_bad"]["message"]
        assert "rank 3: 1 element(s) differ, max |diff| = 0.5" in full
        assert "rank 1: 1 element(s) differ, max |diff| = 0.25" in full
        assert "ranks [1]" in res["quick_bad"]["message"] and "ranks [3]" in res["quick_bad"]["message"]
        # A rank whose save() raises fails the save everywhere; the next save commits.
        raised = res["raising_rank"]
        assert raised["failed"]
        if rank == 2:
            assert raised.get("raised_in_save") and "exploded on purpose" in raised["message"]
        else:
            assert "2" in raised["causes"] and "exploded on purpose" in raised["causes"]["2"]
        assert not res["after_raise"]["failed"]
        assert res["tensor_steps"] == [11, 13] and res["quick_steps"] == [11] and res["full_steps"] == [11]
    root = runs.base / "replicas"
    for level in ("tensor", "quick", "full"):
        assert (root / level / "step-0000000011" / "manifest.json").exists()
        assert not (root / level / "step-0000000010" / "manifest.json").exists()


@pytest.mark.crash
@pytest.mark.parametrize("victim", [3, 1], ids=["node1-rank", "coordinator-node-rank"])
def test_rank_killed_mid_save_fails_survivors_within_deadline(tmp_path, victim):
    """torchrun tears down the victim's node-mates, so the other node's ranks are the survivors:
    with victim 3 they include the coordinator (a node writer vanished), with victim 1 the
    coordinator itself is gone and the survivors must time out waiting for its outcome."""
    timeout = 8.0
    survivors = [0, 1] if victim >= 2 else [2, 3]
    started = launch("kill", tmp_path / "ckpt", tmp_path / "out", args=(str(victim), str(timeout)))
    results = started.wait_results("kill", survivors, 300)
    assert sorted(results) == survivors, started.log_text()
    for rank, res in results.items():
        assert res["failed"], res
        assert res["seconds"] < 2 * timeout + 10, res["seconds"]
        assert res["causes"], res
        assert res["steps"] == [1]
    assert not (tmp_path / "ckpt" / "step-0000000002" / "manifest.json").exists()


def test_a_slow_but_alive_node_writer_is_waited_for(runs):
    """Deadlines bound hand-overs; a write may take as long as it needs while its process lives
    (timeout_s SLOW_TIMEOUT, node 1's writer busy for SLOW_DELAY)."""
    results = runs["slow"]
    for rank, res in results.items():
        assert not res["failed"], res
        assert res["seconds"] > SLOW_DELAY and res["steps"] == [1]


def test_every_rank_may_delete_a_step_and_returns_once_it_is_gone(runs):
    """delete() has no collective: rank 0 acts, the others wait for it through the Store."""
    results = runs["delete"]
    assert sorted(results) == [0, 1, 2, 3]
    for rank, res in results.items():
        assert res["gone"] and res["listed"] == [1, 3], (rank, res)
        assert res["after"] == [1, 2, 3], (rank, res)


def test_per_group_copies_are_validated_within_their_group_and_replicas_by_default(runs):
    results = runs["group_replicas"]
    for rank, res in results.items():
        bad = res["group_bad"]
        assert bad["failed"] and bad["cause_type"] == "ReplicationError", (rank, bad)
        # Two members, no majority: the copy that was written is the reference.
        assert "(TENSOR, group copy 'group1'): tensor 'w' on rank(s) [" in bad["message"], bad
        assert "no majority" in bad["message"] and sorted(bad["causes"]) in (["1"], ["3"]), bad
        default = res["default_bad"]                      # no validation_level set: QUICK
        assert default["failed"] and "'model' (QUICK)" in default["message"], (rank, default)
        assert "ranks [2]" in default["message"]
        assert not res["fixed"]["failed"] and res["steps"] == [3], res
        assert not res["optout"]["failed"], res["optout"]   # ValidationLevel.NONE opts out


def test_a_rank_that_never_calls_save_is_named_within_seconds(runs):
    """Rank 0 alone saves (or every rank but rank 0 does): the ranks waiting name the one that
    never called save() within 10 s, although timeout_s is the default 600 s."""
    results = runs["misuse"]
    only0 = results[0]["rank0_only"]
    assert only0["failed"] and only0["type"] == "SaveFailedError", only0
    assert "has not called save(step 1); every rank must call save() for the same steps" in only0["message"]
    assert only0["seconds"] < 10, only0
    for rank in (1, 2, 3):
        res = results[rank]["all_but_rank0"]
        assert res["failed"] and "rank 0 has not called save(step 1)" in res["message"], (rank, res)
        assert res["seconds"] < 10, res


def test_killing_the_store_host_fails_every_survivor_within_the_liveness_bound(tmp_path):
    """SIGKILL only node 0's torchrun agent (it hosts the TCPStore; its workers survive): every
    rank's save() or wait() and its close() raise a CheckpointError naming the Store's host."""
    import signal
    import time
    timeout = 8.0
    out = tmp_path / "out"
    started = launch("agent_kill", tmp_path / "ckpt", out, args=(str(timeout),))
    deadline = time.monotonic() + 180
    while not all((out / f"ready-r{r}").exists() for r in range(4)):
        assert time.monotonic() < deadline, started.log_text()
        time.sleep(0.1)
    started.procs[0].send_signal(signal.SIGKILL)        # node 0's agent: the Store's host
    (out / "killed").write_text(str(time.time()))
    results = started.wait_results("agent_kill", [0, 1, 2, 3], 120)
    for rank, res in results.items():
        assert res["save"]["failed"] and res["close"]["failed"], (rank, res)
        for what in ("save", "close"):
            assert "torchrun agent of node 0" in res[what]["message"], (rank, what, res[what])
        assert res["since_kill"] < min(timeout, 30) + 10, res


def test_a_load_one_rank_refuses_fails_on_every_rank_before_any_restore(runs):
    results = runs["load_verdict"]
    for rank, res in results.items():
        assert res["raised"] == "InvalidArgumentError", (rank, res)
        assert res["untouched"], f"rank {rank} restored its model although the load failed"
        if rank == 1:
            assert "component 'meta' refuses the saved state: saved by version 1" in res["message"]
        else:
            assert "failed on rank(s) [1], so no rank restores anything" in res["message"], res


def test_a_required_component_with_no_copy_fails_every_rank_whatever_strict_says(runs):
    """A 2-rank checkpoint loaded by 4 ranks with strict=False: ranks 2-3 have no copy of the
    required PER_RANK component; before, they silently kept their initial state."""
    assert sorted(runs["grow_save"]) == [0, 1] and all(r["saved"] for r in runs["grow_save"].values())
    results = runs["grow"]
    for rank, res in results.items():
        assert res["raised"] == "CheckpointNotFoundError", (rank, res)
        if rank >= 2:
            assert f"component 'stage' has no copy 'rank{rank}'" in res["message"], res
        else:
            assert "failed on rank(s) [2, 3]" in res["message"], res
        assert res["untouched"], f"rank {rank} restored its model although the load failed"
        assert res["optional_step"] == 1              # required=False: skipped, with a warning
