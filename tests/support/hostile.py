"""Helpers of the hostile-folder tests (tests/test_hostile_folders.py, tests/test_manifest_seal.py):
a checkpoint's files snapshotted before and after a read (`guarded`: nothing under the root or
outside it may change), loads and listings that must refuse or skip step 2, metrics files written
sealed or not."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

import async_ckpt as ac
from async_ckpt import CheckpointError, CorruptCheckpointError
from async_ckpt.format import seal
from async_ckpt.format.metrics_file import HASH_KEY as METRICS_HASH_KEY
from async_ckpt.storage.testing.conformance import bounded
from support.corruption import Saved, assert_untouched, fresh, load_ok

G = ac.SharingPattern.GLOBAL
FIXTURE = Path(__file__).parent.parent / "fixtures" / "sealed_manifest_v1"   # tests/fixtures
LATE = "metrics-00000000000000000001-deadbeef.json"


# -- helpers ------------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict:
    """What is under `roots`, without following symlinks or opening FIFOs: to prove nothing
    changed."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                p = Path(folder) / name
                if p.is_symlink():
                    seen[str(p)] = ("link", os.readlink(p))
                elif p.is_fifo():
                    seen[str(p)] = ("fifo",)
                elif p.is_file() and p.stat().st_size > 64 << 20:     # a sparse giant: no reading it
                    seen[str(p)] = ("big", p.stat().st_size, p.stat().st_mtime_ns)
                elif p.is_file():
                    seen[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return seen


def fifos_under(root: Path) -> tuple[str, ...]:
    return tuple(str(Path(f) / n) for f, _, names in os.walk(root) for n in names
                 if (Path(f) / n).is_fifo())


def load_refused(saved: Saved, step: int | None = 2, error: type = CorruptCheckpointError,
                 match: str | None = None, **options) -> CheckpointError:
    """load(step) raises `error` (a CheckpointError) within the bound and changes nothing."""
    ckpt, a, b = fresh(saved.root, **options)
    with pytest.raises(error, match=match) as info:
        bounded(lambda: ckpt.load(step=step), fifos=fifos_under(saved.root))
    assert isinstance(info.value, CheckpointError)
    assert_untouched(a, b)
    return info.value


def listed(saved: Saved, caplog) -> tuple[list[ac.CheckpointInfo], list[str]]:
    """list_checkpoints() within the bound, and the warnings it logged."""
    caplog.clear()
    ckpt, _, _ = fresh(saved.root)
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        infos = bounded(ckpt.list_checkpoints, fifos=fifos_under(saved.root))
    return infos, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def step2_skipped(saved: Saved, caplog, what: str) -> None:
    infos, warnings = listed(saved, caplog)
    assert [i.step for i in infos] == [1], "the hostile step must be skipped, the others listed"
    assert any("step 2" in w and what in w for w in warnings), warnings
    load_ok(saved, 1)


def outside_copy(saved: Saved, tmp_path: Path, name: str, data: bytes) -> Path:
    place = tmp_path / "elsewhere" / name
    place.parent.mkdir(exist_ok=True)
    place.write_bytes(data)
    return place


def write_metrics(folder: Path, doc: dict, name: str = LATE, sealed: bool = True) -> Path:
    body = json.dumps(doc, separators=(",", ":")).encode()
    path = folder / name
    path.write_bytes(seal.seal(body, METRICS_HASH_KEY) if sealed else body)
    return path


@pytest.fixture
def guarded(saved, tmp_path):
    """`saved`, plus a check after the test that nothing under the root or outside it changed
    (beyond what the test itself did before calling `guarded.freeze()`)."""
    class Guard:
        before: dict | None = None

        def freeze(self) -> None:
            self.before = snapshot(saved.root, tmp_path / "elsewhere")

        def check(self) -> None:
            assert snapshot(saved.root, tmp_path / "elsewhere") == self.before, "a read changed files"

    guard = Guard()
    guard.saved = saved
    yield guard
    if guard.before is not None:
        guard.check()


