"""Corruption and hostile input in manifests: every damaged or malicious checkpoint fails to load with a
CheckpointError (mostly CorruptCheckpointError), never loads silently, never runs code, and leaves
every registered component untouched (load verifies everything before any load_state_dict).

Each test saves real checkpoints (steps 1 and 2, components "a" = nn.Linear and "b" = a dict with
several tensors and JSON leaves), damages step 2 on disk, then loads it with a fresh checkpointer
whose components hold sentinel state.
"""
from __future__ import annotations

import logging
import random

import pytest

from async_ckpt import CheckpointNotFoundError
from support.compare import assert_same
from support.corruption import (AT_COMP, AT_F0, AT_ROOT, AT_SHARD, AT_T0, Replace, Saved, a_module, assert_untouched, b_state, edit_manifest, fresh, load_fails, load_ok, pop_field, set_field)

# -- the manifest -------------------------------------------------------------------------------
def test_deleted_manifest_makes_the_step_invisible(saved):
    saved.manifest(2).unlink()
    ckpt, a, b = fresh(saved.root)
    assert ckpt.latest_step() == 1
    assert [i.step for i in ckpt.list_checkpoints()] == [1]
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(step=2)
    assert_untouched(a, b)
    info = ckpt.load()                     # latest falls back to step 1
    assert info.step == 1
    assert_same(b.loaded, b_state(1))
    assert_same(dict(a.state_dict()), dict(a_module(1).state_dict()))


def _garbage(saved: Saved) -> dict[str, bytes]:
    raw = saved.manifest(2).read_bytes()
    return {
        "empty": b"",
        "zeros": b"\0" * 512,
        "random": random.Random(7).randbytes(4096),
        "truncated-json": raw[: len(raw) // 2],
        "one-byte-short": raw[:-1],
        "not-utf8": b"\xff\xfe\xfd" + raw,
        "null": b"null",
        "list": b"[]",
        "string": b'"manifest"',
        "number": b"42",
        "deeply-nested": b"[" * 200_000 + b"]" * 200_000,
        "nan-version": raw.replace(b'"format_version":1', b'"format_version":NaN'),
    }


@pytest.mark.parametrize("kind", ["empty", "zeros", "random", "truncated-json", "one-byte-short",
                                  "not-utf8", "null", "list", "string", "number", "deeply-nested",
                                  "nan-version"])
def test_garbage_manifest(saved, kind, caplog):
    saved.manifest(2).write_bytes(_garbage(saved)[kind])
    err = load_fails(saved)
    assert str(saved.manifest(2)) in str(err), f"error does not name the manifest: {err}"
    ckpt, _, _ = fresh(saved.root)
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        steps = [i.step for i in ckpt.list_checkpoints()]
    assert steps == [1], "list_checkpoints must skip an unreadable manifest"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(saved.manifest(2)) in m for m in warnings), \
        f"no warning naming {saved.manifest(2)}: {warnings}"
    load_ok(saved, 1)


MISSING = {
    "format_version": pop_field(AT_ROOT, "format_version"),
    "step": pop_field(AT_ROOT, "step"),
    "created": pop_field(AT_ROOT, "created"),
    "files": pop_field(AT_ROOT, "files"),
    "components": pop_field(AT_ROOT, "components"),
    "nbytes": pop_field(AT_ROOT, "nbytes"),
    "stored_nbytes": pop_field(AT_ROOT, "stored_nbytes"),
    "file.size": pop_field(AT_F0, "size"),
    "file.hash": pop_field(AT_F0, "hash"),
    "component.sharing_pattern": pop_field(AT_COMP, "sharing_pattern"),
    "component.shards": pop_field(AT_COMP, "shards"),
    "shard.tensors": pop_field(AT_SHARD, "tensors"),
    "shard.owners": pop_field(AT_SHARD, "owners"),
    "shard.tree": pop_field(AT_SHARD, "tree"),
    "tensor.file": pop_field(AT_T0, "file"),
    "tensor.dtype": pop_field(AT_T0, "dtype"),
    "tensor.shape": pop_field(AT_T0, "shape"),
    "tensor.offset": pop_field(AT_T0, "offset"),
    "tensor.length": pop_field(AT_T0, "length"),
    "tensor.nbytes": pop_field(AT_T0, "nbytes"),
    "tensor.codec": pop_field(AT_T0, "codec"),
    "tensor.hash": pop_field(AT_T0, "hash"),
}

