"""async_ckpt: asynchronous, crash-safe checkpoints for PyTorch training.

The public API (DESIGN.md section 2) is what this module exports; everything else is internal.
The package tree shows the architecture: `save`, `load`, `dist`, `format`, `training` and
`storage` (see docs/design.md).
"""
from .checkpointer import AsyncCheckpointer
from .dist.ending import end_process
from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,
                     InvalidArgumentError, PartialLoadError, ReplicationError, SaveFailedError,
                     StorageConfigError, StorageUnavailableError)
from .handle import SaveHandle
from .options import CheckpointOptions
from .training.detectors import EMADetector, WindowDetector
from .training.divergence import DivergenceEvent, DivergenceMonitor
from .training.rng import RNGState
from .training.sampler import ResumableSampler
from .training.schedule import Due, PeriodicTrigger, TrainingSchedule
from .training.state import ModelState, OptimizerState
from .types import CheckpointInfo, SharingPattern, StateComponent, ValidationLevel
from .version import __version__

__all__ = ["AsyncCheckpointer", "StateComponent", "SharingPattern", "ValidationLevel", "SaveHandle",
           "CheckpointInfo", "CheckpointOptions", "RNGState", "ModelState", "OptimizerState", "CheckpointError",
           "CheckpointNotFoundError", "CorruptCheckpointError", "ReplicationError", "SaveFailedError",
           "InvalidArgumentError", "ResumableSampler", "EMADetector", "WindowDetector",
           "DivergenceEvent", "DivergenceMonitor", "Due", "PeriodicTrigger", "TrainingSchedule",
           "StorageConfigError", "StorageUnavailableError", "PartialLoadError", "end_process", "__version__"]
