"""Only CheckpointErrors leave the reading side of the public API.

`load()`, `latest_step()` and `list_checkpoints()` promise callers that whatever a checkpoint root
holds (damaged, hostile, unreadable), they raise a `CheckpointError` subclass and nothing else.
The readers raise precise errors themselves; this is the net under them: a storage-layer error is
translated (errors.translate_storage_error), any other OSError becomes a `CheckpointError` naming
the root, and anything else one that says it is unexpected (a bug to report), with the original
as `__cause__`. Exceptions raised by a component's own `load_state_dict` are not reading errors
and are not wrapped here.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

from ..errors import CheckpointError, translate_storage_error

F = TypeVar("F", bound=Callable)
UNEXPECTED = "unexpected"     # how the net's own messages start (the fuzzer looks for them)


def as_checkpoint_error(exc: Exception, url: str) -> CheckpointError:
    """The CheckpointError to raise instead of `exc`, met while reading under `url`."""
    if isinstance(exc, CheckpointError):
        return exc
    new = translate_storage_error(exc)
    if isinstance(new, CheckpointError):
        return new
    if isinstance(exc, OSError):
        new = CheckpointError(f"cannot read the checkpoints at {url}: {exc}")
    else:
        new = CheckpointError(f"{UNEXPECTED} {type(exc).__name__} while reading the checkpoints at "
                              f"{url}: {exc}; this is a bug in async_ckpt, please report it")
    new.__cause__ = exc
    return new


def checkpoint_errors_only(fn: F) -> F:
    """Decorator for a reading method of an object with a `storage`: see the module docstring."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - the promise is "CheckpointError or nothing"
            raise as_checkpoint_error(exc, self.storage.url) from exc
    return wrapper  # type: ignore[return-value]
