"""SHARDED building blocks without processes: who writes a chunk, splitting giant REPLICATED
tensors, PER_RANK copies by key, and the loader's refusals (before anything is modified)."""
from __future__ import annotations

import itertools

import pytest
import torch

import async_ckpt as ac
from async_ckpt.dist.topology import Topology
from async_ckpt.format.manifest import ComponentEntry, ShardEntry, TensorEntry
from async_ckpt.load.reshard import by_key
from async_ckpt.save import chunking
from async_ckpt.sharing import chunk_writer


def writers(ident, layout):
    """layout: rank -> (holders on its mesh, its replica group or None)."""
    return [r for r, (holders, replicas) in layout.items() if chunk_writer(ident, holders, replicas, r)]


@pytest.mark.parametrize("ident", [f"chunk{i}" for i in range(40)])
def test_every_chunk_has_exactly_one_writer(ident):
    # DP x TP 2x2: tp meshes [0,1] and [2,3], dp groups {0,2} and {1,3}
    sharded = {0: ((0,), (0, 2)), 2: ((2,), (0, 2)), 1: ((1,), (1, 3)), 3: ((3,), (1, 3))}
    assert len(writers(ident, {r: v for r, v in sharded.items() if r in (0, 2)})) == 1
    replicated_on_tp = {0: ((0, 1), (0, 2)), 1: ((0, 1), (1, 3)), 2: ((2, 3), (0, 2)), 3: ((2, 3), (1, 3))}
    assert len(writers(ident, replicated_on_tp)) == 1
    plain_in_group = {0: ((0, 2), (0, 2)), 2: ((0, 2), (0, 2))}
    assert len(writers(ident, plain_in_group)) == 1
    hsdp = {r: ((r % 2, r % 2 + 2), None) for r in (0, 2)}     # (replicate, shard): ranks 0 and 2 hold it
    assert len(writers(ident, hsdp)) == 1
    everyone = {r: (tuple(range(4)), None) for r in range(4)}
    assert len(writers(ident, everyone)) == 1


def test_writers_spread_over_ranks():
    counts = {r: 0 for r in range(4)}
    for i in range(400):
        for r in writers(f"t{i}", {r: (tuple(range(4)), None) for r in range(4)}):
            counts[r] += 1
    assert min(counts.values()) > 60, counts


def test_a_giant_replicated_tensor_is_split_into_row_blocks_spread_over_ranks(monkeypatch):
    monkeypatch.setattr(chunking, "SPLIT_MIN_BYTES", 1024)
    state = {"big": torch.arange(10_000.0).view(1000, 10), "small": torch.ones(3)}
    from async_ckpt.format.tree import flatten
    tree, tensors = flatten(state, "c")
    owners = {}
    for rank in range(4):
        topo = Topology(rank=rank, world_size=4, local_rank=rank % 2, local_world_size=2, node=rank // 2)
        assert chunking.needs_split(tensors, topo)
        local, metas = chunking.split_replicated(tensors, tree, "c", topo)
        assert [m.offsets[0] for m in metas if m.path == ("big",)] == [0, 250, 500, 750]
        assert all(torch.equal(t, state["big"][m.offsets[0]:m.offsets[0] + t.shape[0]])
                   for t, m in zip(local, metas, strict=True) if m.path == ("big",))
        for i, m in enumerate(metas):
            if m.write:
                assert i not in owners, "two writers for one block"
                owners[i] = rank
    assert sorted(owners) == list(range(5)) and len({owners[i] for i in range(4)}) == 4
    topo1 = Topology(rank=0, world_size=1)
    assert not chunking.needs_split(tensors, topo1)


def _rec(dtype="float32", shape=(2,)):
    return TensorEntry(dtype, shape, "f.bin", 0, 8, 8, "raw", "0" * 32)


def test_per_rank_copies_load_by_key_only_when_their_keys_are_disjoint():
    stage0 = ShardEntry({"d": [["0.weight", {"t": 0}], ["lr", 0.1]]}, (_rec(),), (0,))
    stage1 = ShardEntry({"d": [["2.weight", {"t": 0}], ["lr2", 0.1]]}, (_rec(),), (1,))
    entry = ComponentEntry("per_rank", True, "none", None, {"rank0": stage0, "rank1": stage1})
    merged = by_key(entry, "x")
    assert merged is not None and merged.sharded is not None
    assert [t.path for t in merged.sharded.tensors] == [("0.weight",), ("2.weight",)]
    rng = ComponentEntry("per_rank", True, "none", None, {"rank0": stage0, "rank1": stage0})
    assert by_key(rng, "x") is None          # the same keys on every rank: they belong to it


def _save_sharded(tmp_path, stateful):
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("m", stateful, ac.SharingPattern.SHARDED)]) as ck:
        ck.save(1).wait()


