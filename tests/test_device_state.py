"""State that lives on an accelerator: every test runs on the CPU and, where CUDA is present, on
the GPU too (the same assertions; on a GPU machine run `bash scripts/gpu_check.sh`).

What CUDA adds and these tests pin down: the device-to-host copies run on a side stream into
page-locked buffers, so (1) save() must order its copies after work already queued on the
compute stream, (2) a tensor mutated right after save() returns (or, with overlap_staging, after
wait_staged()) must not leak into the checkpoint, (3) the staging buffers, the shared-memory ones
of non-writer ranks included, must be page-locked, and (4) loading must put tensors back on the
device with the optimizer state beside its parameters.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import async_ckpt as ac
from bench.common import TensorState
from support.compare import assert_same
from support.paths import HELPERS, child_env

pytestmark = pytest.mark.gpu

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_model(device: str, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    model.register_buffer("scale16", torch.randn(1000).to(torch.bfloat16))
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train(model, opt, steps: int, device: str) -> None:
    for _ in range(steps):
        loss = model(torch.randn(32, 256, device=device)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def cpu_copy(obj):
    """A snapshot on the CPU, with the containers' types (and a module state dict's _metadata)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, cpu_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def components(model, opt):
    return [ac.StateComponent("model", model, ac.SharingPattern.GLOBAL),
            ac.StateComponent("optim", opt, ac.SharingPattern.GLOBAL),
            ac.StateComponent("rng", ac.RNGState(), ac.SharingPattern.PER_RANK)]


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
@pytest.mark.parametrize("device", DEVICES)
def test_mutation_after_save_stays_out_of_the_checkpoint(tmp_path, device, overlap):
    model, opt = make_model(device)
    train(model, opt, 2, device)
    want_model, want_opt = cpu_copy(model.state_dict()), cpu_copy(opt.state_dict())
    with ac.AsyncCheckpointer(tmp_path, components(model, opt), overlap_staging=overlap) as ck:
        handle = ck.save(1)
        if overlap:
            handle.wait_staged()
        draws = torch.randn(8, device=device).cpu()     # what the restored RNG must repeat
        train(model, opt, 3, device)                    # in-place updates, queued at once
        handle.wait()
    assert not torch.equal(model[0].weight.detach().cpu(), want_model["0.weight"])

    model2, opt2 = make_model(device, seed=1)
    train(model2, opt2, 1, device)                      # optimizer state exists, and differs
    with ac.AsyncCheckpointer(tmp_path, components(model2, opt2)) as ck:
        assert ck.load().step == 1
    assert_same(model2.state_dict(), want_model, "model")
    assert_same(opt2.state_dict(), want_opt, "optim")
    assert all(p.device.type == device for p in model2.parameters())
    for p in model2.parameters():
        for v in opt2.state[p].values():
            if v.dim():                                  # moments live beside their parameter
                assert v.device == p.device
    assert torch.equal(torch.randn(8, device=device).cpu(), draws)


@pytest.mark.parametrize("device", DEVICES)
def test_save_orders_its_copies_after_queued_work(tmp_path, device):
    """The value saved is the one the compute stream produces just before save(), although
    nothing synchronises in between (on CUDA the copies run on a side stream)."""
    src = torch.randn(16 << 20, generator=torch.Generator().manual_seed(3))     # 64 MiB fp32
    want = torch.zeros_like(src)
    for _ in range(4):
        want = want.mul(0.5).add(src)
    big, src_d = torch.zeros(src.shape, device=device), src.to(device)
    slow = torch.randn(2048, 2048, device=device)
    comp = ac.StateComponent("t", TensorState({"big": big}), ac.SharingPattern.GLOBAL)
    with ac.AsyncCheckpointer(tmp_path, [comp], overlap_staging=True) as ck:
        ck.save(1).wait()                                 # buffers exist: the next save is fast
        for _ in range(8):                                # keep the compute stream busy ...
            slow = torch.tanh(slow @ slow)
        big.add_(slow.sum() * 0)                          # ... and make `big` wait for it
        for _ in range(4):
            big.mul_(0.5).add_(src_d)                     # queued, unfinished, when save() runs
        handle = ck.save(2)
        handle.wait_staged()
        big.fill_(-1.0)
        handle.wait()
        ck.load(2)
    assert torch.equal(big.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_staging_buffers_are_page_locked_with_cuda(tmp_path, device):
    model, opt = make_model(device)
    with ac.AsyncCheckpointer(tmp_path, components(model, opt)) as ck:
        ck.save(1).wait()
        (buf,) = ck._pool._free
        assert buf.tensor.is_pinned() == torch.cuda.is_available()


@pytest.mark.multiproc
@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_share_one_device(tmp_path, device):
    """Rank 1 stages into a shared-memory buffer for rank 0's writer: it must be page-locked with
    CUDA, and both ranks' state must come back bit-exact on the device."""
    env = child_env()
    reports = {}
    for mode in ("save", "load"):
        out = tmp_path / f"{mode}.json"
        proc = subprocess.run([sys.executable, str(HELPERS / "device_ranks.py"), str(tmp_path / "ck"),
                               str(out), mode, device], env=env, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reports[mode] = json.loads(out.read_text())
    saved = {r["rank"]: r for r in reports["save"]}
    assert saved[0]["shared"] is False and saved[1]["shared"] is True
    for r in saved.values():
        assert r["page_locked"] == torch.cuda.is_available(), r
    for r in reports["load"]:
        assert r["step"] == 1 and r["on_device"], r
        assert r["equal"] and all(r["equal"].values()), r

