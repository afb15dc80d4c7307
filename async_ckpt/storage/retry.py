"""Retries with backoff: the one place where a storage call is tried again.

Every S3 request goes through `retry_async`. A failure that `is_transient` says may pass (5xx,
SlowDown, timeouts, connection resets) is retried with capped exponential backoff and full jitter
until `deadline_s` has passed since the first try; then the last error is re-raised to the caller,
which translates it. Anything else is raised at once. botocore's and s3fs's own retries are turned
off by the S3 backend so that the total time spent on one call stays bounded and predictable.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

log = logging.getLogger("async_ckpt.storage")

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry one call."""
    deadline_s: float = 60.0     # total time budget for one call, first try included
    first_sleep_s: float = 0.1
    max_sleep_s: float = 4.0

    def sleeps(self):
        """Backoff ceilings: 0.1, 0.2, 0.4, ... capped at max_sleep_s (full jitter is applied)."""
        ceiling = self.first_sleep_s
        while True:
            yield ceiling
            ceiling = min(ceiling * 2, self.max_sleep_s)


class RetriesExhausted(Exception):
    """Raised in place of a transient error that did not clear within the deadline; the
    original is `__cause__`, `attempts` and `elapsed_s` say how hard we tried."""

    def __init__(self, what: str, attempts: int, elapsed_s: float, last: BaseException):
        super().__init__(f"{what}: still failing after {attempts} tries in {elapsed_s:.1f} s: {last!r}")
        self.what, self.attempts, self.elapsed_s, self.last = what, attempts, elapsed_s, last


async def retry_async(call: Callable[[], Awaitable[T]], *, what: str, policy: RetryPolicy,
                      is_transient: Callable[[BaseException], bool]) -> T:
    """Await `call()` until it succeeds, fails permanently, or the policy's deadline passes."""
    start = time.monotonic()
    attempts = 0
    for ceiling in policy.sleeps():
        attempts += 1
        try:
            return await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_transient(exc):
                raise
            elapsed = time.monotonic() - start
            pause = random.uniform(0, ceiling)
            if elapsed + pause >= policy.deadline_s:
                raise RetriesExhausted(what, attempts, elapsed, exc) from exc
            log.warning("%s: transient error (%r); retry %d in %.2f s", what, exc, attempts, pause)
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover - sleeps() never ends
