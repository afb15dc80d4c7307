"""Child of tests/test_integrations.py: the Accelerate helpers in a hand-written loop, and the
Hugging Face Trainer with AsyncCheckpointCallback (a 2-layer GPT-2 built from a config).

  python integration_run.py KIND ROOT OUT [--kill-at K | --kill-in-save K]    (or under torchrun)

KIND: accelerate (StatefulDataLoader over ResumableSampler, not prepared), accelerate_prepared
(the loader prepared with use_stateful_dataloader) or hf. Records as tests/helpers/trainer_run.py.
"""
from __future__ import annotations

import argparse
import json
import os
import signal

import torch

from trainer_run import DIM, N, Pairs  # noqa: F401 - the trainers' problem (this folder is on sys.path)


def record(out: str, rank: int, step: int, loss: float) -> None:
    with open(f"{out}.rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "loss": loss.hex()}) + "\n")


def retained(root: str, out: str, end: int) -> None:
    from async_ckpt import AsyncCheckpointer
    with AsyncCheckpointer(root, []) as ck:
        steps = [i.step for i in ck.list_checkpoints()]
    with open(f"{out}.retained.json", "w") as f:
        json.dump({"steps": steps, "end": end}, f)


def run_accelerate(a, prepared: bool) -> None:
    from accelerate import Accelerator, DataLoaderConfiguration
    from torchdata.stateful_dataloader import StatefulDataLoader

    import async_ckpt as ac
    from async_ckpt.integrations.accelerate import components, resume

    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=prepared))
    rank = acc.process_index
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 0.2, 1.0, total_iters=8)
    model, opt, sched = acc.prepare(model, opt, sched)
    torch.manual_seed(10 + rank)
    gen = torch.Generator().manual_seed(20 + rank)
    if prepared:
        sampler = ac.ResumableSampler(Pairs(), num_replicas=1, rank=0, seed=3)
        loader = acc.prepare_data_loader(StatefulDataLoader(Pairs(), batch_size=8, sampler=sampler))
    else:
        sampler = ac.ResumableSampler(Pairs(), seed=3)
        loader = StatefulDataLoader(Pairs(), batch_size=4, sampler=sampler, generator=gen)
    comps = components(acc, model=model, optimizer=opt, lr_scheduler=sched, dataloader=loader,
                       generators={"loader": gen})
    ckpt = ac.AsyncCheckpointer(a.root, comps, keep_last=2, timeout_s=60)
    step, batches = resume(ckpt, loader)
    while step < a.steps:
        step += 1
        x, y = next(batches)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        acc.backward(loss)
        opt.step()
        sched.step()
        record(a.out, rank, step, float(acc.reduce(loss.detach(), reduction="mean")))
        if step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step % 3 == 0:
            ckpt.save(step)
            if step == a.kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    if rank == 0:
        retained(a.root, a.out, step)


def run_hf(a) -> None:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    from async_ckpt.integrations.hf import AsyncCheckpointCallback

    rank = int(os.environ.get("RANK", "0"))
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    transformers.set_seed(0)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (40, 16), generator=g)
    train = [{"input_ids": r, "labels": r} for r in ids[:32]]
    evals = [{"input_ids": r, "labels": r} for r in ids[32:]]
    args = transformers.TrainingArguments(
        output_dir=os.path.join(os.path.dirname(a.out), f"hf-{os.path.basename(a.out)}"), max_steps=a.steps,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-3, warmup_steps=3,
        save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3, logging_steps=50,
        use_cpu=True, report_to=[], seed=0, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        disable_tqdm=True)

    class Callback(AsyncCheckpointCallback):
        def _save(self, step, metrics):
            super()._save(step, metrics)
            if step == a.kill_in_save:
                os.kill(os.getpid(), signal.SIGKILL)

        def on_step_end(self, args, state, control, **kw):
            super().on_step_end(args, state, control, **kw)
            if state.global_step == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    class Recording(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training:
                reduced = loss.detach().clone()
                if torch.distributed.is_initialized():
                    torch.distributed.all_reduce(reduced)
                    reduced /= torch.distributed.get_world_size()
                record(a.out, rank, self.state.global_step + 1, float(reduced))
            return loss

    cb = Callback(a.root, keep_last=2, keep_best=1, best_metric="eval_loss", timeout_s=60)
    trainer = Recording(model=model, args=args, train_dataset=train, eval_dataset=evals, callbacks=[cb])
    out = trainer.train(resume_from_checkpoint=cb.resume(trainer))
    if rank == 0:
        retained(a.root, a.out, out.global_step)


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
    if a.kind == "hf":
        run_hf(a)
    else:
        run_accelerate(a, prepared=a.kind == "accelerate_prepared")


if __name__ == "__main__":
    main()
