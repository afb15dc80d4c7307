"""The semantics callers rely on (DESIGN.md section 2): handles, timeouts, failures raised exactly
once, committed-only listing, strict loading, dynamic components, max_pending, close, retention
before wait() returns, leftovers of crashed saves, late metrics, and an fsspec (memory://) root."""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
import uuid

import pytest
import torch

import async_ckpt as ac

G = ac.SharingPattern.GLOBAL


class Box:
    def __init__(self, state=None):
        self.state = state if state is not None else {"w": torch.arange(4.0)}
        self.loaded = None

    def state_dict(self):
        return self.state

    def load_state_dict(self, sd):
        self.loaded = sd


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


# ------------------------------------------------------------------------------------------
# handles and CheckpointInfo
# ------------------------------------------------------------------------------------------
def test_save_returns_handle_and_info(tmp_path):
    root = tmp_path / "ck"
    state = {"w": torch.randn(100), "i": torch.arange(10), "meta": {"epoch": 2}}
    before = datetime.datetime.now(datetime.timezone.utc)
    with ac.AsyncCheckpointer(root, comps(Box(state))) as ck:
        handle = ck.save(7, metrics={"loss": 0.25, "acc": 1})
        assert isinstance(handle, ac.SaveHandle)
        handle.wait_staged()
        info = handle.wait()
        assert handle.done()
        assert handle.wait() == info                     # waiting again gives the same answer
    assert isinstance(info, ac.CheckpointInfo)
    assert info.step == 7
    folder = root / "step-0000000007"
    assert os.path.samefile(info.url, folder)
    assert info.metrics == {"loss": 0.25, "acc": 1.0}
    assert info.nbytes == 100 * 4 + 10 * 8
    data_files = [p for p in folder.iterdir() if p.name != "manifest.json"]
    assert info.stored_nbytes == sum(p.stat().st_size for p in data_files) >= info.nbytes
    created = datetime.datetime.fromisoformat(info.created)
    assert created.tzinfo is not None
    assert before - datetime.timedelta(seconds=5) <= created <= datetime.datetime.now(datetime.timezone.utc)
    listed = ac.AsyncCheckpointer(root, comps()).list_checkpoints()
    assert [(i.step, i.url, i.nbytes, i.stored_nbytes, i.created, i.metrics) for i in listed] == \
        [(info.step, info.url, info.nbytes, info.stored_nbytes, info.created, info.metrics)]


def test_wait_timeout_raises_builtin_timeout_and_save_goes_on(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps())
    gate = GatedWrites(monkeypatch, ck)
    handle = ck.save(1)
    assert gate.started.wait(10)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.05)
    assert time.monotonic() - t0 < 5
    assert not handle.done()
    assert not (root / "step-0000000001" / "manifest.json").exists()
    gate.gate.set()
    info = handle.wait(timeout=30)
    assert info.step == 1 and handle.done()
    assert (root / "step-0000000001" / "manifest.json").exists()
    ck.close()


def test_save_snapshots_state_at_call_time(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    w = torch.arange(1000.0)
    box = Box({"w": w, "n": 1})
    ck = ac.AsyncCheckpointer(root, comps(box))
    gate = GatedWrites(monkeypatch, ck)
    handle = ck.save(1)
    handle.wait_staged()
    w.add_(100.0)                            # like optimizer.step() right after save()
    box.state["n"] = 2
    gate.gate.set()
    handle.wait(30)
    ck.close()
    target = Box()
    with ac.AsyncCheckpointer(root, comps(target)) as ck2:
        ck2.load()
    assert torch.equal(target.loaded["w"], torch.arange(1000.0)) and target.loaded["n"] == 1


def test_non_finite_metrics_round_trip(tmp_path):
    root = tmp_path / "ck"
    with ac.AsyncCheckpointer(root, comps()) as ck:
        info = ck.save(1, metrics={"loss": float("nan"), "grad": float("inf"), "m": float("-inf"), "z": 0}).wait()
    for metrics in (info.metrics, ac.AsyncCheckpointer(root, comps()).list_checkpoints()[0].metrics):
        assert metrics["loss"] != metrics["loss"]
        assert metrics["grad"] == float("inf") and metrics["m"] == float("-inf") and metrics["z"] == 0.0


# ------------------------------------------------------------------------------------------
# a failure is raised exactly once
# ------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("method", FAILING_METHODS)
def test_failure_raised_by_handle_wait_only(tmp_path, monkeypatch, method):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps())
    FailOnce(monkeypatch, ck, method)
    handle = ck.save(1)
    with pytest.raises(ac.SaveFailedError) as exc_info:
        handle.wait()
    err = exc_info.value
    assert isinstance(err, ac.CheckpointError)
    assert isinstance(err.causes[0], OSError) and "injected" in str(err)
    assert handle.done()
    # reported once: neither the next save, nor wait(), nor close() raises it again
    assert ck.save(2).wait().step == 2
    _after_failure_all_is_well(ck, root)


