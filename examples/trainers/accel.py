"""AccelTrainer (Hugging Face Accelerate): REPLICATED / REPLICATED / PER_RANK.

    accelerate launch --multi_gpu --num_processes 2 examples/trainers/accel.py [ROOT]
    torchrun --nproc-per-node 2 examples/trainers/accel.py [ROOT]          (the same)
"""
import torch
from accelerate import Accelerator
from common import Pairs, adamw, model, root, warmup

from async_ckpt import end_process
from async_ckpt.trainers import AccelTrainer, TrainingArguments

accelerator = Accelerator(cpu=not torch.cuda.is_available())
args = TrainingArguments(root("accel"), max_steps=200, batch_size=8, save_steps=50, keep_last=2)
AccelTrainer(args, model(), Pairs(), torch.nn.functional.mse_loss, adamw, lr_scheduler_factory=warmup,
             accelerator=accelerator).train()
end_process()   # instead of returning: avoids torch's gloo exit race (async_ckpt/dist/ending.py)
