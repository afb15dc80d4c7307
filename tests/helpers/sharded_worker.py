"""One rank of a SHARDED (DTensor) scenario, launched by torchrun from tests/test_sharded*.py.

    sharded_worker.py SCENARIO ROOT OUT PARALLEL MODE [DP [full]]

PARALLEL: ``fsdp`` (FSDP2 over every rank), ``tp`` (1-D tensor parallel over every rank),
``dptp`` (a (dp, tp) mesh: tensor parallel inside, data-parallel replicas across). MODE ``save``
trains a few deterministic steps and saves step 3; ``load`` builds the same model from another
seed, loads the newest step and reports; ``diverge`` nudges one replica by one ulp before saving.
With ``full``, the model and the optimizer are GLOBAL consolidated copies instead
(``ac.ModelState(model, full_state_dict=True)``, ``ac.OptimizerState(model, opt, full_state_dict=True)``);
a load then reports how
many storages the model state handed to each rank spans (one: views of the node's shared buffer).
Every rank writes OUT/SCENARIO-r<rank>.json: a digest of the full (gathered) model and optimizer
state, the loss of one fixed forward pass, and the error of the save or load, if any.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import async_ckpt as ac
from async_ckpt import end_process


def build(parallel: str, dp: int, seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    world = dist.get_world_size()
    group = None
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        if parallel == "tp":
            tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        else:
            mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
            tp_mesh = mesh["tp"]
            group = mesh["dp"].get_group() if dp > 1 else None
        parallelize_module(model, tp_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, opt, group


def data(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 16, generator=g)


def train(model, opt, steps: int) -> None:
    for step in range(steps):
        loss = model(data(step)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def digest(model, opt) -> dict:
    """Full tensors (every rank takes part in the gathers, in the same order)."""
    from torch.distributed.tensor import DTensor
    out = {}

    def put(name, t):
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if isinstance(t, torch.Tensor):
            out[name] = hashlib.sha1(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                     ).hexdigest()[:16]
        else:
            out[name] = repr(t)
    for k, v in model.state_dict().items():
        put(f"model/{k}", v)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for k, v in sorted(state.items()):
            put(f"opt/{names[id(p)]}/{k}", v)
    return out


def main() -> None:
    scenario, root, out, parallel, mode = sys.argv[1:6]
    dp = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    full = len(sys.argv) > 7 and sys.argv[7] == "full"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict = {"rank": rank, "world": dist.get_world_size()}
    model, opt, group = build(parallel, dp, seed=0 if mode != "load" else 7)
    train(model, opt, 1 if mode == "load" else 3)     # a loaded optimizer needs its state to exist
    comps = [ac.StateComponent("model", model, ac.SharingPattern.SHARDED, process_group=group),
             ac.StateComponent("optim", opt, ac.SharingPattern.SHARDED, process_group=group)]
    if full:
        class Recording(ac.ModelState):
            def load_state_dict(self, state):
                result["storages"] = len({v.untyped_storage().data_ptr() for v in state.values()})
                super().load_state_dict(state)
        comps = [ac.StateComponent("model", Recording(model, full_state_dict=True), ac.SharingPattern.GLOBAL),
                 ac.StateComponent("optim", ac.OptimizerState(model, opt, full_state_dict=True),
                                   ac.SharingPattern.GLOBAL)]
    if mode == "diverge" and rank == dist.get_world_size() - 1:
        with torch.no_grad():
            w = model[2].bias.to_local() if hasattr(model[2].bias, "to_local") else model[2].bias
            w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))
    ckpt = ac.AsyncCheckpointer(root, comps, timeout_s=60)
    try:
        if mode == "load":
            info = ckpt.load()
            result["loaded"] = None if info is None else info.step
        else:
            ckpt.save(3).wait()
            result["saved"] = 3
    except ac.CheckpointError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            ckpt.close()
        except ac.CheckpointError as exc:
            result.setdefault("error", f"{type(exc).__name__}: {exc}")
    result["digest"] = digest(model, opt)
    with torch.no_grad():
        result["loss"] = float(model(data(99)).square().mean())
    with open(os.path.join(out, f"{scenario}-r{rank}.json"), "w") as f:
        json.dump(result, f)
    end_process()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
