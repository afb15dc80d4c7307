"""Retention: the pure keep-set function (tables) and its effect on disk."""
import os

import pytest
import torch

import async_ckpt as ac
from async_ckpt.retention import steps_to_keep
from support.stateful import Copying

STEPS = [10, 20, 30, 40, 50]


@pytest.mark.parametrize("keep_last, want", [
    (None, {10, 20, 30, 40, 50}),
    (0, {50}),                 # the newest committed checkpoint is never deleted
    (1, {50}),
    (2, {40, 50}),
    (10, {10, 20, 30, 40, 50}),
])
def test_keep_last_table(keep_last, want):
    assert steps_to_keep(STEPS, {}, keep_last=keep_last) == want


@pytest.mark.parametrize("metrics, kwargs, want", [
    # lower is better because the name contains "loss"
    ({10: 0.5, 20: 0.1, 30: 0.9, 40: 0.7, 50: 0.8}, dict(best_metric="val_loss"), {20, 50}),
    # higher is better for other names
    ({10: 0.5, 20: 0.1, 30: 0.9, 40: 0.7, 50: 0.8}, dict(best_metric="acc"), {30, 50}),
    # explicit direction wins over the name
    ({10: 0.5, 20: 0.1, 30: 0.9, 40: 0.7, 50: 0.8}, dict(best_metric="loss", greater_is_better=True), {30, 50}),
    # 0.0 is a real value, not "missing"
    ({10: 0.0, 20: 0.1, 30: 0.9, 40: 0.7, 50: 0.8}, dict(best_metric="loss"), {10, 50}),
    # metric not reported yet: kept while fewer than keep_last + 1 (here 2) newer checkpoints
    # have theirs; 20's never came although 30, 40 and 50 got theirs: it was lost, 20 goes
    ({10: 0.5, 20: 0.1, 30: 0.9, 40: 0.7}, dict(best_metric="loss"), {20, 50}),
    ({10: 0.5, 30: 0.9, 40: 0.7, 50: 0.8}, dict(best_metric="loss"), {10, 50}),
    # ties: the newer checkpoint wins
    ({10: 0.2, 20: 0.2, 30: 0.9, 40: 0.7, 50: 0.8}, dict(best_metric="loss"), {20, 50}),
    # NaN ranks last
    ({10: float("nan"), 20: 0.3, 30: 0.9, 40: 0.7, 50: 0.8}, dict(best_metric="loss", keep_best=2), {20, 40, 50}),
])
def test_keep_best_table(metrics, kwargs, want):
    per_step = {s: {kwargs["best_metric"]: v} for s, v in metrics.items()}
    kwargs = {"keep_best": 1, **kwargs}
    assert steps_to_keep(STEPS, per_step, keep_last=1, **kwargs) == want


def test_a_metric_less_checkpoint_is_protected_only_while_newer_ones_may_still_get_theirs():
    metrics = {10: {"loss": 0.5}, 30: {"loss": 0.9}, 50: {"loss": 0.8}}   # 20 and 40 lack it
    # keep_last=1 (waits for 2 newer scored ones): 40 has one newer scored checkpoint (50), its
    # evaluation may still come; 20 has two (30, 50): its metric was lost
    assert steps_to_keep(STEPS, metrics, keep_last=1, keep_best=1, best_metric="loss") == {10, 40, 50}
    assert steps_to_keep(STEPS, metrics, keep_last=2, keep_best=1, best_metric="loss") == {10, 20, 40, 50}


def step_folders(root):
    return sorted(n for n in os.listdir(root) if n.startswith("step-"))


def test_keep_last_on_disk_and_manifest_deleted_first(tmp_path, monkeypatch):
    box = Copying({"t": torch.zeros(1000)})
    ckpt = ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("box", box, ac.SharingPattern.GLOBAL)], keep_last=2)
    calls = []
    real_delete, real_delete_dir = ckpt.storage.delete, ckpt.storage.delete_dir
    monkeypatch.setattr(ckpt.storage, "delete", lambda p: (calls.append(("delete", p)), real_delete(p)))
    monkeypatch.setattr(ckpt.storage, "delete_dir", lambda p: (calls.append(("rmdir", p)), real_delete_dir(p)))
    for step in range(5):
        box.state["t"].fill_(step)
        ckpt.save(step)
    ckpt.wait()
    assert step_folders(tmp_path) == ["step-0000000003", "step-0000000004"]
    assert [i.step for i in ckpt.list_checkpoints()] == [3, 4]
    uncommit = calls.index(("delete", "step-0000000000/manifest.json"))
    assert ("rmdir", "step-0000000000") in calls[uncommit + 1:]   # data goes after the manifest
    ckpt.load(3)
    assert box.state["t"][0].item() == 3
    ckpt.close()


def test_keep_best_with_late_metrics_survives_restart(tmp_path):
    box = Copying({"t": torch.zeros(1000)})
    comps = [ac.StateComponent("box", box, ac.SharingPattern.GLOBAL)]
    opts = dict(keep_last=1, keep_best=1, best_metric="val_loss")
    with ac.AsyncCheckpointer(tmp_path, comps, **opts) as ckpt:
        ckpt.save(1, metrics={"val_loss": 0.5})
        ckpt.save(2)                         # eval of step 2 not done yet: kept
        ckpt.save(3, metrics={"val_loss": 0.9})
        ckpt.wait()
        assert [i.step for i in ckpt.list_checkpoints()] == [1, 2, 3]
    with ac.AsyncCheckpointer(tmp_path, comps, **opts) as ckpt:
        ckpt.report_metrics(2, {"val_loss": 0.2})   # late eval result, after a restart
        ckpt.wait()
        infos = ckpt.list_checkpoints()
        assert [i.step for i in infos] == [2, 3]     # 2 is best, 3 is newest; 1 lost its place
        assert infos[0].metrics == {"val_loss": 0.2}
    with ac.AsyncCheckpointer(tmp_path, comps, **opts) as ckpt:
        assert ckpt.list_checkpoints()[0].metrics == {"val_loss": 0.2}
