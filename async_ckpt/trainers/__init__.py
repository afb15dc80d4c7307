"""Trainers over a user's model, data, loss and optimizer factory, saving everything a bit-exact
resume needs through async_ckpt: the seed's trainer table (docs/trainers.md).

`arguments` (TrainingArguments), `base` (the loop, Trainer, SimpleTrainer), `ddp` (DDPTrainer),
`pipeline` (PipelineTrainer, HybridPipelineTrainer), `accel` (AccelTrainer, on Hugging Face
Accelerate, imported only when used).
"""
from typing import Any

from .arguments import TrainingArguments
from .base import SimpleTrainer, Trainer, TrainResult
from .ddp import DDPTrainer
from .pipeline import HybridPipelineTrainer, PipelineTrainer

__all__ = ["TrainingArguments", "Trainer", "TrainResult", "SimpleTrainer", "DDPTrainer", "PipelineTrainer",
           "HybridPipelineTrainer", "AccelTrainer"]


def __getattr__(name: str) -> Any:
    if name == "AccelTrainer":            # needs accelerate: imported on first use only
        from .accel import AccelTrainer
        return AccelTrainer
    raise AttributeError(name)
