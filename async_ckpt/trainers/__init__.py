"""Trainers over a user's model, data, loss and optimizer factory, saving everything a bit-exact
resume needs through async_ckpt: the seed's trainer table (docs/trainers.md).

`arguments` (TrainingArguments), `base` (the loop, Trainer, SimpleTrainer), `ddp` (DDPTrainer),
`pipeline` (PipelineTrainer, HybridPipelineTrainer), `fsdp` (FSDP2Trainer), `tensor_parallel`
(TPTrainer, DP x TP), `accel` (AccelTrainer, on Hugging Face
Accelerate, imported only when used).
"""
from typing import Any

from .arguments import TrainingArguments
from .base import SimpleTrainer, Trainer, TrainResult
from .ddp import DDPTrainer
from .fsdp import FSDP2Trainer
from .pipeline import HybridPipelineTrainer, PipelineTrainer
from .tensor_parallel import TPTrainer

__all__ = ["TrainingArguments", "Trainer", "TrainResult", "SimpleTrainer", "DDPTrainer", "PipelineTrainer",
           "HybridPipelineTrainer", "FSDP2Trainer", "TPTrainer", "AccelTrainer"]


def __getattr__(name: str) -> Any:
    if name == "AccelTrainer":            # needs accelerate: imported on first use only
        from .accel import AccelTrainer
        return AccelTrainer
    raise AttributeError(name)
