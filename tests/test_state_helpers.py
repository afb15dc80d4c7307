"""ModelState / OptimizerState (async_ckpt/training/state.py): DCP-keyed model and optimizer
state, round-tripped bit-exactly through AsyncCheckpointer, on one process and under DDP."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import async_ckpt as ac
from support.paths import HELPERS, child_env


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    return model, opt


def train(model, opt, steps: int, seed: int = 1) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(5, 4, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def components(model, opt, full: bool = False):
    return [ac.StateComponent("model", ac.ModelState(model, full_state_dict=full), ac.SharingPattern.GLOBAL),
            ac.StateComponent("optimizer", ac.OptimizerState(model, opt, full_state_dict=full),
                              ac.SharingPattern.GLOBAL)]


FULL = pytest.mark.parametrize("full", [False, True], ids=["dcp-default", "full_state_dict"])


def test_keys_are_fully_qualified_and_optimizer_state_flattened():
    model, opt = build()
    train(model, opt, 1)
    assert sorted(ac.ModelState(model).state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    keys = set(ac.OptimizerState(model, opt).state_dict())
    assert {"state.0.weight.exp_avg", "state.2.bias.step", "param_groups.0.weight.betas",
            "param_groups.2.bias.eps", "param_groups.2.bias.lr"} <= keys


@FULL
def test_round_trip_into_a_fresh_optimizer_is_bit_exact(tmp_path, full):
    model, opt = build()
    train(model, opt, 3)
    with ac.AsyncCheckpointer(tmp_path, components(model, opt, full)) as ck:
        ck.save(3).wait()
    want = train(model, opt, 3, seed=2)          # the uninterrupted continuation

    fresh, fresh_opt = build(seed=9)              # other weights, optimizer without state
    assert not fresh_opt.state
    with ac.AsyncCheckpointer(tmp_path, components(fresh, fresh_opt, full)) as ck:
        assert ck.load().step == 3
    group = fresh_opt.param_groups[0]
    assert tuple(group["betas"]) == (0.8, 0.95) and group["eps"] == 1e-6 and group["weight_decay"] == 0.1
    assert int(fresh_opt.state[fresh[0].weight]["step"]) == 3
    assert train(fresh, fresh_opt, 3, seed=2) == want


@FULL
def test_saving_before_the_first_step_leaves_the_optimizer_untouched(tmp_path, full):
    model, opt = build()
    with ac.AsyncCheckpointer(tmp_path, components(model, opt, full)) as ck:
        ck.save(0).wait()
    assert not opt.state and all(p.grad is None for p in model.parameters())
    want = train(model, opt, 2)
    other, other_opt = build()
    train(other, other_opt, 2)                    # has state: the load must drop it
    with ac.AsyncCheckpointer(tmp_path, components(other, other_opt, full)) as ck:
        ck.load()
    assert not other_opt.state
    assert train(other, other_opt, 2) == want


@FULL
def test_betas_and_eps_of_every_param_group_survive(tmp_path, full):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam([{"params": model[0].parameters(), "betas": (0.5, 0.6), "eps": 1e-3},
                            {"params": model[1].parameters(), "lr": 0.5}], lr=1e-2)
    train(model, opt, 1)
    with ac.AsyncCheckpointer(tmp_path, components(model, opt, full)) as ck:
        ck.save(1).wait()
    torch.manual_seed(0)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt2 = torch.optim.Adam([{"params": model2[0].parameters()}, {"params": model2[1].parameters()}], lr=1e-3)
    with ac.AsyncCheckpointer(tmp_path, components(model2, opt2, full)) as ck:
        ck.load()
    g0, g1 = opt2.param_groups
    assert (tuple(g0["betas"]), g0["eps"], g0["lr"]) == ((0.5, 0.6), 1e-3, 1e-2)
    assert (tuple(g1["betas"]), g1["eps"], g1["lr"]) == ((0.9, 0.999), 1e-8, 0.5)


def test_wrong_model_is_refused_before_anything_is_restored(tmp_path):
    model, opt = build()
    train(model, opt, 1)
    with ac.AsyncCheckpointer(tmp_path, components(model, opt)) as ck:
        ck.save(1).wait()
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    other_opt = torch.optim.AdamW(other.parameters())
    before = [p.clone() for p in other.parameters()]
    with ac.AsyncCheckpointer(tmp_path, components(other, other_opt)) as ck:
        with pytest.raises(ac.CheckpointError, match="ModelState: saved tensors do not match"):
            ck.load()
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))


def test_prefixed_keys_of_a_raw_ddp_module_get_a_hint():
    model, _ = build()
    raw = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(ac.CheckpointError, match="'module.' prefix"):
        ac.ModelState(model).check_state_dict(raw)


@pytest.mark.multiproc
def test_ddp_two_ranks_keys_without_module_prefix_load_into_unwrapped(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(HELPERS / "state_helpers_ddp.py"), str(tmp_path / "ck"), str(out)],
                          env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        r = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert r["step"] == 3 and r["keys"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert r["same_params"] and r["same_state"] and r["n_state"] == 4
        assert r["betas"] == [0.8, 0.95] and r["eps"] == 1e-6
