"""Nothing is dropped silently: late metrics that could not be stored are raised, a second report
updates the first, metric-less checkpoints are warned about and stop being protected, and the
scratch objects a killed process left (temp files, write probes) are swept."""
from __future__ import annotations

import logging
import os
import time

import pytest
import torch

import async_ckpt as ac
from async_ckpt.storage import scratch_name
from support.stateful import Box

G = ac.SharingPattern.GLOBAL


def comps(box=None):
    return [ac.StateComponent("b", box or Box({"w": torch.arange(8.0)}), G)]


def test_a_metrics_report_that_cannot_be_stored_is_raised_once(tmp_path, monkeypatch):
    ck = ac.AsyncCheckpointer(tmp_path, comps())
    ck.save(1).wait()
    real = ck.storage.create_exclusive

    def full_disk(path, data):
        if "metrics-" in path:
            raise OSError(28, "No space left on device (injected)")
        return real(path, data)
    monkeypatch.setattr(ck.storage, "create_exclusive", full_disk)
    ck.report_metrics(1, {"loss": 0.5})
    with pytest.raises(ac.CheckpointError, match=r"report_metrics\(1, .*was not stored.*No space left"):
        ck.wait()
    ck.wait()                                   # raised once
    assert not any(n.startswith((".tmp-", "metrics-")) for n in os.listdir(tmp_path / "step-0000000001"))
    monkeypatch.undo()
    ck.report_metrics(1, {"loss": 0.5})
    ck.close()
    assert ac.AsyncCheckpointer(tmp_path, comps()).list_checkpoints()[0].metrics == {"loss": 0.5}


def test_a_failed_temp_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from async_ckpt.storage import local
    storage = ac.AsyncCheckpointer(tmp_path, comps()).storage
    real = local._write_all

    def half_then_full(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device (injected)")
    monkeypatch.setattr(local, "_write_all", half_then_full)
    with pytest.raises(OSError):
        storage.create_exclusive("step-0000000001/metrics-x.json", b"{}" * 100)
    assert os.listdir(tmp_path / "step-0000000001") == []


def test_a_second_report_updates_the_first_whatever_the_listing_order(tmp_path, monkeypatch):
    ck = ac.AsyncCheckpointer(tmp_path, comps())
    ck.save(1, metrics={"loss": 1.0}).wait()
    ck.report_metrics(1, {"loss": 0.5, "acc": 0.1})
    ck.wait()
    time.sleep(0.01)
    ck.report_metrics(1, {"loss": 0.25})
    ck.close()
    reader = ac.AsyncCheckpointer(tmp_path, comps())
    real = reader.storage.list_dir
    monkeypatch.setattr(reader.storage, "list_dir", lambda p: sorted(real(p), reverse=True))
    assert reader.list_checkpoints()[0].metrics == {"loss": 0.25, "acc": 0.1}


def test_saves_that_never_get_the_ranked_metric_are_warned_about_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="async_ckpt")
    with ac.AsyncCheckpointer(tmp_path, comps(), keep_last=1, keep_best=1, best_metric="val_loss") as ck:
        ck.save(1, metrics={"val_loss": 0.5})
        for step in range(2, 8):
            ck.save(step, metrics={"train_loss": 1.0})     # the eval never reports val_loss
        ck.wait()
        kept = [i.step for i in ck.list_checkpoints()]
    warnings = [r.message for r in caplog.records if "have no such metric" in r.message]
    assert len(warnings) == 1 and "'val_loss'" in warnings[0] and "none is ever removed" in warnings[0]
    assert kept == list(range(1, 8))            # each may still get its metric: none is dropped
    caplog.clear()
    ac.AsyncCheckpointer(tmp_path, comps(), keep_last=1, keep_best=1, best_metric="val_loss").load(4)
    assert any("loaded step 4 has no 'val_loss' metric" in r.message for r in caplog.records)


def test_a_metric_lost_in_a_crash_stops_protecting_its_checkpoint(tmp_path):
    opts = dict(keep_last=1, keep_best=1, best_metric="val_loss")
    with ac.AsyncCheckpointer(tmp_path, comps(), **opts) as ck:
        ck.save(1, metrics={"val_loss": 0.5})
        ck.save(2)                                   # its eval died with the process
    with ac.AsyncCheckpointer(tmp_path, comps(), **opts) as ck:
        ck.save(3, metrics={"val_loss": 0.9})
        ck.wait()
        assert [i.step for i in ck.list_checkpoints()] == [1, 2, 3]   # 2's eval may still come
        ck.save(4, metrics={"val_loss": 0.8})
        ck.wait()
        assert [i.step for i in ck.list_checkpoints()] == [1, 4]      # 2 waited for 2 newer: gone


def test_scratch_objects_of_a_killed_process_are_swept_after_a_commit(tmp_path):
    with ac.AsyncCheckpointer(tmp_path, comps()) as ck:
        ck.save(1).wait()
    old_ns = time.time_ns() - int(3600e9)
    old_probe = tmp_path / f".write-probe-{old_ns:020d}-deadbeef"
    old_tmp = tmp_path / "step-0000000001" / f".tmp-{old_ns:020d}-cafe-manifest.json"
    legacy_tmp = tmp_path / "step-0000000001" / ".tmp-0123abcd-metrics-1.json"   # older releases' name
    fresh_probe = tmp_path / scratch_name("write-probe")                          # a live one
    for p in (old_probe, old_tmp, legacy_tmp, fresh_probe):
        p.write_bytes(b"x")
    with ac.AsyncCheckpointer(tmp_path, comps()) as ck:          # a new process's first commit
        ck.save(2).wait()
        ck.wait()
    assert not old_probe.exists() and not old_tmp.exists() and not legacy_tmp.exists()
    assert fresh_probe.exists(), "a scratch object young enough to be a live write was removed"
    assert not [n for n in os.listdir(tmp_path / "step-0000000001") if n.startswith(".")]


def test_an_unfinished_upload_in_a_committed_folder_is_aborted_after_the_commit(seaweedfs, monkeypatch):
    """With several nodes nobody clears a step's folder before writing (another node may be
    writing there already), so a killed earlier attempt's multipart upload is aborted after the
    commit instead."""
    from async_ckpt.save.coordinator import Coordinator
    from support.s3 import Remote
    remote = Remote(seaweedfs)
    ck = ac.AsyncCheckpointer(remote.url, comps(), storage_options=remote.options(part_size=5 << 20))
    leftover = ck.storage.open_writer("step-0000000001/data-n00001-r00002-dead.bin")
    leftover.write(memoryview(bytes(6 << 20)))           # one part sent: an unfinished upload
    assert remote.uploads() == ["step-0000000001/data-n00001-r00002-dead.bin"]
    monkeypatch.setattr(Coordinator, "before_write", lambda self, job: None)   # as with 2 nodes
    ck.save(1).wait()
    ck.close()
    assert remote.uploads() == []


def test_the_lease_of_a_writer_killed_before_close_is_swept_by_the_next_commit(tmp_path):
    import json
    import socket
    from async_ckpt.save import lease as lease_module
    dead = tmp_path / ".writer-lease-deadbeef.json"
    dead.write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345,
                                "pidns": lease_module._pid_namespace(), "heartbeat": time.time(),
                                "stale_after_s": 60}))
    with ac.AsyncCheckpointer(tmp_path, comps()) as ck:
        ck.save(1).wait()
        ck.wait()
        leases = [n for n in os.listdir(tmp_path) if n.startswith(".writer-lease-")]
        assert len(leases) == 1 and not dead.exists(), leases     # our own, live one stays
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".writer-lease-")]
