"""Helpers shared by the benchmarks: page-cache control, machine description, small utilities."""
from __future__ import annotations

import os
import platform
import socket
import subprocess

import torch

GIB = 1 << 30


class TensorState:
    """A minimal Stateful over a dict of tensors (what AsyncCheckpointer and DCP both accept); load
    copies into the existing tensors, so every peer restores into preallocated memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, sd) -> None:
        for k, v in sd.items():
            self.tensors[k].copy_(v)


class PageCache:
    """sync + drop_caches before each timed write, when this process may drop caches."""

    def __init__(self, want_drop: bool):
        self.can_drop, self.error = False, None
        if want_drop:
            try:
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("1")
                self.can_drop = True
            except OSError as exc:
                self.error = repr(exc)

    def describe(self) -> str:
        if self.can_drop:
            return "sync + drop_caches (echo 1 > /proc/sys/vm/drop_caches) before every timed write"
        why = f"drop_caches failed: {self.error}" if self.error else "drop_caches disabled"
        return f"sync only before every timed write ({why})"

    def settle(self) -> None:
        os.sync()
        if self.can_drop:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1")


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version() -> str:
    import async_ckpt     # here, not at the top: bench.gpu imports this module without async_ckpt
    return async_ckpt.__version__


def machine_info(folder: str) -> dict:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            mem_total = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    mount = {}
    try:
        real = os.path.realpath(folder)
        with open("/proc/mounts") as f:
            for ln in f:
                dev, point, fstype, opts = ln.split()[:4]
                if (real == point or real.startswith(point.rstrip("/") + "/")) and \
                        len(point) >= len(mount.get("mount_point", "")):
                    mount = {"device": dev, "mount_point": point, "fstype": fstype, "options": opts}
    except OSError:
        pass
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", repo, "status", "--porcelain", "async_ckpt"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", None
    return {"cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "cpu_model": cpu_model, "mem_total_bytes": mem_total, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "async_ckpt": _version(),
            "git_commit": commit, "async_ckpt_dirty": dirty, "target_dir": folder,
            "target_fs": mount}
