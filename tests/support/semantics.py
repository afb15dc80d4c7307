"""Shared pieces of the contract-semantics tests (test_semantics_*.py)."""
from __future__ import annotations

import os
import threading
import time

import async_ckpt as ac
from support.stateful import Box

G = ac.SharingPattern.GLOBAL


def comps(box=None, key="c"):
    return [ac.StateComponent(key, box if box is not None else Box(), G)]


def step_folders(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("step-")) if os.path.exists(root) else []


def wait_until(pred, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


class GatedWrites:
    """Wraps storage.open_writer so every data write blocks until `gate` is set."""

    def __init__(self, monkeypatch, ck, delay: float = 0.0):
        self.gate = threading.Event()
        self.started = threading.Event()
        if delay:
            self.gate.set()
        real_open = ck.storage.open_writer
        outer = self

        class Writer:
            def __init__(self, inner):
                self.inner = inner

            def write(self, data):
                outer.started.set()
                assert outer.gate.wait(30), "test gate never opened"
                if delay:
                    time.sleep(delay)
                self.inner.write(data)

            def commit(self):
                self.inner.commit()

            def abort(self):
                self.inner.abort()

        monkeypatch.setattr(ck.storage, "open_writer", lambda path: Writer(real_open(path)))


class FailOnce:
    """Makes one storage method raise OSError for exactly one call ("write": the first data
    write of a streamed file, i.e. a failure in the middle of a save)."""

    def __init__(self, monkeypatch, ck, method: str):
        self.calls = 0
        if method == "write":
            real_open = ck.storage.open_writer
            outer = self

            class Writer:
                def __init__(self, inner):
                    self.inner, self.commit, self.abort = inner, inner.commit, inner.abort

                def write(self, data):
                    self.inner.write(data[: len(data) // 2])   # half written, then the disk fills
                    outer.calls += 1
                    if outer.calls == 1:
                        raise OSError(28, "No space left on device (injected)")
                    self.inner.write(data[len(data) // 2:])

            monkeypatch.setattr(ck.storage, "open_writer", lambda path: Writer(real_open(path)))
            return
        real = getattr(ck.storage, method)

        def broken(*args, **kwargs):
            self.calls += 1
            if self.calls == 1:
                raise OSError(28, "No space left on device (injected)")
            return real(*args, **kwargs)

        monkeypatch.setattr(ck.storage, method, broken)


FAILING_METHODS = ["open_writer", "write", "create_exclusive"]


def _after_failure_all_is_well(ck, root, failed_step=1):
    assert failed_step not in [i.step for i in ck.list_checkpoints()]
    assert f"step-{failed_step:010d}" not in step_folders(root)
    assert ck.latest_step() in (None, 2)
    ck.wait()
    info = ck.save(3).wait()
    assert info.step == 3
    ck.save(failed_step).wait()                # the failed step is not blocked either
    ck.wait()
    ck.close()
    ck.close()
    assert failed_step in [i.step for i in ac.AsyncCheckpointer(root, comps()).list_checkpoints()]