WRONG_TYPES = {
    "root-is-list": lambda d: Replace([d]),
    "format_version-str": set_field(AT_ROOT, "format_version", "1"),
    "step-str": set_field(AT_ROOT, "step", "2"),
    "step-negative": set_field(AT_ROOT, "step", -2),
    "step-float": set_field(AT_ROOT, "step", 2.0),
    "step-of-another-folder": set_field(AT_ROOT, "step", 7),
    "created-int": set_field(AT_ROOT, "created", 5),
    "nbytes-str": set_field(AT_ROOT, "nbytes", "big"),
    "metrics-list": set_field(AT_ROOT, "metrics", [1, 2]),
    "metrics-str": set_field(AT_ROOT, "metrics", "loss=1"),
    "timings-list": set_field(AT_ROOT, "timings", [1, 2]),
    "files-list": lambda d: d.__setitem__("files", list(d["files"])),
    "file-entry-int": lambda d: d["files"].__setitem__(next(iter(d["files"])), 5),
    "file-size-str": lambda d: AT_F0(d).__setitem__("size", str(AT_F0(d)["size"])),
    "file-size-negative": lambda d: AT_F0(d).__setitem__("size", -1),
    "components-list": lambda d: d.__setitem__("components", [d["components"]]),
    "component-str": lambda d: d["components"].__setitem__("b", "b"),
    "sharing_pattern-int": set_field(AT_COMP, "sharing_pattern", 3),
    "sharing_pattern-unknown": set_field(AT_COMP, "sharing_pattern", "bogus"),
    "shards-list": lambda d: AT_COMP(d).__setitem__("shards", [AT_SHARD(d)]),
    "shard-list": lambda d: AT_COMP(d)["shards"].__setitem__("global", []),
    "tensors-dict": lambda d: AT_SHARD(d).__setitem__("tensors", {"0": AT_T0(d)}),
    "tensor-str": lambda d: AT_SHARD(d)["tensors"].__setitem__(0, "tensor"),
    "owners-str": set_field(AT_SHARD, "owners", "0"),
    "dtype-int": set_field(AT_T0, "dtype", 5),
    "dtype-unknown": set_field(AT_T0, "dtype", "float33"),
    "dtype-not-a-dtype": set_field(AT_T0, "dtype", "Tensor"),
    "shape-str": set_field(AT_T0, "shape", "4096"),
    "shape-float": set_field(AT_T0, "shape", [4096.0]),
    "shape-negative": set_field(AT_T0, "shape", [-4096]),
    "shape-bool": set_field(AT_T0, "shape", [True]),
    "offset-str": set_field(AT_T0, "offset", "0"),
    "offset-float": set_field(AT_T0, "offset", 0.0),
    "offset-bool": set_field(AT_T0, "offset", False),
    "offset-null": set_field(AT_T0, "offset", None),
    "offset-negative": set_field(AT_T0, "offset", -64),
    "length-negative": set_field(AT_T0, "length", -1),
    "nbytes-float": set_field(AT_T0, "nbytes", 16384.0),
    "codec-int": set_field(AT_T0, "codec", 7),
    "codec-unknown": set_field(AT_T0, "codec", "lz4"),
    "hash-int": set_field(AT_T0, "hash", 123),
    "hash-malformed": set_field(AT_T0, "hash", "z" * 32),
    "frames-str": set_field(AT_T0, "frames", "abc"),
    "frames-zero": set_field(AT_T0, "frames", [0]),
    "tensor-file-not-listed": set_field(AT_T0, "file", "data-r00000-00000000.bin"),
    "tree-tensor-index-out-of-range": lambda d: AT_SHARD(d).__setitem__("tree", {"t": 99}),
    "tree-tensor-index-str": lambda d: AT_SHARD(d).__setitem__("tree", {"t": "0"}),
    "tree-tensor-index-bool": lambda d: AT_SHARD(d).__setitem__("tree", {"t": True}),
    "tree-unknown-tag": lambda d: AT_SHARD(d).__setitem__("tree", {"zz": 1}),
    "tree-empty-node": lambda d: AT_SHARD(d).__setitem__("tree", {}),
    "tree-bare-list": lambda d: AT_SHARD(d).__setitem__("tree", [1, 2]),
    "tree-dict-items-str": lambda d: AT_SHARD(d).__setitem__("tree", {"d": "items"}),
    "tree-dict-item-not-pair": lambda d: AT_SHARD(d).__setitem__("tree", {"d": [["k"]]}),
    "tree-dict-key-unhashable": lambda d: AT_SHARD(d).__setitem__("tree", {"d": [[["k"], 1]]}),
    "tree-seq-not-list": lambda d: AT_SHARD(d).__setitem__("tree", {"l": 5}),
    "tree-bad-float-tag": lambda d: AT_SHARD(d).__setitem__("tree", {"f": "nanx"}),
    "tree-bad-dtype-tag": lambda d: AT_SHARD(d).__setitem__("tree", {"dt": "float33"}),
}


def _check_manifest_rejected(saved: Saved) -> None:
    err = load_fails(saved)
    assert str(saved.manifest(2)) in str(err) or str(saved.folder(2)) in str(err), \
        f"the error does not say which checkpoint is bad: {err}"
    ckpt, _, _ = fresh(saved.root)
    steps = [i.step for i in ckpt.list_checkpoints()]    # must not raise
    assert 1 in steps
    load_ok(saved, 1)


@pytest.mark.parametrize("field", list(MISSING))
def test_manifest_with_missing_field(saved, field):
    edit_manifest(saved, MISSING[field])
    _check_manifest_rejected(saved)


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_manifest_with_wrong_types_or_values(saved, case):
    edit_manifest(saved, WRONG_TYPES[case])
    _check_manifest_rejected(saved)


@pytest.mark.parametrize("version", [0, 4, 999, -1, "1", 1.0, True, None, [1]])
def test_unknown_format_version(saved, version):
    edit_manifest(saved, set_field(AT_ROOT, "format_version", version))
    err = load_fails(saved)
    assert "format_version" in str(err) and str(saved.manifest(2)) in str(err)
    if version == 4:        # the next version (2 is read since SHARDED components, 3 since node objects)
        assert "upgrade" in str(err).lower()
