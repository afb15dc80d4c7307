"""Contract semantics of loading and listing (DESIGN.md section 2): committed-only listing, strict
loading, dynamic components and patterns, late metrics, an fsspec (memory://) root."""
from __future__ import annotations

import json
import logging
import os
import uuid

import pytest
import torch

import async_ckpt as ac
from support.semantics import G, GatedWrites, comps, step_folders
from support.stateful import Box


def test_load_with_nothing_committed(tmp_path):
    root = tmp_path / "never_created"
    ck = ac.AsyncCheckpointer(root, comps())
    assert ck.load() is None
    assert ck.latest_step() is None and ck.list_checkpoints() == []
    with pytest.raises(ac.CheckpointNotFoundError):
        ck.load(0)
    (root / "step-0000000003").mkdir(parents=True)       # crashed save: no manifest
    (root / "step-0000000003" / "data-r00000-0000.bin").write_bytes(b"x" * 100)
    assert ck.load() is None
    with pytest.raises(ac.CheckpointNotFoundError):
        ck.load(3)
    ck.close()


def test_load_uncommitted_step_raises_not_found(tmp_path):
    root = tmp_path / "ck"
    with ac.AsyncCheckpointer(root, comps()) as ck:
        ck.save(1).wait()
        with pytest.raises(ac.CheckpointNotFoundError) as exc_info:
            ck.load(2)
        assert isinstance(exc_info.value, ac.CheckpointError)


def test_only_committed_checkpoints_are_listed(tmp_path):
    root = tmp_path / "ck"
    box = Box()
    with ac.AsyncCheckpointer(root, comps(box)) as ck:
        for step in (1, 2):
            box.state = {"w": torch.full((4,), float(step))}
            ck.save(step).wait()
    fake = root / "step-0000000099"
    fake.mkdir()
    (fake / "data-r00000-abcd.bin").write_bytes(os.urandom(64))
    (root / "step-0000000100").mkdir()
    (root / "not-a-step").mkdir()
    target = Box()
    ck = ac.AsyncCheckpointer(root, comps(target))
    assert [i.step for i in ck.list_checkpoints()] == [1, 2]
    assert ck.latest_step() == 2
    assert ck.load().step == 2
    assert torch.equal(target.loaded["w"], torch.full((4,), 2.0))
    with pytest.raises(ac.CheckpointNotFoundError):
        ck.load(99)
    ck.close()


