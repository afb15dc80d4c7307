"""The disk-full mode: saves that run out of space must fail clearly (SaveFailedError caused by an
OSError with errno ENOSPC), commit nothing, leave nothing behind, keep older checkpoints
loadable, and the next save once space returns must commit (same checkpointer).

Two ways to fill a disk, alternating when both are available:

- ``tmpfs``: a small tmpfs mounted for the run (needs root and mount rights; unmounted at the
  end), filled with a file that leaves a chosen number of bytes free (the kernel's ENOSPC);
- ``inject``: the local backend behind a URL scheme of its own (``torture-full://``, registered
  with `async_ckpt.storage.register_backend`) that raises ENOSPC once the writes of a save pass
  a byte budget (used everywhere, and alone where mounting is not allowed).

Where the space runs out is chosen per trial: nothing free, in the middle of the data, or
exactly the data but not the manifest.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from async_ckpt import AsyncCheckpointer, SaveFailedError, SharingPattern, StateComponent
from async_ckpt.storage import register_backend
from async_ckpt.storage.local import LocalStorage

from .checks import Component, Run, Tracker
from .observe import local_snapshot
from .results import ModeResult, Progress
from .state import TortureState

SCHEME = "torture-full"
MIB = 16
FS_MIB = 80
KEEP_LAST = 2
PAGE = 4096


class Budget:
    """Bytes the injected disk still takes (None: unlimited), and where it ran out."""
    free: int | None = None
    ran_out: str = ""

    @classmethod
    def take(cls, n: int, what: str) -> None:
        if cls.free is None:
            return
        if n > cls.free:
            cls.free, cls.ran_out = 0, what
            raise OSError(errno.ENOSPC, "No space left on device (injected by bench.torture)")
        cls.free -= n


class _FullWriter:
    def __init__(self, inner):
        self._inner = inner

    def write(self, data: memoryview) -> None:
        Budget.take(len(data), "mid-data")
        self._inner.write(data)

    def commit(self) -> None:
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()


class FullLocalStorage(LocalStorage):
    """LocalStorage whose writes draw on `Budget` (data files and the manifest)."""

    def __init__(self, root: str):
        super().__init__(root[len(SCHEME) + 3:] if root.startswith(f"{SCHEME}://") else root)
        self.url = f"{SCHEME}://{self.root}"

    def open_writer(self, path: str):
        return _FullWriter(super().open_writer(path))

    def create_exclusive(self, path: str, data: bytes) -> None:
        Budget.take(len(data), "at the manifest" if path.endswith("manifest.json") else path)
        super().create_exclusive(path, data)


def _register() -> None:
    register_backend(SCHEME, lambda root, options: FullLocalStorage(root), clobber=True)


class Tmpfs:
    """A small tmpfs mounted under `base`, or None where mounting is not allowed."""

    def __init__(self, base: Path):
        self.path = base / f"tmpfs-{uuid.uuid4().hex[:6]}"
        self.path.mkdir(parents=True)
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_MIB}m", "tmpfs",
                                       str(self.path)], capture_output=True).returncode == 0
        self.filler = self.path / "filler"

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def leave_free(self, nbytes: int) -> None:
        """Fill the file system so that about `nbytes` stay free (page granularity)."""
        self.filler.unlink(missing_ok=True)
        size = max(0, self.free() - nbytes)
        if size:
            fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)

    def make_room(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        shutil.rmtree(self.path, ignore_errors=True)


def run_disk_full(trials: int, rng: random.Random, workdir: Path, progress: Progress) -> ModeResult:
    result = ModeResult("disk-full", kind="trials")
    started = time.monotonic()
    _register()
    tmpfs = Tmpfs(workdir)
    result.notes["tmpfs"] = tmpfs.mounted
    result.notes["messages"] = []
    roots = {"tmpfs": str(tmpfs.path / "ckpt")} if tmpfs.mounted else {}
    roots["inject"] = f"{SCHEME}://{workdir / 'diskfull-inject'}"
    trackers = {via: _tracker(root) for via, root in roots.items()}
    stored: dict[tuple[str, str | None], int] = {}    # (via, compression) -> bytes a save writes
    engine_log = logging.getLogger("async_ckpt")
    level = engine_log.level
    engine_log.setLevel(logging.CRITICAL)       # the failed saves are expected: no log noise
    try:
        for trial in range(trials):
            via = list(roots)[trial % len(roots)]
            tracker = trackers[via]
            compression = rng.choice([None, "zstd"])
            try:
                landing, problems = _trial(via, roots[via], tracker, tmpfs, compression, rng, stored,
                                           result, trial)
            except Exception as exc:  # noqa: BLE001 - the harness itself failed: a finding too
                landing, problems = f"{via}: error", [f"trial raised {type(exc).__name__}: {exc}"]
            finally:
                Budget.free = None
                tmpfs.make_room()
            result.kills += 1
            result.landings[landing] += 1
            if problems:
                result.record_failure(trial, landing, problems, roots[via], [], f"{via}, {compression}")
            progress.trial(result, trial, trials, landing)
        result.final_checked = True
    finally:
        engine_log.setLevel(level)
        Budget.free = None
        tmpfs.close()
        shutil.rmtree(workdir / "diskfull-inject", ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result


def _tracker(root: str) -> Tracker:
    path = root[len(SCHEME) + 3:] if root.startswith(f"{SCHEME}://") else root
    return Tracker(root, KEEP_LAST, [Component("state", SharingPattern.GLOBAL, MIB)],
                   lambda: local_snapshot(path))


def _trial(via: str, root: str, tracker: Tracker, tmpfs: Tmpfs, compression: str | None,
           rng: random.Random, stored: dict, result: ModeResult, trial: int) -> tuple[str, list[str]]:
    problems: list[str] = []
    state = TortureState(MIB)
    with AsyncCheckpointer(root, [StateComponent("state", state, SharingPattern.GLOBAL)],
                           compression=compression, keep_last=KEEP_LAST) as ckpt:
        step = 0 if tracker.latest is None else tracker.latest + 1
        while step < 2 or (via, compression) not in stored:   # something to lose, and a size
            state.set_step(step)
            info = ckpt.save(step).wait()
            ckpt.wait()                                   # its retention has run too
            stored[(via, compression)] = info.stored_nbytes
            tracker.after_kill(trial, Run(started=[(step, time.time())], committed=[step], retained=[step]))
            tracker.latest, step = step, step + 1
        before = tracker.latest
        need = stored[(via, compression)]
        where = rng.choice(["nothing free", "mid-data", "mid-data", "at the manifest"])
        free = {"nothing free": 0, "mid-data": int(need * rng.uniform(0.05, 0.95)),
                "at the manifest": need}[where]
        if via == "tmpfs":
            tmpfs.leave_free(-(-free // PAGE) * PAGE)     # whole pages, as tmpfs allocates
        else:
            Budget.free, Budget.ran_out = free, ""
        state.set_step(step)
        t0 = time.time()
        try:
            ckpt.save(step).wait()
            failed = None
        except SaveFailedError as exc:
            failed = exc
        Budget.free = None
        tmpfs.make_room()
        if via == "inject" and Budget.ran_out and where != "nothing free":
            where = Budget.ran_out       # where it really ran out (a zstd save may differ in size)
        if failed is None:
            # it fitted after all (compression, page rounding): not what this trial was after
            ckpt.wait()
            verdict = tracker.after_kill(trial, Run(started=[(step, t0)], committed=[step], retained=[step]))
            result.commits += 1
            return f"{via}: {where} (fitted)", verdict.problems
        if not _caused_by_enospc(failed):
            problems.append(f"the save failed, but not because of ENOSPC: {failed!r} (causes {failed.causes})")
        if len(result.notes["messages"]) < 3:
            result.notes["messages"].append(str(failed)[:300])
        verdict = tracker.after_kill(trial, Run(started=[(step, t0)]))
        result.loads += verdict.loads
        problems += verdict.problems
        if verdict.listed[-1:] != [before]:
            problems.append(f"after the failed save of step {step} the newest step is {verdict.listed[-1:]}, "
                            f"was {before}")
        leftovers = sorted(f"{k}: {p}" for k, p in local_snapshot(_path(root)).garbage())
        if leftovers:
            problems.append(f"the failed save left {leftovers}")
        # space is back: the same checkpointer commits the next save
        t1 = time.time()
        try:
            info = ckpt.save(step).wait()
            if info.step != step:
                problems.append(f"the save after space returned committed {info.step}, not {step}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"the save after space returned failed: {exc!r}")
            return f"{via}: {where}", problems
    verdict = tracker.after_kill(trial, Run(started=[(step, t1)], committed=[step], retained=[step]),
                                 final=True)
    result.commits += 1
    result.loads += verdict.loads
    result.cleaned += verdict.cleaned
    problems += verdict.problems
    return f"{via}: {where}", problems


def _path(root: str) -> str:
    return root[len(SCHEME) + 3:] if root.startswith(f"{SCHEME}://") else root


def _caused_by_enospc(exc: BaseException) -> bool:
    seen, todo = set(), [exc]
    for cause in getattr(exc, "causes", {}).values():
        todo.append(cause) if isinstance(cause, BaseException) else None
        if isinstance(cause, str) and ("No space left" in cause or "ENOSPC" in cause):
            return True
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return False
