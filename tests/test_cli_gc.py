"""`async-ckpt gc` and the writer lease on local disk: what gc removes and what it never
touches, and how it tells a live writer (another process) from a dead one. Commands run in
process (`support.cli.run_cli`) except gc end to end and its status 4 as a shell sees it
(`spawn_cli`, `python -m async_ckpt`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import async_ckpt as ac
from async_ckpt.save import lease as lease_mod
from support.cli import G, as_json, fails, model, ok, run_cli, save_steps, spawn_cli
from support.paths import child_env
from support.stateful import Holder


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-gc") / "ckpts"
    save_steps(root, keep_last=2, keep_best=1, best_metric="loss", keep_every=200)
    return root


@pytest.fixture
def root(template, tmp_path) -> Path:
    """A copy of the template each test may damage."""
    dst = tmp_path / "ckpts"
    shutil.copytree(template, dst)
    return dst


# -- gc and the writer lease ------------------------------------------------------------------------------
def test_gc_removes_leftovers_and_never_a_committed_checkpoint(root):
    (root / "step-0000000500").mkdir()
    (root / "step-0000000500" / "data-n00000-r00000-dead.bin").write_bytes(b"x" * 10)
    (root / "step-0000000300" / "data-n00000-r00000-old.bin").write_bytes(b"y" * 20)
    (root / "step-0000000300" / ".tmp-abc-manifest.json").write_text("{}")
    (root / ".write-probe-0123").write_bytes(b"")
    (root / ".writer-lease-dead.json").write_text(json.dumps(
        {"host": os.uname().nodename, "pid": 2 ** 22 + 7, "pidns": os.stat("/proc/self/ns/pid").st_ino,
         "heartbeat": time.time(), "rank": 0}))
    (root / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (root / "step-0000000300").iterdir())
    dry = as_json(run_cli("gc", root, "--dry-run", "--json"))
    paths = sorted(a["path"] for a in dry["would_remove"])
    assert paths == [".write-probe-0123", ".writer-lease-dead.json", "step-0000000300/.tmp-abc-manifest.json",
                     "step-0000000300/data-n00000-r00000-old.bin", "step-0000000500"]
    assert (root / "step-0000000500").exists(), "--dry-run removed something"
    out = ok(spawn_cli("gc", root))                     # gc end to end
    assert "removed 5 item(s)" in out
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-0000000200", "step-0000000300",
                                                      "step-0000000400"]
    assert sorted(p.name for p in (root / "step-0000000300").iterdir()) == [
        n for n in before if n not in ("data-n00000-r00000-old.bin", ".tmp-abc-manifest.json")]
    ok(run_cli("verify", root, "--all"))
    assert "nothing to remove" in ok(run_cli("gc", root))


HOLD = """
import sys, time, torch, async_ckpt as ac
net = torch.nn.Linear(4, 4)
with ac.AsyncCheckpointer(sys.argv[1], [ac.StateComponent("model", net, ac.SharingPattern.GLOBAL)]) as ck:
    ck.save(1000).wait()
    open(sys.argv[2], "w").close()
    while not __import__("os").path.exists(sys.argv[3]):
        time.sleep(0.05)
