"""Shared-memory files under /dev/shm: how local ranks hand buffers to each other by name.

A save's staging buffer of a rank that is not its node's writer, and a load's node-shared copies,
live in such files; the peer maps them by the name it got through the Store (never a copy).
Names carry the creating process's pid, so buffers of a killed process are swept by the next node
writer that starts on the machine (`sweep_dead_buffers`).
"""
from __future__ import annotations

import mmap
import os
import tempfile

import torch

SHM_PREFIX = "async_ckpt-"
_counter = 0


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def is_ours(name: str) -> bool:
    """Whether `name` is a shared-memory file this package creates (never map anything else)."""
    return os.path.basename(name).startswith(SHM_PREFIX) and os.path.dirname(name) == _shm_dir()


def create_shared(nbytes: int) -> tuple[str, mmap.mmap]:
    """A new shared-memory file of `nbytes` (at least 1) mapped into this process: (name, map)."""
    global _counter
    _counter += 1
    name = os.path.join(_shm_dir(), f"{SHM_PREFIX}{os.getpid()}-{_counter}-{os.urandom(4).hex()}")
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        return name, mmap.mmap(fd, max(nbytes, 1))
    finally:
        os.close(fd)


def attach_shared(name: str, nbytes: int, unlink: bool = True) -> torch.Tensor:
    """Map another local rank's staging buffer (node writer side). The mapping outlives the file,
    so the name is unlinked at once: nothing is left in /dev/shm if either process dies later.
    With several readers (`unlink=False`) the creator removes it once all have mapped it."""
    if not is_ours(name):
        raise ValueError(f"refusing to map {name!r}: not an async_ckpt staging buffer")
    fd = os.open(name, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, max(nbytes, 1))
    finally:
        os.close(fd)
    if unlink:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
    return torch.frombuffer(mapped, dtype=torch.uint8)


def sweep_dead_buffers() -> None:
    """Remove staging files of processes that no longer exist (killed before hand-over)."""
    folder = _shm_dir()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not name.startswith(SHM_PREFIX):
            continue
        pid = name[len(SHM_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
