"""Every exception async_ckpt raises; `CheckpointError` is the base of all of them.

`async_ckpt.storage` raises OSErrors only (it imports nothing of the engine); the two it defines
itself become the engine's `StorageConfigError`/`StorageUnavailableError` through
`translate_storage_error`, applied by the `storage_errors_translated` decorator on the public
methods and where a background save's failure becomes a `SaveFailedError`.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, TypeVar

from .storage import errors as storage_errors   # storage never imports the engine: no cycle

F = TypeVar("F", bound=Callable)


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


class PartialLoadError(CheckpointError):
    """A component's load_state_dict raised after the checks passed and other components were
    restored: the message names which were restored and which were not."""


class SaveFailedError(CheckpointError):
    """A background save failed. `causes` maps each failing rank to what went wrong there."""

    def __init__(self, message: str, causes: Mapping[int, BaseException | str] | None = None):
        super().__init__(message)
        self.causes: dict[int, BaseException | str] = dict(causes or {})


class StorageConfigError(InvalidArgumentError):
    """The storage root cannot work as configured (missing bucket, bad credentials, unreachable
    endpoint, a server that ignores conditional writes); the message says what to change. The
    storage layer's error of the same name is `__cause__`."""


class StorageUnavailableError(CheckpointError):
    """The storage kept failing with transient errors for longer than the retry deadline
    (storage_options['retry_deadline_s'] on S3). The storage layer's error is `__cause__`."""


def translate_storage_error(exc: BaseException) -> BaseException:
    """The engine's error for a storage-layer error: `async_ckpt.storage`'s StorageConfigError and
    StorageUnavailableError (OSErrors) become the classes above, with the same message and the
    original as `__cause__`; anything else is returned unchanged."""
    for theirs, ours in ((storage_errors.StorageConfigError, StorageConfigError),
                         (storage_errors.StorageUnavailableError, StorageUnavailableError)):
        if isinstance(exc, theirs):
            new = ours(str(exc))
            new.__cause__ = exc
            return new
    return exc


def storage_errors_translated(fn: F) -> F:
    """Decorator for public methods: storage-layer errors leave them translated."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            new = translate_storage_error(exc)
            if new is exc:
                raise
            raise new from exc
    return wrapper  # type: ignore[return-value]


# Every CheckpointError class by name: a rank raises a peer's error as the same class.
ERROR_CLASSES: dict[str, type[CheckpointError]] = {
    cls.__name__: cls for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, CheckpointError)}