# ------------------------------------------------------------------------------------------
# strict loading
# ------------------------------------------------------------------------------------------
def test_strict_missing_required_component(tmp_path, caplog):
    root = tmp_path / "ck"
    with ac.AsyncCheckpointer(root, comps(Box({"w": torch.ones(3)}), key="a")) as ck:
        ck.save(1).wait()
    a, b = Box(), Box()
    registered = [ac.StateComponent("a", a, G), ac.StateComponent("b", b, G)]
    ck = ac.AsyncCheckpointer(root, registered)
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.load()
    assert "'b'" in str(exc_info.value)
    assert a.loaded is None and b.loaded is None         # nothing half-loaded
    with pytest.raises(ac.CheckpointError):
        ck.load(1, strict=True)
    assert a.loaded is None
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        info = ck.load(strict=False)
    assert info.step == 1
    assert torch.equal(a.loaded["w"], torch.ones(3)) and b.loaded is None
    assert any("'b'" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    ck.close()


def test_optional_component_absent_is_skipped_with_warning(tmp_path, caplog):
    root = tmp_path / "ck"
    with ac.AsyncCheckpointer(root, comps(Box({"w": torch.ones(3)}), key="a")) as ck:
        ck.save(1).wait()
    a, opt = Box(), Box()
    ck = ac.AsyncCheckpointer(root, [ac.StateComponent("a", a, G),
                                     ac.StateComponent("extra", opt, G, required=False)])
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        info = ck.load(strict=True)
    assert info.step == 1
    assert torch.equal(a.loaded["w"], torch.ones(3)) and opt.loaded is None
    assert any("'extra'" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    ck.close()


def test_unregistered_components_in_checkpoint_are_ignored(tmp_path):
    root = tmp_path / "ck"
    saved = [ac.StateComponent("a", Box({"w": torch.ones(3)}), G),
             ac.StateComponent("old", Box({"x": torch.zeros(2), "s": "gone"}), G)]
    with ac.AsyncCheckpointer(root, saved) as ck:
        ck.save(1).wait()
    a = Box()
    with ac.AsyncCheckpointer(root, comps(a, key="a")) as ck:
        assert ck.load(strict=True).step == 1
    assert torch.equal(a.loaded["w"], torch.ones(3))


# ------------------------------------------------------------------------------------------
# dynamic components and sharing patterns
# ------------------------------------------------------------------------------------------
def test_dynamic_components_and_callable_pattern_recorded(tmp_path):
    root = tmp_path / "ck"
    pattern = {"value": G}
    a = Box({"w": torch.ones(2)})
    b = Box({"v": torch.full((3,), 2.0)})
    current = [ac.StateComponent("a", a, lambda: pattern["value"])]
    ck = ac.AsyncCheckpointer(root, lambda: list(current))
    ck.save(1).wait()
    current.append(ac.StateComponent("b", b, ac.SharingPattern.PER_RANK))
    pattern["value"] = ac.SharingPattern.PER_RANK
    ck.save(2).wait()
    ck.close()

    def manifest(step):
        return json.loads((root / f"step-{step:010d}" / "manifest.json").read_text())

    m1, m2 = manifest(1), manifest(2)
    assert sorted(m1["components"]) == ["a"]
    assert sorted(m2["components"]) == ["a", "b"]
    assert m1["components"]["a"]["sharing_pattern"] == "global"
    assert m2["components"]["a"]["sharing_pattern"] == "per_rank"
    assert m2["components"]["b"]["sharing_pattern"] == "per_rank"

    ta, tb = Box(), Box()
    loader_comps = [ac.StateComponent("a", ta, lambda: pattern["value"]),
                    ac.StateComponent("b", tb, ac.SharingPattern.PER_RANK)]
    with ac.AsyncCheckpointer(root, lambda: loader_comps) as ck2:
        ck2.load(2)
        assert torch.equal(ta.loaded["w"], torch.ones(2)) and torch.equal(tb.loaded["v"], b.state["v"])
        ta.loaded = tb.loaded = None
        ck2.load(1, strict=False)                    # written as GLOBAL, read back as written
        assert torch.equal(ta.loaded["w"], torch.ones(2)) and tb.loaded is None


def test_component_metadata_is_recorded(tmp_path):
    root = tmp_path / "ck"
    meta = {"arch": "mlp", "layers": [1, 2], "nested": {"x": None}}
    with ac.AsyncCheckpointer(root, [ac.StateComponent("a", Box(), G, metadata=meta)]) as ck:
        ck.save(1).wait()
    m = json.loads((root / "step-0000000001" / "manifest.json").read_text())
    assert m["components"]["a"]["metadata"] == meta
    assert isinstance(m["format_version"], int)


# ------------------------------------------------------------------------------------------
# late metrics
# ------------------------------------------------------------------------------------------
def test_report_metrics_persists_across_instances(tmp_path):
    root = tmp_path / "ck"
    with ac.AsyncCheckpointer(root, comps()) as ck:
        ck.save(1, metrics={"loss": 1.0}).wait()
        ck.save(2).wait()
        ck.report_metrics(1, {"val_acc": 0.75, "loss": 0.5})
        ck.report_metrics(2, {"val_acc": 0.5})
        ck.wait()
        assert {i.step: i.metrics for i in ck.list_checkpoints()} == \
            {1: {"loss": 0.5, "val_acc": 0.75}, 2: {"val_acc": 0.5}}
    with ac.AsyncCheckpointer(root, comps()) as ck2:
        assert {i.step: i.metrics for i in ck2.list_checkpoints()} == \
            {1: {"loss": 0.5, "val_acc": 0.75}, 2: {"val_acc": 0.5}}
        assert ck2.load(1).metrics == {"loss": 0.5, "val_acc": 0.75}
        with pytest.raises(ac.CheckpointNotFoundError):
            ck2.report_metrics(3, {"val_acc": 1.0})
        with pytest.raises(ac.CheckpointNotFoundError):
            ck2.report_metrics(42, {"val_acc": 1.0})
    assert step_folders(root) == ["step-0000000001", "step-0000000002"]


def test_report_metrics_for_a_save_in_flight(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps())
    gate = GatedWrites(monkeypatch, ck)
    handle = ck.save(1, metrics={"loss": 2.0})
    ck.report_metrics(1, {"val_loss": 0.3})     # accepted although not committed yet
    gate.gate.set()
    handle.wait(30)
    ck.wait()
    assert ck.list_checkpoints()[0].metrics == {"loss": 2.0, "val_loss": 0.3}
    ck.close()


# ------------------------------------------------------------------------------------------
# fsspec memory:// root
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_memory_filesystem_round_trip(compression):
    import fsspec

    name = f"async-ckpt-test-{uuid.uuid4().hex}"
    url = f"memory://{name}"
    state = {"w": torch.randn(1000), "b": torch.arange(7, dtype=torch.int16), "s": "x",
             "f": float("nan"), "nested": {1: (True, None)}}
    try:
        box = Box(state)
        with ac.AsyncCheckpointer(url, comps(box), compression=compression, keep_last=1) as ck:
            assert ck.load() is None
            ck.save(1, metrics={"loss": 1.0}).wait()
            info = ck.save(2, metrics={"loss": 0.5}).wait()
            assert info.url.startswith("memory://") and info.url.endswith("step-0000000002")
            ck.report_metrics(2, {"acc": 0.9})
        target = Box()
        with ac.AsyncCheckpointer(url, comps(target)) as ck2:
            assert [i.step for i in ck2.list_checkpoints()] == [2]
            loaded = ck2.load()
            assert loaded.step == 2 and loaded.metrics == {"loss": 0.5, "acc": 0.9}
            with pytest.raises(ac.CheckpointNotFoundError):
                ck2.load(1)
            with pytest.raises(ac.CheckpointError):
                ck2.save(2)
        fs = fsspec.filesystem("memory")
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"/{name}", detail=False))
        assert names == ["step-0000000002"]              # retention removed step 1 there too
        got = target.loaded
        assert torch.equal(got["w"], state["w"]) and torch.equal(got["b"], state["b"])
        assert got["b"].dtype == torch.int16
        assert got["s"] == "x" and got["f"] != got["f"] and got["nested"] == {1: (True, None)}
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/{name}"):
            fs.rm(f"/{name}", recursive=True)
