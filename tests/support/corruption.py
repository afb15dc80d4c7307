"""Shared state, fixtures and damage helpers of the corruption tests (test_corruption_*.py)."""
from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from async_ckpt import (AsyncCheckpointer, CheckpointError,
                        CorruptCheckpointError, SharingPattern, StateComponent)
from async_ckpt.format import seal
from async_ckpt.format.manifest import HASH_KEY
from support.compare import assert_same
from support.stateful import Box

G = SharingPattern.GLOBAL


# -- state and helpers ---------------------------------------------------------------------------
def b_state(step: int) -> dict:
    return {
        "w": torch.arange(4096, dtype=torch.float32) * 0.25 + step,
        "ids": torch.arange(1000, dtype=torch.int64) * 3 + step,
        "half": torch.linspace(-1, 1, 333).to(torch.bfloat16),   # odd size: padding follows it
        "meta": {"lr": 0.1, "name": "b", "step": step, "betas": (0.9, 0.999)},
    }


def a_module(step: int) -> torch.nn.Linear:
    torch.manual_seed(step)
    return torch.nn.Linear(16, 8)


@dataclass
class Saved:
    root: Path
    compression: str | None

    def folder(self, step: int) -> Path:
        return self.root / f"step-{step:010d}"

    def manifest(self, step: int = 2) -> Path:
        return self.folder(step) / "manifest.json"

    def data(self, step: int = 2) -> Path:
        (data,) = self.folder(step).glob("data-*.bin")
        return data

    def doc(self, step: int = 2) -> dict:
        return json.loads(self.manifest(step).read_bytes())

    def tensors(self, key: str = "b", step: int = 2) -> list[dict]:
        return self.doc(step)["components"][key]["shards"]["global"]["tensors"]


def save_steps(root: Path, compression: str | None = None) -> Saved:
    for step in (1, 2):
        a, b = a_module(step), Box(b_state(step))
        with AsyncCheckpointer(root, [StateComponent("a", a, G), StateComponent("b", b, G)],
                               compression=compression) as ckpt:
            ckpt.save(step).wait()
    return Saved(root, compression)


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict:
    """Checkpoints saved once per module; each test damages its own copy."""
    base = tmp_path_factory.mktemp("templates")
    return {c: save_steps(base / (c or "raw"), c).root for c in (None, "zstd")}


def _copy(templates: dict, tmp_path: Path, compression: str | None) -> Saved:
    root = tmp_path / "ckpts"
    shutil.copytree(templates[compression], root)
    return Saved(root, compression)


@pytest.fixture
def saved(templates, tmp_path) -> Saved:
    return _copy(templates, tmp_path, None)


@pytest.fixture
def saved_zstd(templates, tmp_path) -> Saved:
    return _copy(templates, tmp_path, "zstd")


def fresh(root: Path, **options) -> tuple[AsyncCheckpointer, torch.nn.Linear, Box]:
    """A new checkpointer whose components hold sentinel state (zeros, nothing loaded)."""
    a = torch.nn.Linear(16, 8)
    with torch.no_grad():
        a.weight.zero_()
        a.bias.zero_()
    b = Box({"sentinel": torch.zeros(1)})
    return AsyncCheckpointer(root, [StateComponent("a", a, G), StateComponent("b", b, G)], **options), a, b


def assert_untouched(a: torch.nn.Linear, b: Box) -> None:
    assert b.loads == 0, "load_state_dict was called on 'b' although the load failed"
    assert not a.weight.any() and not a.bias.any(), \
        "'a' was modified although the checkpoint failed verification"


def load_fails(saved: Saved, step: int = 2, error: type = CorruptCheckpointError,
               **options) -> CheckpointError:
    """Load `step` into fresh components: it must raise `error` and change nothing."""
    ckpt, a, b = fresh(saved.root, **options)
    with pytest.raises(error) as info:
        ckpt.load(step=step)
    assert isinstance(info.value, CheckpointError)
    assert_untouched(a, b)
    return info.value


def load_ok(saved: Saved, step: int) -> None:
    """The intact step still loads exactly (corruption of one step never spreads)."""
    ckpt, a, b = fresh(saved.root)
    info = ckpt.load(step=step)
    assert info is not None and info.step == step
    assert_same(dict(a.state_dict()), dict(a_module(step).state_dict()))
    assert b.loads == 1
    assert_same(b.loaded, b_state(step))


class Replace:
    """Returned by a manifest change to write `doc` instead of the edited original."""

    def __init__(self, doc: Any):
        self.doc = doc


def resealed(doc: Any) -> bytes:
    """An edited manifest document as bytes, sealed again (format/seal.py) when it is a JSON
    object, so the edit reaches the manifest's validator instead of stopping at its seal (what a
    hostile editor would do; tests/test_hostile_folders.py checks the seal itself)."""
    if not isinstance(doc, dict):
        return json.dumps(doc).encode()
    doc = {k: v for k, v in doc.items() if k != HASH_KEY}
    return seal.seal(json.dumps(doc, separators=(",", ":")).encode(), HASH_KEY)


def edit_manifest(saved: Saved, change: Callable[[dict], Any], step: int = 2) -> None:
    before = saved.manifest(step).read_bytes()
    doc = json.loads(before)
    result = change(doc)
    after = resealed(result.doc if isinstance(result, Replace) else doc)
    canon = lambda raw: json.dumps(json.loads(raw), sort_keys=True)  # noqa: E731
    assert canon(after) != canon(before), "the change did not change the manifest"
    saved.manifest(step).write_bytes(after)


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def shard(doc: dict, key: str = "b") -> dict:
    return doc["components"][key]["shards"]["global"]


def tensor0(doc: dict) -> dict:
    return shard(doc)["tensors"][0]


def file0(doc: dict) -> dict:
    return next(iter(doc["files"].values()))


class Payload:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def live_payload(tmp_path: Path, marker: Path) -> bytes:
    """A pickle that creates `marker` when loaded; checked to be live on a decoy marker first."""
    decoy = tmp_path / "decoy-marker"
    pickle.loads(pickle.dumps(Payload(decoy))).close()
    assert decoy.exists(), "the pickle payload is not live; the test would prove nothing"
    decoy.unlink()
    return pickle.dumps(Payload(marker))


def pop_field(getter: Callable[[dict], Any], key: str) -> Callable[[dict], None]:
    def change(doc):
        node = getter(doc)
        assert key in node, f"the saved manifest has no {key!r}: fix the test"
        del node[key]
    return change


def set_field(getter: Callable[[dict], Any], key: Any, value: Any) -> Callable[[dict], None]:
    def change(doc):
        getter(doc)[key] = value
    return change


AT_ROOT = lambda d: d  # noqa: E731
AT_COMP = lambda d: d["components"]["b"]  # noqa: E731
AT_SHARD = shard
AT_T0 = tensor0
AT_F0 = file0
