"""async_ckpt: asynchronous, crash-safe checkpoints for PyTorch training."""
__version__ = "0.1.0"

from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,  # noqa: E402
                     InvalidArgumentError, ReplicationError, SaveFailedError, StorageConfigError,
                     StorageUnavailableError)
from .handle import SaveHandle  # noqa: E402
from .rng import RNGState  # noqa: E402
from .types import CheckpointInfo, SharingPattern, StateComponent, ValidationLevel  # noqa: E402
from .checkpointer import AsyncCheckpointer  # noqa: E402

__all__ = ["AsyncCheckpointer", "StateComponent", "SharingPattern", "ValidationLevel", "SaveHandle",
           "CheckpointInfo", "RNGState", "CheckpointError", "CheckpointNotFoundError",
           "CorruptCheckpointError", "ReplicationError", "SaveFailedError", "InvalidArgumentError",
           "StorageConfigError", "StorageUnavailableError"]
from .sampler import ResumableSampler  # noqa: E402
__all__ += ["ResumableSampler"]
from .detectors import EMADetector, WindowDetector  # noqa: E402
from .divergence import DivergenceEvent, DivergenceMonitor  # noqa: E402
__all__ += ["EMADetector", "WindowDetector", "DivergenceEvent", "DivergenceMonitor"]
from .schedule import Due, PeriodicTrigger, TrainingSchedule  # noqa: E402
__all__ += ["Due", "PeriodicTrigger", "TrainingSchedule"]
