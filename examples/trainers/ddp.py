"""DDPTrainer: model and optimizer REPLICATED; data PER_RANK, or GLOBAL with --dispatch.

    torchrun --nproc-per-node 2 examples/trainers/ddp.py [ROOT] [--dispatch]
"""
import sys

import torch
from common import Pairs, adamw, init_distributed, model, root, warmup

from async_ckpt import end_process
from async_ckpt.trainers import DDPTrainer, TrainingArguments

init_distributed()
dispatch = "--dispatch" in sys.argv
sys.argv = [a for a in sys.argv if a != "--dispatch"]
args = TrainingArguments(root("ddp"), max_steps=200, batch_size=8, save_steps=50, keep_last=2)
DDPTrainer(args, model(), Pairs(), torch.nn.functional.mse_loss, adamw, lr_scheduler_factory=warmup,
           dispatch_batches=dispatch).train()
end_process()   # instead of returning: avoids torch's gloo exit race (async_ckpt/dist/ending.py)
