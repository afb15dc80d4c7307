"""One rank of a DP x PP run (torch.distributed.pipelining), launched by tests/test_pipeline_groups.py.

    pipeline_worker.py SCENARIO ROOT OUT MODE PP DP [PATTERN]
    pipeline_worker.py plan OUT OUT PLAN.json      (several runs in one launch: support.dist.run_plan)

A ("pp", "dp") mesh; each pipeline stage is a slice of one Sequential model (original parameter
names kept), trained with ScheduleGPipe over the pp group, its gradients averaged over the dp
group. MODE ``save`` trains 3 steps and saves step 3; ``load`` builds the model from another
seed, trains 1 step (so the optimizer has state), loads the newest step and trains one more;
``diverge`` is ``save`` with the last rank's first parameter one ulp off.
PATTERN ``group`` (default): model and optimizer are PER_GROUP with ``mesh["dp"]`` as their
group, so copies are named by pipeline coordinate; ``sharded``: both are SHARDED through
ac.ModelState/ac.OptimizerState (fully-qualified keys), replicated over ``mesh["dp"]``;
``perrank``: both PER_RANK through those helpers, plus a PER_RANK RNG with required=False.
Every rank writes OUT/SCENARIO-r<rank>.json: its stage, a digest of its stage's model and
optimizer state, and the loss of the step after loading (last stage). A plan runs its steps
({"label", "root", "args": [MODE, PP, DP, PATTERN]}, PP x DP the launch's world) one after the
other in one process group, each on its own mesh, writing OUT/<label>-r<rank>.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist

import async_ckpt as ac
from async_ckpt import end_process


def digest_of(state) -> str:
    h = hashlib.sha1()

    def walk(o):
        if isinstance(o, torch.Tensor):
            h.update(o.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(str(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        else:
            h.update(repr(o).encode())
    walk(state)
    return h.hexdigest()[:16]


def main() -> None:
    dist.init_process_group("gloo")
    if sys.argv[1] == "plan":
        with open(sys.argv[4]) as f:
            for step in json.load(f):
                one_run(step["label"], step["root"], sys.argv[3], *step["args"])
                dist.barrier()
    else:
        one_run(*sys.argv[1:8])
    end_process()


def one_run(scenario: str, root: str, out: str, mode: str, pp_arg: str, dp_arg: str,
            pattern: str = "group") -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
    pp, dp = int(pp_arg), int(dp_arg)
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (pp, dp), mesh_dim_names=("pp", "dp"))
    stage_index = mesh.get_local_rank("pp")
    torch.manual_seed(0 if mode == "save" else 7)
    full = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                               torch.nn.ReLU(), torch.nn.Linear(32, 8))
    cut = [slice(0, 2), slice(2, 5)] if pp == 2 else [slice(0, 5)]
    module = full[cut[stage_index]]
    opt = torch.optim.AdamW(module.parameters(), lr=0.01)
    stage = PipelineStage(module, stage_index, pp, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = ScheduleGPipe(stage, n_microbatches=2, loss_fn=lambda y, t: (y - t).square().mean())
    dp_group = mesh["dp"].get_group()

    def train(step: int) -> float | None:
        g = torch.Generator().manual_seed(1000 + step)
        x, target = torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g)
        losses: list = []
        if stage_index == 0 and pp > 1:
            schedule.step(x)
        elif stage_index == pp - 1 and pp > 1:
            schedule.step(target=target, losses=losses)
        else:
            schedule.step(x, target=target, losses=losses)
        if dp > 1:
            for p in module.parameters():
                dist.all_reduce(p.grad, group=dp_group)
                p.grad /= dp
        opt.step()
        opt.zero_grad()
        return float(sum(losses)) if losses else None

    for step in range(1 if mode == "load" else 3):
        train(step)
    if mode == "diverge" and rank == dist.get_world_size() - 1:   # one replica one ulp off
        with torch.no_grad():
            p = next(module.parameters())
            p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf")))
    if pattern == "perrank":
        comps = [ac.StateComponent("model", ac.ModelState(module), ac.SharingPattern.PER_RANK),
                 ac.StateComponent("optim", ac.OptimizerState(module, opt), ac.SharingPattern.PER_RANK),
                 ac.StateComponent("rng", ac.RNGState(), ac.SharingPattern.PER_RANK, required=False)]
    elif pattern == "sharded":
        comps = [ac.StateComponent("model", ac.ModelState(module), ac.SharingPattern.SHARDED,
                                   process_group=mesh["dp"]),
                 ac.StateComponent("optim", ac.OptimizerState(module, opt), ac.SharingPattern.SHARDED,
                                   process_group=mesh["dp"])]
    else:
        comps = [ac.StateComponent("model", module, ac.SharingPattern.PER_GROUP, process_group=mesh["dp"]),
                 ac.StateComponent("optim", opt, ac.SharingPattern.PER_GROUP, process_group=mesh["dp"])]
    result: dict = {"rank": rank, "stage": stage_index}
    if mode == "diverge":
        for c in comps:
            c.validation_level = ac.ValidationLevel.TENSOR
    with ac.AsyncCheckpointer(root, comps, timeout_s=60) as ckpt:
        try:
            if mode != "load":
                ckpt.save(3).wait()
            else:
                info = ckpt.load()
                result["loaded"] = None if info is None else info.step
        except ac.CheckpointError as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
    result["digest"] = digest_of({"model": module.state_dict(),
                                  "optim": {k: v for k, v in opt.state_dict()["state"].items()}})
    result["next_loss"] = train(3) if "error" not in result else None
    with open(os.path.join(out, f"{scenario}-r{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
