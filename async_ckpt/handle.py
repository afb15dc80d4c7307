"""SaveHandle: the caller's view of one background save."""
from __future__ import annotations

import threading
import time

from .errors import CheckpointError
from .types import CheckpointInfo


class SaveHandle:
    """Resolves when the save is committed (or has failed).

    A failure is raised exactly once: by `wait()` if the caller asks, otherwise by the
    checkpointer's next `save()`/`wait()`/`close()`.
    """

    def __init__(self, step: int, staged_event=None):
        self.step = step
        self._committed = threading.Event()
        self._settled = threading.Event()   # committed/failed AND retention it triggered has run
        self._info: CheckpointInfo | None = None
        self._error: CheckpointError | None = None
        self._reported = False
        self._staged_event = staged_event

    def wait(self, timeout: float | None = None) -> CheckpointInfo:
        """Block until committed and return its CheckpointInfo; raise SaveFailedError if it failed.

        Raises the builtin TimeoutError when `timeout` seconds pass first (the save goes on).
        """
        if not self._committed.wait(timeout):
            raise TimeoutError(f"save of step {self.step} not committed after {timeout} s; "
                               "it is still running (call wait() again)")
        if self._error is not None:
            self._reported = True
            raise self._error
        assert self._info is not None
        return self._info

    def done(self) -> bool:
        """True once the save has committed or failed."""
        return self._committed.is_set()

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

    # -- used by the writer -------------------------------------------------------------------
    def _succeed(self, info: CheckpointInfo) -> None:
        self._info = info
        self._committed.set()

    def _fail(self, error: CheckpointError) -> None:
        self._error = error
        self._settled.set()     # before _committed: whoever wakes on _committed must see it settled
        self._committed.set()

    def _take_unreported_error(self) -> CheckpointError | None:
        if self._error is not None and not self._reported:
            self._reported = True
            return self._error
        return None
