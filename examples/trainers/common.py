"""Shared by the trainer examples: a tiny regression problem and the arguments they pass.

Every example resumes by itself: run it, interrupt it (Ctrl-C, kill -9, SIGTERM), run it again.
"""
from __future__ import annotations

import os
import sys

import torch

DIM = 8


class Pairs(torch.utils.data.Dataset):
    """Map-style data: sample i is a fixed function of i."""

    def __len__(self) -> int:
        return 256

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(DIM, generator=g)
        return x, x.sum(dim=0, keepdim=True).sin()


def model() -> torch.nn.Sequential:
    torch.manual_seed(0)                     # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


def warmup(optimizer):
    return torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, total_iters=20)


def root(name: str) -> str:
    """The checkpoint root: argv[1], or a folder named after the example."""
    return sys.argv[1] if len(sys.argv) > 1 else os.path.join("example_checkpoints", name)


def init_distributed() -> None:
    """gloo process group from torchrun's environment (CPU); NCCL would do on GPUs."""
    if "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
