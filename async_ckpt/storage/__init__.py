"""Byte movement for async_ckpt: the Storage protocol and its backends.

Shipped as `async_ckpt.storage` so it can never shadow a top-level `storage` module.
"""
from __future__ import annotations

import os
from typing import Any

from .base import Storage, StreamWriter
from .fsspec_backend import FsspecStorage
from .local import LocalStorage

__all__ = ["Storage", "StreamWriter", "LocalStorage", "FsspecStorage", "open_storage"]


def open_storage(root: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Storage:
    """Pick a backend for `root`: a local path or file:// URL -> LocalStorage, else fsspec."""
    root = os.fspath(root)
    if "://" not in root:
        return LocalStorage(root)
    protocol, rest = root.split("://", 1)
    if protocol == "file":
        return LocalStorage(rest)
    import fsspec

    fs = fsspec.filesystem(protocol, **(storage_options or {}))
    return FsspecStorage(fs, fs._strip_protocol(root), root)
