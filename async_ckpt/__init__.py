"""async_ckpt: asynchronous, crash-safe checkpoints for PyTorch training."""
from .version import __version__

from .errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError,  # noqa: E402
                     InvalidArgumentError, ReplicationError, SaveFailedError)
from .handle import SaveHandle  # noqa: E402
from .training.rng import RNGState  # noqa: E402
from .types import CheckpointInfo, SharingPattern, StateComponent, ValidationLevel  # noqa: E402
from .checkpointer import AsyncCheckpointer  # noqa: E402

__all__ = ["AsyncCheckpointer", "StateComponent", "SharingPattern", "ValidationLevel", "SaveHandle",
           "CheckpointInfo", "RNGState", "CheckpointError", "CheckpointNotFoundError",
           "CorruptCheckpointError", "ReplicationError", "SaveFailedError", "InvalidArgumentError"]
from .training.sampler import ResumableSampler  # noqa: E402
__all__ += ["ResumableSampler"]
from .training.detectors import EMADetector, WindowDetector  # noqa: E402
from .training.divergence import DivergenceEvent, DivergenceMonitor  # noqa: E402
__all__ += ["EMADetector", "WindowDetector", "DivergenceEvent", "DivergenceMonitor"]
from .training.schedule import Due, PeriodicTrigger, TrainingSchedule  # noqa: E402
__all__ += ["Due", "PeriodicTrigger", "TrainingSchedule"]
