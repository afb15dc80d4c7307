"""Which backend serves a root: a registry keyed by URL scheme, in the style of fsspec's
`register_implementation`.

`open_storage(root, storage_options)` takes the scheme of `root` (the part before "://"; none for
a plain path) and calls the factory registered for it with the root exactly as given and the
storage options. Built in: no scheme and ``file`` -> `LocalStorage`, ``s3``/``s3a`` ->
`S3Storage`. A scheme nobody registered goes to `FsspecStorage` on that fsspec filesystem
(``memory://``, ``gcs://``, ...), so every fsspec target works without registering anything.

A third-party backend registers its scheme once, before the checkpointer is built::

    from async_ckpt.storage import register_backend
    register_backend("myfs", lambda root, options: MyStorage(root, **options))

A factory may also be given as a dotted path ("package.module.factory"), imported on first use,
so that registering costs nothing until that scheme is opened. Registering a scheme that already
has a factory raises ValueError unless ``clobber=True`` (which is how to replace a built-in).
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Any, Callable, Union

from .base import Storage
from .errors import StorageConfigError

BackendFactory = Callable[[str, dict], Storage]   # (root as given, storage_options) -> Storage

_lock = threading.Lock()
_registry: dict[str, Union[BackendFactory, str]] = {}


def _check_scheme(scheme: str) -> str:
    if not isinstance(scheme, str) or (scheme and not (
            scheme[0].isalpha() and all(c.isalnum() or c in "+-." for c in scheme))):
        raise ValueError(f"not a URL scheme: {scheme!r} (letters, digits, '+', '-', '.'; a letter first)")
    return scheme.lower()


def register_backend(scheme: str, factory: BackendFactory | str, *, clobber: bool = False) -> None:
    """Serve roots ``<scheme>://...`` with `factory(root, storage_options)`. `scheme` "" means
    plain paths without a scheme. `factory` is a callable or the dotted path of one."""
    scheme = _check_scheme(scheme)
    if not (callable(factory) or (isinstance(factory, str) and "." in factory)):
        raise TypeError(f"factory for {scheme!r} must be callable or a dotted path, got {factory!r}")
    with _lock:
        if scheme in _registry and not clobber and _registry[scheme] is not factory:
            raise ValueError(f"a storage backend is already registered for {scheme!r}; pass "
                             "clobber=True to replace it")
        _registry[scheme] = factory


def unregister_backend(scheme: str) -> None:
    """Forget the factory of `scheme` (its roots go to fsspec again); a missing one is fine."""
    with _lock:
        _registry.pop(_check_scheme(scheme), None)


def registered_schemes() -> list[str]:
    """The schemes with a registered factory ("" is plain paths)."""
    with _lock:
        return sorted(_registry)


def split_scheme(root: str) -> tuple[str, str]:
    """(scheme, rest) of a root: ("", root) for a plain path."""
    if "://" not in root:
        return "", root
    scheme, rest = root.split("://", 1)
    return scheme.lower(), rest


def _resolve(scheme: str) -> BackendFactory | None:
    with _lock:
        factory = _registry.get(scheme)
    if isinstance(factory, str):
        module, _, name = factory.rpartition(".")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise StorageConfigError(f"the storage backend registered for {scheme!r}:// ({module}."
                                     f"{name}) cannot be imported: {exc}") from exc
    return factory


def open_storage(root: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Storage:
    """The Storage for `root`: the factory registered for its scheme, else fsspec's filesystem."""
    root = os.fspath(root)
    scheme, _ = split_scheme(root)
    factory = _resolve(scheme)
    if factory is None:
        factory = _open_fsspec
    return factory(root, dict(storage_options or {}))


# -- built-in backends ---------------------------------------------------------------------------
def _open_local(root: str, storage_options: dict) -> Storage:
    from .local import LocalStorage

    return LocalStorage(split_scheme(root)[1])


def _open_s3(root: str, storage_options: dict) -> Storage:
    from .s3 import open_s3

    return open_s3(root, storage_options)


def _open_fsspec(root: str, storage_options: dict) -> Storage:
    import fsspec

    from .fsspec_backend import FsspecStorage

    fs = fsspec.filesystem(split_scheme(root)[0], **storage_options)
    return FsspecStorage(fs, fs._strip_protocol(root), root)


for _scheme, _factory in (("", _open_local), ("file", _open_local), ("s3", _open_s3), ("s3a", _open_s3)):
    register_backend(_scheme, _factory)
