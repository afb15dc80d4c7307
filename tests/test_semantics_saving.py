"""Contract semantics of saving (DESIGN.md section 2): handles, timeouts, failures raised exactly
once, committed steps, max_pending, close, retention before wait() returns, leftovers."""
from __future__ import annotations

import datetime
import os
import threading
import time

import pytest
import torch

import async_ckpt as ac

G = ac.SharingPattern.GLOBAL

from support.semantics import (FailOnce, GatedWrites, FAILING_METHODS, _after_failure_all_is_well,  # noqa: F401
                               comps, step_folders, wait_until)
from support.stateful import Box

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


def test_exiting_without_close_finishes_pending_saves(tmp_path):
    import subprocess
    import sys
    script = (
        "import sys, torch, async_ckpt as ac\n"
        "class B:\n"
        "    def state_dict(self): return {'w': torch.full((32 << 20,), 7.0)}\n"
        "    def load_state_dict(self, sd): pass\n"
        "ck = ac.AsyncCheckpointer(sys.argv[1], [ac.StateComponent('b', B(), ac.SharingPattern.GLOBAL)])\n"
        "ck.save(7)\n")   # no wait(), no close(): the interpreter exits with the save in flight
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "finishing pending saves of steps [7]" in out.stderr
    box = Box({"w": torch.zeros(1)})
    info = ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("b", box, ac.SharingPattern.GLOBAL)]).load()
    assert info.step == 7 and torch.equal(box.loaded["w"], torch.full((32 << 20,), 7.0))


def test_losing_a_commit_race_leaves_the_winners_checkpoint_alone(tmp_path, monkeypatch):
    ck = ac.AsyncCheckpointer(tmp_path, comps())
    real = ck.storage.create_exclusive

    def another_writer_commits_first(path, data):
        real(path, data)            # the winner's manifest lands first ...
        real(path, data)            # ... so ours fails with FileExistsError
    monkeypatch.setattr(ck.storage, "create_exclusive", another_writer_commits_first)
    with pytest.raises(ac.SaveFailedError):
        ck.save(5).wait()
    monkeypatch.undo()
    assert step_folders(tmp_path) == ["step-0000000005"]
    assert ac.AsyncCheckpointer(tmp_path, comps()).load().step == 5
    ck.close()
