"""Byte movement for async_ckpt: the Storage protocol, its backends and the registry that picks
one by URL scheme.

Self-contained: nothing here imports the rest of `async_ckpt` (tests/test_storage_boundary.py
checks it). Failures are builtin OSErrors, plus `StorageConfigError`/`StorageUnavailableError`
(`errors.py`, also OSErrors) that the engine translates into its own classes. Backends:
`LocalStorage` (paths, file://), `S3Storage` (s3://, s3a://), `FsspecStorage` (any other fsspec
URL); `register_backend` adds a scheme. `async_ckpt.storage.testing` holds the S3 server launchers,
the fault-injecting proxy and the conformance suite a backend's tests subclass; it is imported only
by tests. Shipped as `async_ckpt.storage` so it can never shadow a top-level `storage` module.
"""
from __future__ import annotations

from .base import SCRATCH_PREFIXES, Storage, StreamWriter, is_stale_scratch, scratch_name
from .errors import StorageConfigError, StorageError, StorageUnavailableError
from .fsspec_backend import FsspecStorage
from .local import LocalStorage
from .registry import (BackendFactory, open_storage, register_backend, registered_schemes,
                       unregister_backend)
from .s3 import S3Storage, open_s3

__all__ = ["Storage", "StreamWriter", "SCRATCH_PREFIXES", "is_stale_scratch", "scratch_name",
           "LocalStorage", "FsspecStorage", "S3Storage", "open_s3",
           "StorageError", "StorageConfigError", "StorageUnavailableError", "open_storage",
           "register_backend", "unregister_backend", "registered_schemes", "BackendFactory"]
