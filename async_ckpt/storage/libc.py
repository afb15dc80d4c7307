"""The libc calls that Python's os and mmap modules lack, declared once.

Each is None where the C library does not have it (sync_file_range and mremap are Linux-only);
callers check before use and fall back. Raw mmap is needed because Python's mmap object keeps a
duplicate of the file descriptor open for as long as it lives (see local.py map_private). Lives in
the storage package because local.py needs it and storage imports nothing else of async_ckpt; the
engine's readbuf.py imports it from here.
"""
from __future__ import annotations

import ctypes
import os

MAP_FAILED = ctypes.c_void_p(-1).value
_vp, _size, _int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int

_lib: ctypes.CDLL | None
try:
    _lib = ctypes.CDLL(None, use_errno=True)
except OSError:
    _lib = None


def _declare(name: str, restype, *argtypes):
    fn = getattr(_lib, name, None) if _lib is not None else None
    if fn is not None:
        fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


mmap = _declare("mmap", _vp, _vp, _size, _int, _int, _int, ctypes.c_long)
munmap = _declare("munmap", _int, _vp, _size)
madvise = _declare("madvise", _int, _vp, _size, _int)
mremap = _declare("mremap", _vp, _vp, _size, _size, _int, _vp)
sync_file_range = _declare("sync_file_range", _int, _int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def last_error(what: str) -> OSError:
    """The OSError for the errno a failed call just left."""
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")
