"""SaveHandle, the caller's view of one background save, and Settlement, the engine's side of it.

A save's outcome is decided once and recorded in its `Settlement`; the `SaveHandle` only reads it.
Who calls what, in order:

1. the training thread (``AsyncCheckpointer.save``) creates the Settlement and returns its handle;
2. the rank worker thread (`save.rank_worker.RankWorker`, the only resolver) calls
   ``succeed(info)`` or ``fail(error)`` once the coordinator's verdict is known, then, after the
   retention that the commit triggered has run, ``settle()`` (``fail`` settles at once);
3. the training thread asks ``settled``/``wait_settled()`` (``wait()``, ``close()``, the
   ``max_pending`` bound) and ``take_unreported_error()`` (raising a failure nobody waited for).

A failure is raised exactly once: by ``SaveHandle.wait()`` if the caller asks, otherwise by the
checkpointer's next ``save()``/``wait()``/``close()``.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from .errors import CheckpointError
from .types import CheckpointInfo


class Settlement:
    """The outcome of one save: resolved once by the rank worker, read by everyone else."""

    def __init__(self, step: int, staged_event: Any = None):
        self.step = step
        self.handle = SaveHandle(self, staged_event)
        self._committed = threading.Event()   # committed or failed: the handle's wait() returns
        self._settled = threading.Event()     # ... and the retention it triggered has run
        self._lock = threading.Lock()
        self.info: CheckpointInfo | None = None
        self.error: CheckpointError | None = None
        self._reported = False

    # -- the rank worker ----------------------------------------------------------------------
    def succeed(self, info: CheckpointInfo) -> None:
        self.info = info
        self._committed.set()

    def fail(self, error: CheckpointError) -> None:
        self.error = error
        self._settled.set()     # before _committed: whoever wakes on _committed must see it settled
        self._committed.set()

    def settle(self) -> None:
        self._settled.set()

    # -- everyone else ------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._committed.is_set()

    @property
    def settled(self) -> bool:
        return self._settled.is_set()

    def wait_done(self, timeout: float | None = None) -> bool:
        return self._committed.wait(timeout)

    def wait_settled(self, timeout: float | None = None) -> bool:
        return self._settled.wait(timeout)

    def mark_reported(self) -> None:
        with self._lock:
            self._reported = True

    def take_unreported_error(self) -> CheckpointError | None:
        """The failure, the first time it is asked for (None afterwards, or if it succeeded)."""
        with self._lock:
            if self.error is not None and not self._reported:
                self._reported = True
                return self.error
        return None


class SaveHandle:
    """Resolves when the save is committed (or has failed).

    A failure is raised exactly once: by `wait()` if the caller asks, otherwise by the
    checkpointer's next `save()`/`wait()`/`close()`.
    """

    def __init__(self, settlement: Settlement, staged_event: Any = None):
        self._settlement = settlement
        self._staged_event = staged_event

    @property
    def step(self) -> int:
        return self._settlement.step

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        """Block until committed and return its CheckpointInfo; raise SaveFailedError if it failed.

        Raises the builtin TimeoutError when `timeout` seconds pass first (the save goes on).
        """
        s = self._settlement
        if not s.wait_done(timeout):
            raise TimeoutError(f"save of step {self.step} not committed after {timeout} s; "
                               "it is still running (call wait() again)")
        if s.error is not None:
            s.mark_reported()
            raise s.error
        assert s.info is not None
        return s.info

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self._settlement.done

    def wait_staged(self, timeout: float | None = None) -> None:
        """Block until the state has been copied out, so the model may be mutated.

        Immediate unless the checkpointer was made with ``overlap_staging=True`` and the state
        lives on a GPU. Raises the builtin TimeoutError if `timeout` seconds pass first.
        """
        event = self._staged_event
        if event is None or timeout is None:
            if event is not None:
                event.synchronize()
            return
        deadline = time.monotonic() + timeout
        while not event.query():
            if time.monotonic() > deadline:
                raise TimeoutError(f"state of step {self.step} not staged after {timeout} s")
            time.sleep(0.0005)
