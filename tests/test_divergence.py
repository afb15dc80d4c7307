"""Divergence detection: spikes fire, noisy converging curves do not, state round-trips through a
checkpoint, bad parameters are refused, and rollback restores the right checkpoint."""
from __future__ import annotations

import math
import random

import pytest
import torch

import async_ckpt as ac
from support.stateful import Copying


def converging(n: int, seed: int, noise: float = 0.05) -> list[float]:
    """A loss curve that decays from ~2.0 towards 0.2 with Gaussian noise."""
    rnd = random.Random(seed)
    return [0.2 + 1.8 * math.exp(-t / 300) + rnd.gauss(0, noise) for t in range(n)]


def detectors(**kw):
    return [ac.EMADetector(10, 100, threshold=0.3, **kw), ac.WindowDetector(10, 100, threshold=0.3, **kw)]


def fire_steps(detector, values) -> list[int]:
    return [t for t, v in enumerate(values) if detector.update(v)]


@pytest.mark.parametrize("make", [0, 1], ids=["ema", "window"])
def test_spike_fires_once_soon_after_it_starts(make):
    values = converging(600, seed=1)
    for t in range(400, 430):
        values[t] += 1.5                       # the loss jumps for 30 steps
    fired = fire_steps(detectors()[make], values)
    assert len(fired) == 1 and 400 <= fired[0] <= 405, fired


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("make", [0, 1], ids=["ema", "window"])
def test_no_false_alarm_on_a_noisy_converging_curve(make, seed):
    values = converging(2000, seed=seed, noise=0.08)
    assert fire_steps(detectors()[make], values) == []


@pytest.mark.parametrize("make", [0, 1], ids=["ema", "window"])
def test_greater_is_better_fires_on_a_drop_only(make):
    rising = [0.9 - 0.5 * math.exp(-t / 200) for t in range(500)]   # accuracy going up
    assert fire_steps(detectors(greater_is_better=True)[make], rising) == []
    dropped = rising[:300] + [v - 0.6 for v in rising[300:]]
    fired = fire_steps(detectors(greater_is_better=True)[make], dropped)
    assert len(fired) == 1 and 300 <= fired[0] <= 306, fired


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_value_fires_at_once_and_leaves_the_statistics_alone(bad):
    det = ac.EMADetector(2, 4, threshold=1.0, warmup=0)
    for v in [1.0, 1.0, 1.0]:
        assert not det.update(v)
    assert det.update(bad) and "non-finite" in det.last_reason
    assert det.short == pytest.approx(1.0) and det.long == pytest.approx(1.0)
    assert not det.update(torch.tensor(1.0))          # tensors are accepted and converted


@pytest.mark.parametrize("make", [0, 1], ids=["ema", "window"])
def test_state_round_trip_through_a_checkpoint(tmp_path, make):
    """A detector restored from a checkpoint continues exactly like the one that saved."""
    values = converging(400, seed=5)
    for t in range(250, 270):
        values[t] += 2.0
    original = detectors()[make]
    fire_steps(original, values[:180])
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("det", original, ac.SharingPattern.GLOBAL)]) as ckpt:
        ckpt.save(180).wait()
    restored = detectors()[make]
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("det", restored, ac.SharingPattern.GLOBAL)]) as ckpt:
        ckpt.load(180)
    assert (restored.short, restored.long) == (original.short, original.long)
    assert fire_steps(restored, values[180:]) == fire_steps(original, values[180:]) != []


def test_loading_state_of_another_configuration_is_refused():
    state = ac.EMADetector(10, 100, threshold=0.3).state_dict()
    with pytest.raises(ac.InvalidArgumentError, match="construct it with the saved parameters"):
        ac.EMADetector(5, 100, threshold=0.3).load_state_dict(state)


