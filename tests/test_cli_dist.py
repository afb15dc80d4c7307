"""The `async-ckpt` command line on a checkpoint saved by 4 ranks on 2 simulated nodes (two
torchrun launchers, tests/helpers/dist_worker.py's `save` scenario, launched once per session:
support.dist's `dist_saved`): inspect says which rank and node wrote each tensor, verify checks
every node's files, and export writes a PER_RANK component per copy and a REPLICATED one (each
tensor written by one of the 4 ranks) whole. Sharded (DTensor) tensors, assembled from chunks,
come with the sharded-state work. Commands run in process (`support.cli.run_cli`) except one
end to end (`end_to_end`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import async_ckpt as ac
from support.cli import as_json, end_to_end, fails, ok, run_cli, same_tensors

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def saved(dist_saved) -> Path:
    """support.dist's session fixture, shared with test_distributed.py (which only reads it too)."""
    return dist_saved[0]


def test_inspect_names_the_rank_and_node_of_every_tensor(saved):
    doc = as_json(end_to_end("inspect", saved, "--json"))
    assert doc["step"] == 2 and doc["topology"] == {"world_size": 4, "local_world_size": 2, "num_nodes": 2}
    comps = doc["components"]
    assert sorted(comps["per_rank"]["copies"]) == ["rank0", "rank1", "rank2", "rank3"]
    for r in range(4):
        cp = comps["per_rank"]["copies"][f"rank{r}"]
        assert cp["owners"] == [r] and cp["values"] == {"name": f"rank{r}"}
        assert {(t["rank"], t["node"]) for t in cp["tensors"]} == {(r, r // 2)}
    model = comps["model"]
    assert model["sharing_pattern"] == "replicated" and model["validation_level"] == "tensor"
    writers = {(t["rank"], t["node"]) for t in model["copies"]["replicated"]["tensors"]}
    assert {node for _, node in writers} == {0, 1}, "a REPLICATED component is spread over both nodes"
    assert sorted(comps["per_node"]["copies"]) == ["node0", "node1"]
    text = ok(run_cli("inspect", saved, "--component", "per_rank"))
    assert "copy rank3: written by rank(s) [3]" in text and "rank 3 node 1" in text
    assert len({f for f in doc["files"]}) == 2, "one data object per node"


def test_verify_and_ls_of_a_multi_node_checkpoint(saved):
    out = ok(run_cli("verify", saved, "--all"))
    assert "step 1: intact (2 file(s)" in out and "step 2: intact (2 file(s)" in out
    rows = as_json(run_cli("ls", saved, "--json"))["checkpoints"]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["kept_because"] == ["latest", "last-5"]


def test_export_per_rank_copies(saved, tmp_path):
    one = tmp_path / "rank2.safetensors"
    ok(run_cli("export", saved, "--component", "per_rank", "--copy", "rank2", "--to", one))
    same_tensors(load_file(one), {"v": torch.full((5,), 2)})
    with safe_open(str(one), "pt") as f:
        assert json.loads(f.metadata()["async_ckpt"])["values"] == {"name": "rank2"}
    every = tmp_path / "all.safetensors"
    ok(run_cli("export", saved, "--component", "per_rank", "--to", every))
    same_tensors(load_file(every), {f"rank{r}.v": torch.full((5,), r) for r in range(4)})
    pt = tmp_path / "per_rank.pt"
    ok(run_cli("export", saved, "--component", "per_rank", "--to", pt))
    state = torch.load(pt, weights_only=True)
    assert sorted(state) == ["rank0", "rank1", "rank2", "rank3"] and state["rank1"]["name"] == "rank1"
    fails(run_cli("export", saved, "--component", "per_rank", "--copy", "rank9", "--to", tmp_path / "x.pt"),
          1, "no copy 'rank9'", "rank0, rank1, rank2, rank3")


def test_export_replicated_component_written_by_four_ranks(saved, tmp_path):
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    net.register_buffer("scale16", torch.zeros(16, dtype=torch.bfloat16))
    with ac.AsyncCheckpointer(saved, [ac.StateComponent("model", net, ac.SharingPattern.REPLICATED)]) as ck:
        ck.load(2)                      # the library's own load is the reference
    want = dict(net.state_dict())
    out = tmp_path / "model.safetensors"
    ok(run_cli("export", saved, "--component", "model", "--to", out))
    same_tensors(load_file(out), want)
    hf = tmp_path / "hf"
    ok(run_cli("export", saved, "--component", "model", "--to", hf, "--shard-size", "2KB"))
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    got = {}
    for name in sorted(set(index["weight_map"].values())):
        got.update(load_file(hf / name))
    same_tensors(got, want)
