"""What the trainer layer (async_ckpt.trainers) costs per step when it does not save, against a
bare loop over the same model, loader and checkpointer.

Both run the same work per step: the next batch of a StatefulDataLoader over a ResumableSampler,
forward, backward, AdamW step, LR scheduler step, ``float(loss)``. The bare loop does nothing
else; the SimpleTrainer adds its bookkeeping (schedule, progress, preemption flag, hooks). Runs
alternate (bare, trainer, bare, ...) so both see the same machine load. Two measures:

- *paired*: median step time of the trainer's runs minus the bare loop's (noisy on a busy machine);
- *direct*: inside the trainer, each step's wall time minus the time spent in ``next_batch`` and
  ``train_step`` (the work the bare loop does too): the trainer layer alone, free of that noise.

    python -m bench.training_loop --trainer-overhead [--steps 300] [--repeats 5]
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch

from async_ckpt import AsyncCheckpointer, ResumableSampler, SharingPattern, StateComponent
from async_ckpt.trainers import SimpleTrainer, TrainingArguments
from async_ckpt.trainers.base import forever


def _setup(width: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
    data = torch.utils.data.TensorDataset(torch.randn(4096, 32), torch.randn(4096, 1))
    return model, data


def _opt(params):
    return torch.optim.AdamW(params, lr=1e-3)


def _sched(opt):
    return torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=100)


def bare(root: str, steps: int, width: int) -> list[float]:
    from torchdata.stateful_dataloader import StatefulDataLoader
    model, data = _setup(width)
    opt, gen = _opt(model.parameters()), torch.Generator().manual_seed(0)
    sched = _sched(opt)
    loader = StatefulDataLoader(data, batch_size=16, sampler=ResumableSampler(data, num_replicas=1, rank=0),
                                generator=gen)
    ckpt = AsyncCheckpointer(root, [StateComponent("model", model, SharingPattern.GLOBAL),
                                    StateComponent("optimizer", opt, SharingPattern.GLOBAL),
                                    StateComponent("data", loader, SharingPattern.GLOBAL)])
    times, batches = [], forever(loader)
    for _ in range(steps):
        t = time.perf_counter()
        x, y = next(batches)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        float(loss.detach())
        times.append(time.perf_counter() - t)
    ckpt.close()
    return times


def trainer(root: str, steps: int, width: int) -> tuple[list[float], list[float]]:
    model, data = _setup(width)
    args = TrainingArguments(root, max_steps=steps, batch_size=16, save_strategy="no", resume_from_checkpoint=False)
    work: list[float] = []
    marks: list[float] = []

    class Timed(SimpleTrainer):
        def next_batch(self, batches):
            t = time.perf_counter()
            out = super().next_batch(batches)
            self._t = time.perf_counter() - t
            return out

        def train_step(self, batch):
            t = time.perf_counter()
            out = super().train_step(batch)
            work.append(self._t + time.perf_counter() - t)
            return out

        def on_step_end(self, step, loss):
            marks.append(time.perf_counter())

    Timed(args, model, data, torch.nn.functional.mse_loss, _opt, lr_scheduler_factory=_sched).train()
    steps_wall = [b - a for a, b in zip(marks, marks[1:])]
    return steps_wall, [w - x for w, x in zip(steps_wall, work[1:])]


def run(steps: int = 300, repeats: int = 5, width: int = 64) -> str:
    torch.set_num_threads(1)
    bare_med, tr_med, direct = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for r in range(repeats):
            b = bare(f"{folder}/b{r}", steps, width)[steps // 10:]
            t, layer = trainer(f"{folder}/t{r}", steps, width)
            bare_med.append(statistics.median(b))
            tr_med.append(statistics.median(t[steps // 10:]))
            direct.append(statistics.median(layer[steps // 10:]))
    b, t, d = statistics.median(bare_med), statistics.median(tr_med), statistics.median(direct)
    lines = [f"### Trainer layer per step (no save): MLP 32-{width}-1, batch 16, AdamW + LinearLR, "
             f"{steps} steps x {repeats} alternating runs, torch threads 1\n",
             "| measure | bare loop | SimpleTrainer | trainer / bare |", "|---|---|---|---|",
             f"| median step time | {b * 1e3:.3f} ms | {t * 1e3:.3f} ms | {t / b:.3f}x |",
             f"| trainer layer alone (direct) | - | {d * 1e3:.4f} ms | {(b + d) / b:.3f}x |",
             "", f"Per-run medians, bare: {[round(x * 1e3, 3) for x in bare_med]} ms; trainer: "
             f"{[round(x * 1e3, 3) for x in tr_med]} ms; layer: {[round(x * 1e3, 4) for x in direct]} ms."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(*(int(a) for a in sys.argv[1:])))
