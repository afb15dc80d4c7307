"""DP x PP with torch.distributed.pipelining: PER_GROUP copies named by pipeline coordinate
(``process_group=mesh["dp"]``) reload the right stage after a data-parallel degree change.

The CI runs share three launches (`runs`: support.dist.run_plan, one run after another in one
process group, each on its own mesh and root): 4 ranks save the PER_GROUP checkpoint and the
diverging one, 2 ranks load the first and save the PER_RANK one, 4 ranks load that."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.dist import run, run_plan
from support.paths import HELPERS

pytestmark = pytest.mark.multiproc
WORKER = HELPERS / "pipeline_worker.py"


def _run(name, root, out, mode, pp, dp, pattern="group"):
    world = pp * dp
    return run(name, root, out, nnodes=2 if world == 4 else 1, nproc=world // (2 if world == 4 else 1),
               worker=WORKER, args=(mode, str(pp), str(dp), pattern), timeout=180)


def by_stage(results):
    stages: dict[int, set] = {}
    for r in results.values():
        stages.setdefault(r["stage"], set()).add((r["digest"], r.get("next_loss")))
    return stages


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, dict[int, dict]]]:
    """The folder holding the roots (group, diverge, perrank) and each run's results by rank."""
    base = tmp_path_factory.mktemp("pipeline")
    group, diverge, perrank = base / "group", base / "diverge", base / "perrank"
    four = run_plan([("save", "save", group, ("save", "2", "2", "group")),
                     ("diverge", "diverge", diverge, ("diverge", "2", "2", "group"))],
                    base / "o1", worker=WORKER, nnodes=2, nproc=2)
    two = run_plan([("load", "load", group, ("load", "2", "1", "group")),
                    ("perrank_save", "save", perrank, ("save", "2", "1", "perrank"))],
                   base / "o2", worker=WORKER, nnodes=1, nproc=2)
    last = run_plan([("perrank_load", "load", perrank, ("load", "2", "2", "perrank"))],
                    base / "o3", worker=WORKER, nnodes=2, nproc=2)
    return base, {**four, **two, **last}


def test_dp_x_pp_2x2_reloads_at_1x2_under_strict(runs):
    base, results = runs
    root = base / "group"
    saved = results["save"]
    assert all("error" not in r for r in saved.values()), saved
    want = {stage: {d for d, _ in v} for stage, v in by_stage(saved).items()}
    assert all(len(v) == 1 for v in want.values()), want        # dp replicas agree
    import json
    manifest = json.loads(next(root.glob("step-*/manifest.json")).read_text())
    assert sorted(manifest["components"]["model"]["shards"]) == ["group-pp0", "group-pp1"]
    loaded = results["load"]
    assert all(r.get("loaded") == 3 for r in loaded.values()), loaded
    got = by_stage(loaded)
    assert {stage: {d for d, _ in v} for stage, v in got.items()} == want
    # the step after loading runs exactly as the step after saving did (last stage's loss)
    assert got[1] == by_stage(saved)[1] and next(iter(got[1]))[1] is not None


def test_a_plain_process_group_names_copies_by_lowest_rank_and_refuses_a_dp_change(tmp_path):
    """Without a mesh, a copy is named after its group's lowest rank: a dp degree change cannot
    find stage 1's copy, and says so (required components raise whatever strict says)."""
    import async_ckpt as ac
    from async_ckpt.dist.topology import Topology
    from async_ckpt.sharing import choose_copy
    topo = Topology(rank=1, world_size=2, local_rank=1, local_world_size=2, node=0)
    name, problem = choose_copy(ac.SharingPattern.PER_GROUP, {"group0": (0, 1), "group2": (2, 3)},
                                {"world_size": 4, "num_nodes": 2}, topo, (1,))
    assert name == "group1" and "no copy was saved" in problem and "DeviceMesh" in problem


@pytest.mark.long      # CI: pipelines as PER_GROUP and by key; SHARDED stages in the full profile
@pytest.mark.parametrize("pp_after", [2, 1])
def test_dp_x_pp_sharded_model_state_reloads_at_another_pipeline_degree(tmp_path, pp_after):
    """SHARDED through ac.ModelState/ac.OptimizerState (fully-qualified keys): stages' keys merge
    into one component, so 2 stages reload as 2 (dp 2 -> 1) or as 1 stage holding every layer."""
    root = tmp_path / "ckpt"
    saved = _run("save", root, tmp_path / "o1", "save", pp=2, dp=2, pattern="sharded")
    assert all("error" not in r for r in saved.values()), saved
    loaded = _run("load", root, tmp_path / "o2", "load", pp=pp_after, dp=1, pattern="sharded")
    assert all(r.get("loaded") == 3 for r in loaded.values()), loaded
    if pp_after == 2:
        assert by_stage(loaded) == by_stage(saved) | {}      # same digests and next losses per stage
    else:   # one stage: the loss of the step after loading equals the two-stage run's
        assert next(iter(by_stage(loaded)[0]))[1] == next(iter(by_stage(saved)[1]))[1]


def test_dp_x_pp_replica_one_ulp_off_fails_the_save_on_every_rank(runs):
    base, results = runs
    root = base / "diverge"
    got = results["diverge"]
    assert all("ReplicationError" in r.get("error", "") or "SaveFailedError" in r.get("error", "")
               for r in got.values()), got
    # rank 3 is stage 1's second replica: its group copy names the tensor and the rank
    assert all("group-pp1" in r["error"] and "[3]" in r["error"] for r in got.values()), got
    assert not list(root.glob("step-*/manifest.json"))


def test_per_rank_pipeline_stages_reload_by_key_at_another_world_size(runs):
    """PP 2 saved PER_RANK (fully-qualified keys, one stage per rank) loaded by DP x PP 2x2 under
    strict=True: the stages' keys are disjoint, so each rank loads its stage's keys from the rank
    that saved them (ranks 2-3, which have no copy of their own, included); the per-rank RNG,
    required=False, is skipped with a warning instead of refusing the load."""
    saved = runs[1]["perrank_save"]
    assert all("error" not in r for r in saved.values()), saved
    loaded = runs[1]["perrank_load"]
    assert all(r.get("loaded") == 3 for r in loaded.values()), loaded
    assert by_stage(loaded) == by_stage(saved)
