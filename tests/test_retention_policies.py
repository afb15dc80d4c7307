"""Retention policies: keep-last/best/every combinations (tables on the pure function) and their
effect on disk with late metrics, metric-less checkpoints, restarts, ties and 0.0 values."""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import async_ckpt as ac
from async_ckpt.retention import best_steps, steps_to_keep
from support.stateful import Copying

STEPS = [100, 200, 300, 400, 500, 600]


def m(**by_step):
    """metrics table: m(s100=0.3, ...) -> {100: {"val_loss": 0.3}, ...}"""
    return {int(k[1:]): {"val_loss": v} for k, v in by_step.items()}


ALL = m(s100=0.5, s200=0.1, s300=0.9, s400=0.7, s500=0.8, s600=0.6)


@pytest.mark.parametrize("metrics, kwargs, want", [
    # keep_every alone: multiples of 200 for good, plus the newest
    ({}, dict(keep_last=0, keep_every=200), {200, 400, 600}),
    ({}, dict(keep_last=1, keep_every=300), {300, 600}),
    # keep_every never adds steps that are not multiples
    ({}, dict(keep_last=0, keep_every=350), {600}),
    # keep_last + keep_every: union
    ({}, dict(keep_last=2, keep_every=300), {300, 500, 600}),
    # keep_last + keep_best (loss: lower is better)
    (ALL, dict(keep_last=1, keep_best=2, best_metric="val_loss"), {200, 100, 600}),
    # keep_last + keep_best + keep_every: the union of all three
    (ALL, dict(keep_last=2, keep_best=1, best_metric="val_loss", keep_every=400), {200, 400, 500, 600}),
    # keep_best larger than the scored steps: every scored one is kept
    (m(s100=0.5, s300=0.2), dict(keep_last=0, keep_best=5, best_metric="val_loss"),
     {100, 300, 400, 500, 600}),   # 400/500/600 have no metric yet: kept too; 200 is older than
    #                               keep_last + 1 = 1 scored checkpoint (300): its metric was lost
    # keep_last=None keeps everything whatever the other policies say
    (ALL, dict(keep_last=None, keep_best=1, best_metric="val_loss", keep_every=1000), set(STEPS)),
])
def test_combinations(metrics, kwargs, want):
    assert steps_to_keep(STEPS, metrics, **kwargs) == want


@pytest.mark.parametrize("metrics, kwargs, want", [
    # metric-less checkpoints are kept while keep_best > 0 (and fewer than keep_last + 1 newer
    # ones have theirs) ...
    (m(s100=0.5, s200=0.1), dict(keep_best=1), {200, 300, 400, 500, 600}),
    # ... but not when keep_best == 0
    (m(s100=0.5, s200=0.1), dict(keep_best=0), {600}),
    # a metric of another name does not count as "arrived" (500 waits for its val_loss: fewer
    # than keep_last + 1 newer checkpoints have theirs)
    ({500: {"acc": 0.5}, **m(s100=0.3, s200=0.1, s300=0.2, s400=0.3, s600=0.6)},
     dict(keep_best=1, keep_last=1), {200, 500, 600}),
    # 0.0 is a value, and the best one for a loss
    (m(s100=0.0, s200=0.1, s300=0.9, s400=0.7, s500=0.8, s600=0.6), dict(keep_best=1), {100, 600}),
    # 0.0 is the worst for an accuracy-like metric (greater is better)
    (m(s100=0.0, s200=0.1, s300=0.9, s400=0.7, s500=0.8, s600=0.6),
     dict(keep_best=1, greater_is_better=True), {300, 600}),
    # greater_is_better=False on a name without "loss"
    ({s: {"perplexity": v} for s, v in zip(STEPS, [9, 3, 5, 4, 8, 7])},
     dict(keep_best=1, best_metric="perplexity", greater_is_better=False), {200, 600}),
    # negative values rank correctly both ways
    (m(s100=-1.0, s200=-3.0, s300=0.0, s400=2.0, s500=1.0, s600=5.0), dict(keep_best=1), {200, 600}),
    (m(s100=-1.0, s200=-3.0, s300=0.0, s400=2.0, s500=1.0, s600=5.0),
     dict(keep_best=2, greater_is_better=True), {400, 600}),
])
def test_best_and_missing_metrics(metrics, kwargs, want):
    kwargs = {"keep_last": 0, "best_metric": "val_loss", **kwargs}
    assert steps_to_keep(STEPS, metrics, **kwargs) == want


def test_ties_are_deterministic_whatever_the_arrival_order():
    """Three steps tie for best; the newer ones win, however the metrics dict was built."""
    values = {100: 0.2, 200: 0.2, 300: 0.2, 400: 0.5, 500: 0.9, 600: 0.9}
    results = set()
    for order in itertools.permutations(values):
        metrics = {s: {"val_loss": values[s]} for s in order}
        results.add(frozenset(steps_to_keep(STEPS, metrics, keep_last=0, keep_best=2, best_metric="val_loss")))
    assert results == {frozenset({200, 300, 600})}
    assert best_steps(STEPS, {s: {"val_loss": values[s]} for s in STEPS}, "val_loss", None, 3) == [300, 200, 100]


