"""Child of tests/test_trainers.py: one trainer of the table on a tiny regression problem.

  python trainer_run.py KIND ROOT OUT [--kill-at K | --kill-in-save K]      (or under torchrun)

KIND: simple, ddp, ddp_dispatch, pipeline, hybrid, accel. Each rank appends
``{"step": s, "loss": float.hex()}`` per step to ``OUT.rank<r>.jsonl``; at the end rank 0 writes
the retained steps to ``OUT.retained.json``. ``--kill-at K``: SIGKILL at the end of step K (before
its save); ``--kill-in-save K``: SIGKILL right after ``save(K)`` returned (the save in flight).
"""
from __future__ import annotations

import argparse
import json
import os
import signal

import torch

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
           "pipeline": tr.PipelineTrainer, "hybrid": tr.HybridPipelineTrainer}.get(a.kind)
    if a.kind == "ddp_dispatch":
        kw["dispatch_batches"] = True
    if a.kind == "accel":
        from accelerate import Accelerator
        cls, kw["accelerator"] = tr.AccelTrainer, Accelerator(cpu=True)

    class Run(cls):  # type: ignore[valid-type, misc]
        def on_step_end(self, step: int, loss: float) -> None:
            with open(f"{a.out}.rank{self.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.hex()}) + "\n")
            if step == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = Run(args, build_model(), Pairs(), torch.nn.functional.mse_loss,
                  lambda params: torch.optim.AdamW(params, lr=1e-2), **kw)
    save = trainer.checkpointer.save

    def save_then_die(step, metrics=None):
        handle = save(step, metrics)
        if step == a.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return handle
    trainer.checkpointer.save = save_then_die  # type: ignore[method-assign]
    result = trainer.train()
    if trainer.rank == 0:
        from async_ckpt import AsyncCheckpointer
        with AsyncCheckpointer(a.root, []) as ck:
            steps = [i.step for i in ck.list_checkpoints()]
        with open(f"{a.out}.retained.json", "w") as f:
            json.dump({"steps": steps, "end": result.step}, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