@pytest.mark.parametrize("make, match", [
    (lambda: ac.EMADetector(10, 10, threshold=1), r"short_span \(10\) must be smaller than long_span \(10\)"),
    (lambda: ac.EMADetector(0, 10, threshold=1), "short_span must be an integer >= 1"),
    (lambda: ac.EMADetector(2, 10, threshold=0), "threshold must be a finite number > 0"),
    (lambda: ac.EMADetector(2, 10, threshold=float("nan")), "threshold must be a finite number > 0"),
    (lambda: ac.EMADetector(2, 10, threshold=1, warmup=-1), "warmup must be an integer >= 0"),
    (lambda: ac.EMADetector(2.5, 10, threshold=1), "short_span must be an integer"),
    (lambda: ac.WindowDetector(20, 5, threshold=1), r"short_window \(20\) must be smaller than long_window"),
    (lambda: ac.WindowDetector(5, 20, threshold=-2), "threshold must be a finite number > 0"),
    (lambda: ac.WindowDetector(0, 20, threshold=1), "short_window must be an integer >= 1"),
    (lambda: ac.DivergenceMonitor(object()), "needs a detector"),
    (lambda: ac.DivergenceMonitor(ac.WindowDetector(2, 5, threshold=1), "explode"), "action must be one of"),
    (lambda: ac.DivergenceMonitor(ac.WindowDetector(2, 5, threshold=1), "rollback"), "needs checkpointer="),
    (lambda: ac.DivergenceMonitor(ac.WindowDetector(2, 5, threshold=1), rollback_to="oldest"), "rollback_to"),
    (lambda: ac.DivergenceMonitor(ac.WindowDetector(2, 5, threshold=1), max_rollbacks=-1), "max_rollbacks"),
    (lambda: ac.DivergenceMonitor(ac.WindowDetector(2, 5, threshold=1), "rollback", checkpointer=object(),
                                  rollback_to="best"), "needs best_metric="),
])
def test_parameter_errors(make, match):
    with pytest.raises(ac.InvalidArgumentError, match=match):
        make()


@pytest.mark.parametrize("action, stop, save", [("stop", True, True), ("abort", True, False)])
def test_stop_and_abort_events(action, stop, save):
    monitor = ac.DivergenceMonitor(ac.WindowDetector(2, 4, threshold=0.5), action)
    events = [monitor.update(step, v) for step, v in enumerate([1.0] * 6 + [3.0, 3.0])]
    assert events[:6] == [None] * 6 and events[7] is None      # one event per excursion
    event = events[6]
    assert (event.step, event.action, event.stop, event.save, event.restored) == (6, action, stop, save, None)
    assert monitor.state_dict()["events"][-1]["step"] == 6


# -- rollback ----------------------------------------------------------------------------------
def new_model() -> Copying:
    """Stands in for model + optimizer: its value is the step it was trained to."""
    return Copying({"w": torch.zeros(3)})


def run(tmp_path, monitor_kwargs=None, ckpt_kwargs=None, spike=range(33, 60), every=5, steps=60,
        metric=lambda step, rolled_back: 1.0 / step, register_monitor=True):
    """Feed a flat loss with a spike; save every `every` steps with `metric`; returns what
    happened. After a rollback the run continues with healthy values (the data was skipped)."""
    model = new_model()
    comps = [ac.StateComponent("model", model, ac.SharingPattern.GLOBAL)]
    # components as a callable (contract): the monitor joins after the checkpointer it needs
    ckpt = ac.AsyncCheckpointer(tmp_path, lambda: comps, **(ckpt_kwargs or {}))
    monitor = ac.DivergenceMonitor(ac.WindowDetector(2, 6, threshold=0.5), "rollback", checkpointer=ckpt,
                                   **(monitor_kwargs or {}))
    if register_monitor:
        comps.append(ac.StateComponent("divergence", monitor, ac.SharingPattern.GLOBAL))
    events, skip, step = [], False, 0
    while step < steps:
        step += 1
        model.state["w"].fill_(step)
        value = 2.0 if step in spike and not skip else 1.0
        event = monitor.update(step, value)
        if event is not None:
            events.append(event)
            if event.stop:
                break
            step, skip = event.restored.step, True
            continue
        if step % every == 0:
            ckpt.save(step, metrics={"val_loss": metric(step, skip)})
    ckpt.close()
    return model, monitor, events, ckpt


