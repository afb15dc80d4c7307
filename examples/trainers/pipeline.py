"""PipelineTrainer (torch.distributed.pipelining): PER_RANK / PER_RANK / GLOBAL; with --dp 2 on 4
ranks, HybridPipelineTrainer (DP x PP): PER_GROUP everywhere.

    torchrun --nproc-per-node 2 examples/trainers/pipeline.py [ROOT]
    torchrun --nproc-per-node 4 examples/trainers/pipeline.py [ROOT] --dp 2
"""
import sys

import torch
from common import Pairs, adamw, init_distributed, model, root, warmup

from async_ckpt import end_process
from async_ckpt.trainers import HybridPipelineTrainer, PipelineTrainer, TrainingArguments

init_distributed()
dp = int(sys.argv[sys.argv.index("--dp") + 1]) if "--dp" in sys.argv else 1
sys.argv = sys.argv[:sys.argv.index("--dp")] if "--dp" in sys.argv else sys.argv
args = TrainingArguments(root(f"pipeline-dp{dp}"), max_steps=200, batch_size=8, save_steps=50, keep_last=2)
cls = HybridPipelineTrainer if dp > 1 else PipelineTrainer
cls(args, model(), Pairs(), torch.nn.functional.mse_loss, adamw, lr_scheduler_factory=warmup,
    n_microbatches=2, dp=dp).train()
end_process()   # instead of returning: avoids torch's gloo exit race (async_ckpt/dist/ending.py)