@pytest.mark.parametrize("method", FAILING_METHODS)
def test_failure_raised_by_next_save(tmp_path, monkeypatch, method):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps())
    FailOnce(monkeypatch, ck, method)
    handle = ck.save(1)
    wait_until(handle.done)
    with pytest.raises(ac.SaveFailedError) as exc_info:
        ck.save(2)
    assert isinstance(exc_info.value.causes[0], OSError)
    assert not (root / "step-0000000002").exists()      # the save that raised did not start
    assert ck.save(2).wait().step == 2                  # raised once only
    _after_failure_all_is_well(ck, root)


@pytest.mark.parametrize("method", FAILING_METHODS)
def test_failure_raised_by_next_save_while_still_in_flight(tmp_path, monkeypatch, method):
    # With max_pending=1 the next save waits for the failing one and must raise its error.
    # Repeated because the hand-over between writer thread and caller is timing dependent.
    for attempt in range(25):
        root = tmp_path / f"ck{attempt}"
        with monkeypatch.context() as mp:
            ck = ac.AsyncCheckpointer(root, comps())
            FailOnce(mp, ck, method)
            ck.save(1)
            with pytest.raises(ac.SaveFailedError):
                ck.save(2)
        assert ck.save(2).wait().step == 2
        if attempt == 0:
            _after_failure_all_is_well(ck, root)
        else:
            ck.close()


@pytest.mark.parametrize("method", FAILING_METHODS)
def test_failure_raised_by_wait(tmp_path, monkeypatch, method):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps())
    FailOnce(monkeypatch, ck, method)
    ck.save(1)
    with pytest.raises(ac.SaveFailedError):
        ck.wait()
    ck.wait()
    _after_failure_all_is_well(ck, root)


@pytest.mark.parametrize("method", FAILING_METHODS)
def test_failure_raised_by_close(tmp_path, monkeypatch, method):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps())
    FailOnce(monkeypatch, ck, method)
    ck.save(1)
    with pytest.raises(ac.SaveFailedError):
        ck.close()
    ck.close()                                   # idempotent, and does not raise it again
    with pytest.raises(ac.CheckpointError):
        ck.save(2)                               # closed
    assert step_folders(root) == []
    assert ac.AsyncCheckpointer(root, comps()).list_checkpoints() == []


