"""FSDP2Trainer: model and optimizer SHARDED (fully_shard over every rank); data PER_RANK.

    torchrun --nproc-per-node 2 examples/trainers/fsdp.py [ROOT]
"""
import torch
from common import Pairs, adamw, init_distributed, model, root, warmup

from async_ckpt import end_process
from async_ckpt.trainers import FSDP2Trainer, TrainingArguments

init_distributed()
args = TrainingArguments(root("fsdp"), max_steps=200, batch_size=8, save_steps=50, keep_last=2)
FSDP2Trainer(args, model(), Pairs(), torch.nn.functional.mse_loss, adamw, lr_scheduler_factory=warmup).train()
end_process()   # instead of returning: avoids torch's gloo exit race (async_ckpt/dist/ending.py)