"""


def test_gc_refuses_while_a_writer_is_active(root, tmp_path):
    saved, release = tmp_path / "saved", tmp_path / "release"
    writer = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(saved), str(release)],
                              env=child_env())
    try:
        deadline = time.monotonic() + 120
        while not saved.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer did not save"
            time.sleep(0.1)
        (lease,) = root.glob(".writer-lease-*.json")
        assert json.loads(lease.read_text())["pid"] == writer.pid
        (root / "step-0000000500").mkdir()      # after its commit, whose sweep would remove it
        fails(spawn_cli("gc", root), 4, "a writer is active", f"pid {writer.pid}", "--force")   # as a shell sees it
        assert (root / "step-0000000500").exists()
        assert "step-0000000500" in ok(run_cli("gc", root, "--dry-run"))
        assert "WRITER active" in ok(run_cli("ls", root))
        assert "removed" in ok(run_cli("gc", root, "--force"))
        assert not (root / "step-0000000500").exists() and lease.exists(), "--force removed a live lease"
    finally:
        release.touch()
        assert writer.wait(120) == 0
    assert not list(root.glob(".writer-lease-*")), "close() left its lease"
    assert "nothing to remove" in ok(run_cli("gc", root))


def test_lease_is_refreshed_off_the_training_thread_and_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "REFRESH_S", 0.05)
    writes = []
    real = lease_mod.LeaseKeeper._write

    def slow_write(self):
        writes.append(time.monotonic())
        if len(writes) == 1:
            time.sleep(1.0)       # a slow store must not slow save()
        return real(self)
    monkeypatch.setattr(lease_mod.LeaseKeeper, "_write", slow_write)
    ck = ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("m", Holder({"w": torch.ones(4)}), G)])
    t0 = time.monotonic()
    handle = ck.save(1)
    assert time.monotonic() - t0 < 0.8, "save() waited for the lease"
    handle.wait()
    (path,) = tmp_path.glob(".writer-lease-*.json")
    deadline = time.monotonic() + 10
    while (first := _lease_doc(path)) is None:      # rewritten in place every 0.05 s here
        assert time.monotonic() < deadline, "the lease never read whole"
        time.sleep(0.01)
    assert first["pid"] == os.getpid() and first["stale_after_s"] == lease_mod.STALE_AFTER_S
    while _heartbeat(path) in (None, first["heartbeat"]):
        assert time.monotonic() < deadline, "the lease was not refreshed"
        time.sleep(0.05)
    (lease,) = lease_mod.read_leases(ck.storage)
    assert lease.stale_reason() is None
    ck.close()
    assert not list(tmp_path.glob(".writer-lease-*")), "close() left its lease"
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000000001"]


def _lease_doc(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except ValueError:      # caught mid-rewrite (gc counts such a lease as live)
        return None


def _heartbeat(path: Path) -> float | None:
    doc = _lease_doc(path)
    return None if doc is None else doc["heartbeat"]


def _child_exits() -> None:
    pass                     # a forked worker (a DataLoader's, say) that simply ends


def test_a_forked_child_exiting_leaves_the_parents_checkpointer_and_lease_alone(tmp_path):
    """A fork inherits the interpreter's exit hooks with a copy of the open checkpointer; the
    child's exit must not close it (that released, i.e. deleted, the parent's writer lease)."""
    import multiprocessing
    ck = ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("m", Holder({"w": torch.ones(4)}), G)])
    ck.save(1).wait()
    (lease,) = tmp_path.glob(".writer-lease-*.json")
    child = multiprocessing.get_context("fork").Process(target=_child_exits)
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert lease.exists(), "the child's exit released the parent's lease"
    ck.save(2).wait()                          # the parent's checkpointer still works
    ck.close()
    assert not lease.exists()


def test_lease_staleness_rules():
    now = time.time()
    fresh = lease_mod.Lease("a", {"host": "x", "pid": 1, "heartbeat": now - 5})
    old = lease_mod.Lease("b", {"host": "x", "pid": 1, "heartbeat": now - 3600})
    dead = lease_mod.Lease("c", {"host": os.uname().nodename, "pid": 2 ** 22 + 7, "heartbeat": now,
                                 "pidns": os.stat("/proc/self/ns/pid").st_ino})
    mine = lease_mod.Lease("d", {"host": os.uname().nodename, "pid": os.getpid(), "heartbeat": now,
                                 "pidns": os.stat("/proc/self/ns/pid").st_ino})
    unreadable = lease_mod.Lease("e", None)
    assert fresh.stale_reason() is None and mine.stale_reason() is None
    assert unreadable.stale_reason() is None, "a lease being rewritten counts as live"
    assert "no heartbeat" in old.stale_reason() and "has exited" in dead.stale_reason()


def test_a_process_that_only_loads_holds_no_lease(root):
    net = model(0)
    with ac.AsyncCheckpointer(root, [ac.StateComponent("model", net, G)]) as ck:
        ck.load(strict=False)
        assert not list(root.glob(".writer-lease-*"))
