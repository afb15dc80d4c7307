"""AsyncCheckpointer.delete(step): uncommit first, then free the data; the one home of deletion
(retention and DivergenceMonitor's rollback use it too)."""
from __future__ import annotations

import threading

import pytest
import async_ckpt as ac
from support.stateful import Box


def test_delete_uncommits_first_then_frees_the_data(tmp_path, monkeypatch):
    ck = ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("b", Box(), ac.SharingPattern.GLOBAL)])
    for step in (1, 2, 3):
        ck.save(step).wait()
    ck.wait()                                     # the post-commit sweeps have run
    calls = []
    real_delete, real_delete_dir = ck.storage.delete, ck.storage.delete_dir
    monkeypatch.setattr(ck.storage, "delete", lambda p: (calls.append(("delete", p)), real_delete(p)))
    monkeypatch.setattr(ck.storage, "delete_dir", lambda p: (calls.append(("rmdir", p)), real_delete_dir(p)))
    ck.delete(2)
    assert calls == [("delete", "step-0000000002/manifest.json"), ("rmdir", "step-0000000002")]
    assert [i.step for i in ck.list_checkpoints()] == [1, 3]
    assert not (tmp_path / "step-0000000002").exists()
    with pytest.raises(ac.CheckpointNotFoundError):
        ck.load(2)
    assert ck.save(2).wait().step == 2            # the step can be saved anew
    ck.close()


def test_delete_of_a_missing_step_or_one_in_flight_raises(tmp_path, monkeypatch):
    ck = ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("b", Box(), ac.SharingPattern.GLOBAL)])
    with pytest.raises(ac.CheckpointNotFoundError, match="no checkpoint of it"):
        ck.delete(7)
    with pytest.raises(ac.InvalidArgumentError):
        ck.delete(-1)
    gate = threading.Event()
    real_open = ck.storage.open_writer

    def gated(path):
        assert gate.wait(30)
        return real_open(path)
    monkeypatch.setattr(ck.storage, "open_writer", gated)
    handle = ck.save(5)
    with pytest.raises(ac.CheckpointError, match="being saved"):
        ck.delete(5)
    gate.set()
    handle.wait()
    ck.delete(5)
    assert ck.latest_step() is None
    ck.close()
    with pytest.raises(ac.CheckpointError, match="closed"):
        ck.delete(5)
