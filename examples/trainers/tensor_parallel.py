"""TPTrainer (DP x TP): a (dp, tp) mesh; model and optimizer SHARDED over mesh["dp"]; data
PER_GROUP over mesh["tp"]. The plan splits the 2-layer MLP column-wise then row-wise.

    torchrun --nproc-per-node 4 examples/trainers/tensor_parallel.py [ROOT]     (2 x 2)
"""
import torch
from common import DIM, Pairs, adamw, init_distributed, root, warmup
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from async_ckpt import end_process
from async_ckpt.trainers import TPTrainer, TrainingArguments

init_distributed()
torch.manual_seed(0)                       # the same initial weights on every rank
mlp = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
args = TrainingArguments(root("tensor_parallel"), max_steps=200, batch_size=8, save_steps=50, keep_last=2)
TPTrainer(args, mlp, Pairs(), torch.nn.functional.mse_loss, adamw, lr_scheduler_factory=warmup,
          tp=2, tp_plan={"0": ColwiseParallel(), "2": RowwiseParallel()}).train()
end_process()   # instead of returning: avoids torch's gloo exit race (async_ckpt/dist/ending.py)
