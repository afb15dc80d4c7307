"""SimpleTrainer: one process, everything GLOBAL.   python examples/trainers/simple.py [ROOT]"""
import torch
from common import Pairs, adamw, model, root, warmup

from async_ckpt.trainers import SimpleTrainer, TrainingArguments

args = TrainingArguments(root("simple"), max_steps=200, batch_size=16, save_steps=50, keep_last=2,
                         keep_best=1, best_metric="eval_loss", eval_steps=50)


def evaluate(m):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    return {"eval_loss": torch.nn.functional.mse_loss(m(x), x.sum(1, keepdim=True).sin())}


result = SimpleTrainer(args, model(), Pairs(), torch.nn.functional.mse_loss, adamw,
                       lr_scheduler_factory=warmup, eval_fn=evaluate).train()
print(f"stopped at step {result.step}" + (" (preempted: run again to resume)" if result.preempted else ""))
