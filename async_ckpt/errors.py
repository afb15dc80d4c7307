"""Every exception async_ckpt raises; `CheckpointError` is the base of all of them."""
from __future__ import annotations

from typing import Mapping


class CheckpointError(Exception):
    """Base class of every error raised by async_ckpt."""


class InvalidArgumentError(CheckpointError, ValueError, TypeError):
    """A call was made with an argument that can never work (bad step, key, root, option)."""


class CheckpointNotFoundError(CheckpointError):
    """The requested checkpoint (or a required component in it) is not committed."""


class CorruptCheckpointError(CheckpointError):
    """Stored data does not match its manifest: hash/size mismatch, truncation, bad manifest."""


class ReplicationError(CheckpointError):
    """Replicas of a REPLICATED component disagree at the requested validation level.
    `per_rank` maps each rank whose replica differs to what differs there."""

    def __init__(self, message: str, per_rank: Mapping[int, str] | None = None):
        super().__init__(message)
        self.per_rank: dict[int, str] = dict(per_rank or {})


class SaveFailedError(CheckpointError):
    """A background save failed. `causes` maps each failing rank to what went wrong there."""

    def __init__(self, message: str, causes: Mapping[int, BaseException | str] | None = None):
        super().__init__(message)
        self.causes: dict[int, BaseException | str] = dict(causes or {})
