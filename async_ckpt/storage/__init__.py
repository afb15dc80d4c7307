"""Byte movement for async_ckpt: the Storage protocol and its backends.

Shipped as `async_ckpt.storage` so it can never shadow a top-level `storage` module.
"""
from __future__ import annotations

import os
from typing import Any

from .base import Storage, StreamWriter
from .fsspec_backend import FsspecStorage
from .local import LocalStorage
from .s3 import S3Storage, open_s3
from .s3_errors import StorageConfigError, StorageUnavailableError

__all__ = ["Storage", "StreamWriter", "LocalStorage", "FsspecStorage", "S3Storage",
           "StorageConfigError", "StorageUnavailableError", "open_storage"]


def open_storage(root: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Storage:
    """Pick a backend for `root`: a local path or file:// URL -> LocalStorage, s3:// (or s3a://)
    -> S3Storage (s3fs's client, our multipart writer, retries and conditional-put commit), any
    other URL -> FsspecStorage on that fsspec filesystem (memory://, gcs://, ...)."""
    root = os.fspath(root)
    if "://" not in root:
        return LocalStorage(root)
    protocol, rest = root.split("://", 1)
    if protocol == "file":
        return LocalStorage(rest)
    if protocol in ("s3", "s3a"):
        return open_s3(root, storage_options)
    import fsspec

    fs = fsspec.filesystem(protocol, **(storage_options or {}))
    return FsspecStorage(fs, fs._strip_protocol(root), root)