def test_rollback_restores_the_newest_checkpoint_before_the_divergence(tmp_path):
    model, monitor, events, ckpt = run(tmp_path)
    [event] = events
    # the spike starts at 33 and half of the short window (2 steps) already exceeds the threshold;
    # the lookback is the short window: checkpoints after step 31 are suspect
    assert event.step == 33 and event.action == "rollback"
    assert event.restored.step == 30 and event.discarded == ()
    assert monitor.rollbacks == 1
    # the run then went on from 30, re-saving 35..60 without colliding with anything
    assert [i.step for i in ckpt.list_checkpoints()] == list(range(5, 61, 5))
    assert model.state["w"][0].item() == 60


def test_rollback_discards_diverged_checkpoints_and_retention_ranks_the_new_ones(tmp_path):
    """A checkpoint saved inside the lookback is from the diverged trajectory: discarded. Its step
    is then saved anew with a different metric, which retention must use, not the old one."""
    first = {5: 0.5, 10: 0.4, 15: 0.3, 20: 0.1}      # the diverged run's 20 looked best
    opts = dict(keep_last=2, keep_best=1, best_metric="val_loss")
    model, monitor, events, ckpt = run(tmp_path, dict(lookback=6), opts, spike=range(21, 40), steps=30,
                                       metric=lambda s, rolled_back: 0.9 if rolled_back else first[s])
    [event] = events
    assert event.step == 21 and event.restored.step == 15 and event.discarded == (20,)
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("model", new_model(), ac.SharingPattern.GLOBAL)]) as again:
        infos = again.list_checkpoints()
    # 15 is the best real checkpoint; the discarded 20 (0.1) must not be remembered
    assert [(i.step, i.metrics["val_loss"]) for i in infos] == [(15, 0.3), (25, 0.9), (30, 0.9)]


def test_rollback_to_best(tmp_path):
    metric = {5: 0.5, 10: 0.2, 15: 0.4, 20: 0.45, 25: 0.6, 30: 0.7}
    _, _, events, _ = run(tmp_path, dict(rollback_to="best", best_metric="val_loss"),
                          metric=lambda s, rolled_back: metric.get(s, 0.9))
    assert events[0].restored.step == 10 and events[0].restored.metrics == {"val_loss": 0.2}
    assert events[0].discarded == (15, 20, 25, 30)


def test_rollbacks_are_bounded_then_abort(tmp_path):
    """The spike is data-driven and comes back after every rollback: the third event aborts."""
    model = new_model()
    comps = [ac.StateComponent("model", model, ac.SharingPattern.GLOBAL)]
    ckpt = ac.AsyncCheckpointer(tmp_path, lambda: comps)
    monitor = ac.DivergenceMonitor(ac.WindowDetector(2, 6, threshold=0.5), "rollback", checkpointer=ckpt,
                                   max_rollbacks=2)
    comps.append(ac.StateComponent("divergence", monitor, ac.SharingPattern.GLOBAL))
    actions, step = [], 0
    while step < 60 and len(actions) < 5:
        step += 1
        event = monitor.update(step, 2.0 if step >= 33 else 1.0)
        if event:
            actions.append(event.action)
            if event.stop:
                break
            step = event.restored.step
        elif step % 5 == 0:
            ckpt.save(step)
    ckpt.close()
    assert actions == ["rollback", "rollback", "abort"]
    # neither the count nor the history is given back by restoring the older state twice
    assert monitor.rollbacks == 2
    assert [(e["n"], e["action"]) for e in monitor.events] == [(1, "rollback"), (2, "rollback"), (3, "abort")]


def test_unregistered_monitor_resets_its_detector_after_rollback(tmp_path):
    _, monitor, events, _ = run(tmp_path, register_monitor=False)
    assert len(events) == 1 and events[0].restored.step == 30
    # without a reset, the spike still in its windows would have fired again at once
    assert monitor.detector.count == 60 - 30


def test_nothing_to_roll_back_to_says_what_to_do(tmp_path):
    with pytest.raises(ac.CheckpointNotFoundError, match="no committed checkpoint at or before step"):
        run(tmp_path, spike=range(9, 60), every=10)     # fires at 9, first save would be 10