def test_a_sharded_load_refuses_mismatches_before_modifying_anything(tmp_path):
    torch.manual_seed(0)
    _save_sharded(tmp_path / "a", torch.nn.Linear(4, 3))
    for live, what in ((torch.nn.Linear(4, 5), "[3, 4]"), (torch.nn.Linear(4, 3).double(), "float32"),
                       (torch.nn.Sequential(torch.nn.Linear(4, 3)), "lacks")):
        before = {k: v.clone() for k, v in live.state_dict().items()}
        with ac.AsyncCheckpointer(tmp_path / "a", [ac.StateComponent("m", live, ac.SharingPattern.SHARDED)]) as ck:
            with pytest.raises(ac.CheckpointError, match=what.replace("[", r"\[")):
                ck.load()
        assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())


def test_an_optimizer_without_state_is_told_to_initialise_it(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    _save_sharded(tmp_path / "o", opt)
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters())
    with ac.AsyncCheckpointer(tmp_path / "o", [ac.StateComponent("m", fresh, ac.SharingPattern.SHARDED)]) as ck:
        with pytest.raises(ac.CheckpointError, match="initialise"):
            ck.load()
    # through OptimizerState, the same load works and is exact
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters())
    m1 = torch.nn.Linear(4, 3)
    o1 = torch.optim.AdamW(m1.parameters())
    m1(torch.ones(1, 4)).sum().backward()
    o1.step()
    _save_sharded(tmp_path / "p", ac.OptimizerState(m1, o1))
    with ac.AsyncCheckpointer(tmp_path / "p", [ac.StateComponent("m", ac.OptimizerState(model2, opt2),
                                                                 ac.SharingPattern.SHARDED)]) as ck:
        ck.load()
    for a, b in itertools.zip_longest(o1.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_full_validation_is_refused_for_sharded_components():
    with pytest.raises(ac.CheckpointError, match="FULL"):
        ac.AsyncCheckpointer("/tmp/unused-x", [ac.StateComponent(
            "m", torch.nn.Linear(2, 2), ac.SharingPattern.SHARDED, validation_level=ac.ValidationLevel.FULL)])


def test_a_dtensor_in_another_pattern_says_to_use_sharded():
    from async_ckpt.format.tree import flatten
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from support.net import free_port
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        dt = distribute_tensor(torch.ones(4), init_device_mesh("cpu", (1,)), [Replicate()])
        with pytest.raises(ac.CheckpointError, match="SHARDED"):
            flatten({"w": dt}, "model")
        tree, tensors = flatten({"w": dt}, "model", dtensors=True)
        assert tensors[0] is not None
    finally:
        dist.destroy_process_group()


def test_tied_weights_in_a_sharded_component_save_once_and_load_into_both(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3, bias=False)
            self.b = torch.nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight
    torch.manual_seed(0)
    saved = Tied()
    _save_sharded(tmp_path, saved)
    live = Tied()
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("m", live, ac.SharingPattern.SHARDED)]) as ck:
        ck.load()
    assert torch.equal(live.a.weight, saved.a.weight) and live.b.weight is live.a.weight


class _Obj:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"obj": self.value, "n": 1}

    def load_state_dict(self, sd):
        self.value = sd["obj"]


def test_pickled_values_in_a_sharded_component_need_the_opt_in_to_load(tmp_path):
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("m", _Obj({1, 2}), ac.SharingPattern.SHARDED)],
                              allow_pickle=True) as ck:
        ck.save(1).wait()
    got = _Obj(None)
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("m", got, ac.SharingPattern.SHARDED)],
                              allow_pickle=True) as ck:
        ck.load()
    assert got.value == {1, 2}
    refused = _Obj(None)
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("m", refused, ac.SharingPattern.SHARDED)]) as ck:
        with pytest.raises(ac.CorruptCheckpointError, match="pickle"):
            ck.load()
    assert refused.value is None