def test_failure_in_context_manager_exit_is_raised(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    with pytest.raises(ac.SaveFailedError):
        with ac.AsyncCheckpointer(root, comps()) as ck:
            FailOnce(monkeypatch, ck, "create_exclusive")
            ck.save(1)
    assert step_folders(root) == []


# ------------------------------------------------------------------------------------------
# committed steps
# ------------------------------------------------------------------------------------------
def test_saving_a_committed_step_raises(tmp_path):
    root = tmp_path / "ck"
    box = Box()
    with ac.AsyncCheckpointer(root, comps(box)) as ck:
        ck.save(5).wait()
        box.state = {"w": torch.full((4,), 9.0)}
        with pytest.raises(ac.CheckpointError) as exc_info:
            ck.save(5)
        assert "5" in str(exc_info.value)
    with ac.AsyncCheckpointer(root, comps()) as ck2:   # a new instance sees it committed too
        with pytest.raises(ac.CheckpointError):
            ck2.save(5)
    target = Box()
    with ac.AsyncCheckpointer(root, comps(target)) as ck3:
        ck3.load(5)
    assert torch.equal(target.loaded["w"], torch.arange(4.0))   # not overwritten


def test_saving_a_step_in_flight_raises(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps(), max_pending=2)
    gate = GatedWrites(monkeypatch, ck)
    h = ck.save(1)
    with pytest.raises(ac.CheckpointError):
        ck.save(1)
    gate.gate.set()
    assert h.wait(30).step == 1
    ck.close()


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
# max_pending, close, context manager
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_pending", [1, 2])
def test_max_pending_bounds_saves_in_flight(tmp_path, monkeypatch, max_pending):
    root = tmp_path / "ck"
    box = Box()
    ck = ac.AsyncCheckpointer(root, comps(box), max_pending=max_pending)
    gate = GatedWrites(monkeypatch, ck)
    handles = []
    for step in range(1, max_pending + 1):      # these return although nothing is written
        box.state = {"w": torch.full((4,), float(step))}
        handles.append(ck.save(step))
    assert not any(h.done() for h in handles)

    blocked = threading.Thread(target=lambda: handles.append(ck.save(max_pending + 1)), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "save() must wait while max_pending saves are in flight"
    assert len(handles) == max_pending
    gate.gate.set()
    blocked.join(30)
    assert not blocked.is_alive()
    ck.wait()
    assert all(h.done() for h in handles) and len(handles) == max_pending + 1
    assert [i.step for i in ck.list_checkpoints()] == list(range(1, max_pending + 2))
    target = Box()
    with ac.AsyncCheckpointer(root, comps(target)) as ck2:
        for step in range(1, max_pending + 1):
            ck2.load(step)
            assert torch.equal(target.loaded["w"], torch.full((4,), float(step)))
    ck.close()


def test_close_is_idempotent_and_context_manager_closes(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps())
    ck.close()
    ck.close()
    with ac.AsyncCheckpointer(root, comps()) as ck:
        GatedWrites(monkeypatch, ck, delay=0.2)        # a slow write: exit must wait for it
        handle = ck.save(1)
    assert handle.done()
    assert (root / "step-0000000001" / "manifest.json").exists()
    with pytest.raises(ac.CheckpointError):
        ck.save(2)
    ck.close()


def test_context_manager_does_not_mask_the_callers_exception(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    with pytest.raises(KeyError):
        with ac.AsyncCheckpointer(root, comps()) as ck:
            FailOnce(monkeypatch, ck, "create_exclusive")
            ck.save(1)
            raise KeyError("training crashed")


# ------------------------------------------------------------------------------------------
# retention runs before wait() returns
# ------------------------------------------------------------------------------------------
def test_wait_returns_after_retention(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps(), keep_last=1)
    real_delete_dir = ck.storage.delete_dir

    def slow_delete_dir(path):
        time.sleep(0.05)                  # retention is slow: an early wait() would see it
        real_delete_dir(path)

    monkeypatch.setattr(ck.storage, "delete_dir", slow_delete_dir)
    for step in (1, 2, 3):
        ck.save(step)
    ck.wait()
    assert step_folders(root) == ["step-0000000003"]
    assert [i.step for i in ck.list_checkpoints()] == [3]
    ck.close()


# ------------------------------------------------------------------------------------------
# leftovers of a crashed save never block a save
# ------------------------------------------------------------------------------------------
def test_leftovers_do_not_block_save(tmp_path):
    root = tmp_path / "ck"
    for step in (5, 7):
        folder = root / f"step-{step:010d}"
        folder.mkdir(parents=True)
        (folder / "junk.bin").write_bytes(os.urandom(1000))
        (folder / "data-r00000-deadbeef.bin").write_bytes(os.urandom(128))
        (folder / ".tmp-0123-manifest.json").write_bytes(b"{half")
    box = Box({"w": torch.arange(6.0)})
    ck = ac.AsyncCheckpointer(root, comps(box))
    assert ck.list_checkpoints() == []
    info = ck.save(5).wait()
    assert info.step == 5
    ck.wait()
    names = sorted(os.listdir(root / "step-0000000005"))
    assert "junk.bin" not in names and "data-r00000-deadbeef.bin" not in names
    assert not any(n.startswith(".tmp-") for n in names)
    assert "manifest.json" in names and len(names) == 2
    assert ck.save(7).wait().step == 7                       # the other leftover neither
    assert "junk.bin" not in os.listdir(root / "step-0000000007")
    target = Box()
    with ac.AsyncCheckpointer(root, comps(target)) as ck2:
        assert [i.step for i in ck2.list_checkpoints()] == [5, 7]
        ck2.load(5)
    assert torch.equal(target.loaded["w"], torch.arange(6.0))
    ck.close()


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