# -- on disk -----------------------------------------------------------------------------------
def comps(box=None):
    return [ac.StateComponent("box", box or Copying({"t": torch.zeros(64)}), ac.SharingPattern.GLOBAL)]


def committed(ckpt):
    return [i.step for i in ckpt.list_checkpoints()]


def test_keep_every_on_disk(tmp_path):
    with ac.AsyncCheckpointer(tmp_path, comps(), keep_last=1, keep_every=4) as ckpt:
        for step in range(1, 11):
            ckpt.save(step)
        ckpt.wait()
        assert committed(ckpt) == [4, 8, 10]
    # a restart with the same policy keeps the same set, and keeps extending it
    with ac.AsyncCheckpointer(tmp_path, comps(), keep_last=1, keep_every=4) as ckpt:
        for step in range(11, 14):
            ckpt.save(step)
        ckpt.wait()
        assert committed(ckpt) == [4, 8, 12, 13]


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "10"])
def test_keep_every_must_be_a_positive_int(tmp_path, bad):
    with pytest.raises(ac.InvalidArgumentError, match=r"keep_every must be an integer >= 1"):
        ac.AsyncCheckpointer(tmp_path, comps(), keep_last=1, keep_every=bad)


def test_late_metrics_restart_and_best_choice(tmp_path):
    """Evaluation decoupled from saving: metrics arrive late, some after a restart; metric-less
    checkpoints wait for theirs; the manifest is never rewritten; decisions survive restarts."""
    opts = dict(keep_last=1, keep_best=1, best_metric="val_loss")
    with ac.AsyncCheckpointer(tmp_path, comps(), **opts) as ckpt:
        ckpt.save(100, metrics={"val_loss": 0.4, "train_loss": 1.0})
        ckpt.save(200)                     # eval of 200 still running
        ckpt.save(300)                     # eval of 300 still running
        ckpt.report_metrics(300, {"val_loss": 0.9})
        ckpt.save(400)
        ckpt.wait()
        assert committed(ckpt) == [100, 200, 400]            # 300 is worse than 100 and not newest
        manifest = (tmp_path / "step-0000000200" / "manifest.json").read_bytes()
    with ac.AsyncCheckpointer(tmp_path, comps(), **opts) as ckpt:   # restart: nothing changes
        assert committed(ckpt) == [100, 200, 400]
        ckpt.report_metrics(200, {"val_loss": 0.0})          # 0.0: a real (and the best) value
        ckpt.wait()
        infos = {i.step: i for i in ckpt.list_checkpoints()}
        assert sorted(infos) == [200, 400]                    # 400: newest, still without metric
        assert infos[200].metrics == {"val_loss": 0.0}
        assert (tmp_path / "step-0000000200" / "manifest.json").read_bytes() == manifest
        ckpt.report_metrics(400, {"val_loss": 0.5})
        ckpt.save(500, metrics={"val_loss": 0.6})
        ckpt.wait()
        assert committed(ckpt) == [200, 500]
    with ac.AsyncCheckpointer(tmp_path, comps(), **opts) as ckpt:
        infos = ckpt.list_checkpoints()
        assert [(i.step, i.metrics) for i in infos] == [(200, {"val_loss": 0.0}), (500, {"val_loss": 0.6})]


def test_late_metrics_merge_with_save_metrics_and_override(tmp_path):
    with ac.AsyncCheckpointer(tmp_path, comps()) as ckpt:
        ckpt.save(1, metrics={"train_loss": 2.0, "val_loss": 9.0})
        ckpt.report_metrics(1, {"val_loss": 1.5})
        ckpt.report_metrics(1, {"val_loss": 1.25, "acc": 0.5})
        ckpt.wait()
    with ac.AsyncCheckpointer(tmp_path, comps()) as ckpt:
        assert ckpt.list_checkpoints()[0].metrics == {"train_loss": 2.0, "val_loss": 1.25, "acc": 0.5}
        assert ckpt.load(1).metrics == {"train_loss": 2.0, "val_loss": 1.25, "acc": 0.5}


def test_report_metrics_for_an_unknown_step_says_so(tmp_path):
    with ac.AsyncCheckpointer(tmp_path, comps()) as ckpt:
        ckpt.save(1).wait()
        with pytest.raises(ac.CheckpointNotFoundError, match="step 7: it is not committed"):
            ckpt.report_metrics(7, {"val_loss": 0.1})


@pytest.mark.parametrize("greater, want", [(True, [300, 400]), (False, [100, 400]), (None, [300, 400])])
def test_greater_is_better_on_disk(tmp_path, greater, want):
    """'accuracy' has no "loss" in its name: None means higher is better."""
    with ac.AsyncCheckpointer(tmp_path, comps(), keep_last=1, keep_best=1, best_metric="accuracy",
                              greater_is_better=greater) as ckpt:
        for step, acc in [(100, 0.1), (200, 0.5), (300, 0.9), (400, 0.3)]:
            ckpt.save(step, metrics={"accuracy": acc})
        ckpt.wait()
        assert committed(ckpt) == want
        # The open checkpointer's writer lease (save/lease.py) sits beside the step folders.
        assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".writer-lease-")) == \
            [f"step-{s:010d}" for s in want]
