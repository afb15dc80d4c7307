"""Child of tests/test_trainers.py: one trainer of the table on a tiny regression problem.

  python trainer_run.py KIND ROOT OUT [--kill-at K | --kill-in-save K]      (or under torchrun)

KIND: simple, ddp, ddp_dispatch, pipeline, hybrid, accel, fsdp, dptp (DP x TP, tp=2). Each rank appends
``{"step": s, "loss": float.hex()}`` per step to ``OUT.rank<r>.jsonl``; at the end rank 0 writes
the retained steps to ``OUT.retained.json``. ``--kill-at K``: SIGKILL at the end of step K (before
its save); ``--kill-in-save K``: SIGKILL right after ``save(K)`` returned (the save in flight).
``--reshard``: resume at another topology: everything but the data position and RNG (which belong
to the old topology), the SHARDED model and optimizer resharded. ``--digest``: every rank writes the full (gathered) model and optimizer tensors' hashes right after
resuming to ``OUT.resumed.rank<r>.json`` and at the end to ``OUT.final.rank<r>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal

import torch
from async_ckpt import end_process

N, DIM = 48, 6


class Pairs(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(DIM, generator=g)
        return x, x.sum(dim=0, keepdim=True).sin()


def build_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def build_mlp():
    """The 2-layer MLP of the default tensor-parallel plan (column-wise, row-wise)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(16, 1))


def digest(model, opt) -> dict:
    """Hashes of the full tensors (DTensors gathered: every rank takes part, in the same order)."""
    import hashlib
    out = {}

    def put(name, t):
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        if isinstance(t, torch.Tensor):
            out[name] = hashlib.sha1(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                     ).hexdigest()[:16]
    for k, v in model.state_dict().items():
        put(f"model/{k}", v)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for k, v in sorted(state.items()):
            put(f"opt/{names[id(p)]}/{k}", v)
    return out


def eval_fn(model) -> dict:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, DIM, generator=g)
    return {"eval_loss": torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin()).item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind")
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--kill-in-save", type=int, default=-1)
    parser.add_argument("--digest", action="store_true")
    parser.add_argument("--reshard", action="store_true")
    a = parser.parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ and a.kind != "accel":
        torch.distributed.init_process_group("gloo")
    from async_ckpt.trainers import TrainingArguments
    import async_ckpt.trainers as tr

    pipelined = a.kind in ("pipeline", "hybrid")
    args = TrainingArguments(a.root, max_steps=a.steps, batch_size=4, seed=3, save_steps=3,
                             keep_last=2, keep_best=0 if pipelined else 1,
                             best_metric=None if pipelined else "eval_loss",
                             eval_steps=None if pipelined else 3, checkpoint_options={"timeout_s": 60})
    kw = dict(lr_scheduler_factory=lambda opt: torch.optim.lr_scheduler.LinearLR(opt, 0.2, 1.0, total_iters=8),
              eval_fn=None if pipelined else eval_fn)
    cls = {"simple": tr.SimpleTrainer, "ddp": tr.DDPTrainer, "ddp_dispatch": tr.DDPTrainer,
           "pipeline": tr.PipelineTrainer, "hybrid": tr.HybridPipelineTrainer, "fsdp": tr.FSDP2Trainer,
           "dptp": tr.TPTrainer}.get(a.kind)
    if a.kind == "ddp_dispatch":
        kw["dispatch_batches"] = True
    if a.kind == "accel":
        from accelerate import Accelerator
        cls, kw["accelerator"] = tr.AccelTrainer, Accelerator(cpu=True)

    class Run(cls):  # type: ignore[valid-type, misc]
        def resume(self) -> int:
            if a.reshard:      # another topology: model, optimizer (resharded), scheduler, progress
                from async_ckpt import AsyncCheckpointer

                def comps():
                    return [c for c in self.get_state_components() if c.key not in ("data", "rng")]
                with AsyncCheckpointer(a.root, comps) as source:
                    info = source.load()
                step = 0 if info is None else info.step
            else:
                step = super().resume()
            if a.digest:
                with open(f"{a.out}.resumed.rank{self.rank}.json", "w") as f:
                    json.dump({"step": step, "digest": digest(self.module, self.optimizer)}, f)
            return step

        def on_step_end(self, step: int, loss: float) -> None:
            with open(f"{a.out}.rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.hex()}) + "\n")
            if step == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = Run(args, build_mlp() if a.kind == "dptp" else build_model(), Pairs(), torch.nn.functional.mse_loss,
                  lambda params: torch.optim.AdamW(params, lr=1e-2), **kw)
    save = trainer.checkpointer.save

    def save_then_die(step, metrics=None):
        handle = save(step, metrics)
        if step == a.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return handle
    trainer.checkpointer.save = save_then_die  # type: ignore[method-assign]
    result = trainer.train()
    if a.digest:
        with open(f"{a.out}.final.rank{trainer.rank}.json", "w") as f:
            json.dump({"step": result.step, "digest": digest(trainer.module, trainer.optimizer)}, f)
    if trainer.rank == 0:
        from async_ckpt import AsyncCheckpointer
        with AsyncCheckpointer(a.root, []) as ck:
            steps = [i.step for i in ck.list_checkpoints()]
        with open(f"{a.out}.retained.json", "w") as f:
            json.dump({"steps": steps, "end": result.step}, f)
    if torch.distributed.is_initialized():
        end_process()


if __name__ == "__main__":
    main()
