"""Shared pieces of `python -m bench.gpu`: environment probe, deadline control, statistics
and DCP helpers (the tensor state is bench.common's)."""
from __future__ import annotations

import importlib
import statistics
import sys
import time
import traceback

import torch

GB = 10 ** 9
HARD_DEPS = ("xxhash",)   # imported by async_ckpt/codec.py; zstandard only for compression


def missing_deps() -> list[str]:
    missing = []
    for name in HARD_DEPS:
        try:      # an import, not find_spec: a broken install counts as missing too
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class Env:
    """What differs between a CUDA run and the CPU dry run: device, pinning, synchronisation."""

    def __init__(self, dry_run: bool):
        self.cuda = not dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def sync_compute(self) -> None:
        """Only the compute stream: side-stream copies must stay free to overlap the next step."""
        if self.cuda:
            torch.cuda.current_stream().synchronize()

    def pinned(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=self.cuda)

    def stager_options(self, async_staging: bool):
        from torch.distributed.checkpoint.staging import StagingOptions
        # DCP's best on GPU: pinned, reused buffers and non-blocking copies (both need CUDA).
        return StagingOptions(use_pinned_memory=self.cuda, use_shared_memory=False,
                              use_async_staging=async_staging, use_non_blocking_copy=self.cuda)


class Control:
    """The time budget and the failures of one run. The script runs once, unattended, on a lent
    machine: a method that fails is recorded and dropped, and everything else still runs."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []
        self.errors: list[str] = []

    def attempt(self, what: str, fn, *args) -> tuple[bool, object]:
        try:
            return True, fn(*args)
        except Exception as exc:  # noqa: BLE001 - recorded in the results, the run goes on
            traceback.print_exc()
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            print(f"  {what} FAILED (recorded in the results; going on)", file=sys.stderr, flush=True)
            return False, None

    def over(self, what: str, needs_s: float = 0.0) -> bool:
        """True (and noted) when `what`, expected to take `needs_s`, would end past the deadline."""
        if time.monotonic() + needs_s < self.end:
            return False
        self.skipped.append(what)
        print(f"  time budget spent: skipping {what}", file=sys.stderr, flush=True)
        return True


def stats(xs: list[float]) -> dict:
    if not xs:
        return {"median_s": None, "min_s": None, "max_s": None, "n": 0, "samples_s": []}
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs), "samples_s": xs}


def reusable_stager(options):
    """A DefaultStager that can be passed to `dcp.async_save` again and again; `.release()` closes it.

    torch 2.11 (seen on the GPU image) closes the stager's inner StateDictStager at the end of every
    stage: that drops its cached pinned buffers and clears its copy dispatch table, so the second
    save fails with ``KeyError: <class 'type'>`` (later releases no longer close it there). Reuse
    with cached pinned buffers is DCP's best setting, so the inner close is deferred to release().
    """
    from torch.distributed.checkpoint.staging import DefaultStager

    stager = DefaultStager(options)
    inner = getattr(stager, "_state_dict_stager", None)
    if inner is not None and callable(getattr(inner, "close", None)):
        real_close = inner.close
        inner.close = lambda: None

        def release() -> None:
            inner.close = real_close
            stager.close()
        stager.release = release
    else:
        stager.release = stager.close
    return stager


def dcp_parts(resp):
    """(staged future or None, durable future) of whatever dcp.async_save returned."""
    return getattr(resp, "staging_completion", None), getattr(resp, "upload_completion", resp)


