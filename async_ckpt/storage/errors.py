"""The storage layer's own errors: builtin `OSError` subclasses, so that code handling I/O
errors handles these too, and nothing here depends on the engine.

Backends raise the builtin OSError family for what the `Storage` protocol names
(FileNotFoundError, FileExistsError, NotADirectoryError, ...) and these for the two conditions no
builtin describes. The engine (`async_ckpt.errors.translate_storage_error`) turns them into its
user-facing classes of the same names, with the original as `__cause__`.
"""
from __future__ import annotations


class StorageError(OSError):
    """Base of the errors the storage layer defines itself."""


class StorageConfigError(StorageError):
    """The storage root cannot work as configured (missing bucket, bad credentials, unreachable
    endpoint, a server that ignores conditional writes); the message says what to change."""


class StorageUnavailableError(StorageError):
    """The storage kept failing with transient errors for longer than the retry deadline."""
