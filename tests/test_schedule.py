"""Save/eval scheduling: periodic triggers, their saved counters, and eval_on_save with keep_best."""
from __future__ import annotations

import pytest
import torch

import async_ckpt as ac
from support.stateful import Copying


def fired(trigger, steps) -> list[int]:
    return [s for s in steps if trigger(s)]


@pytest.mark.parametrize("every, first, want", [
    (10, None, [10, 20, 30, 40]),
    (10, 5, [5, 15, 25, 35]),
    (10, 0, [0, 10, 20, 30, 40]),
    (1, None, list(range(1, 41))),
    (25, 30, [30]),
])
def test_fires_on_its_grid(every, first, want):
    assert fired(ac.PeriodicTrigger(every, first), range(0, 41)) == want


def test_skipped_steps_fire_once_and_stay_on_the_grid():
    t = ac.PeriodicTrigger(10)
    assert fired(t, [3, 12, 13, 27, 29, 30, 55, 60]) == [12, 27, 30, 55, 60]
    assert (t.fired, t.last_step, t.next_step) == (5, 60, 70)


@pytest.mark.parametrize("make, match", [
    (lambda: ac.PeriodicTrigger(0), "every must be an integer >= 1"),
    (lambda: ac.PeriodicTrigger(5, -1), "first must be an integer >= 0"),
    (lambda: ac.PeriodicTrigger(2.5), "every must be an integer"),
    (lambda: ac.TrainingSchedule(save_every=5, first_eval=3), "first_eval needs eval_every"),
    (lambda: ac.PeriodicTrigger(5)(-1), "step must be an integer >= 0"),
])
def test_parameter_errors(make, match):
    with pytest.raises(ac.InvalidArgumentError, match=match):
        make()


def test_eval_on_save_and_decoupled_eval():
    s = ac.TrainingSchedule(save_every=4, eval_every=6, first_eval=3, eval_on_save=True)
    dues = {step: s.due(step) for step in range(1, 17)}
    assert [k for k, d in dues.items() if d.save] == [4, 8, 12, 16]
    assert [k for k, d in dues.items() if d.eval] == [3, 4, 8, 9, 12, 15, 16]
    plain = ac.TrainingSchedule(save_every=4, eval_every=6, first_eval=3)
    assert [k for k in range(1, 17) if plain.due(k).eval] == [3, 9, 15]


def new_model() -> Copying:
    return Copying({"w": torch.zeros(2)})


def loop(ckpt, schedule, model, start, stop, log):
    for step in range(start, stop + 1):
        model.state["w"].fill_(step)
        due = schedule.due(step)
        metrics = {"val_loss": 1.0 / (step + 1)} if due.eval else None
        if due.eval:
            log.append(("eval", step))
        if due.save:
            log.append(("save", step))
            ckpt.save(step, metrics=metrics)


def test_counters_resume_exactly(tmp_path):
    """A run stopped after the checkpoint of step 12 (save and eval at the same step) and resumed
    does every save and eval of the uninterrupted run once: none repeated, none skipped."""
    def fresh():
        return ac.TrainingSchedule(save_every=4, eval_every=6, first_eval=0, eval_on_save=False)

    uninterrupted: list = []
    with ac.AsyncCheckpointer(tmp_path / "a", [ac.StateComponent("m", new_model(), ac.SharingPattern.GLOBAL)]) as ck:
        loop(ck, fresh(), new_model(), 0, 30, uninterrupted)

    model, schedule, log = new_model(), fresh(), []
    comps = [ac.StateComponent("m", model, ac.SharingPattern.GLOBAL),
             ac.StateComponent("schedule", schedule, ac.SharingPattern.GLOBAL)]
    with ac.AsyncCheckpointer(tmp_path / "b", comps) as ck:
        loop(ck, schedule, model, 0, 14, log)          # "crash" after step 14
    del log[log.index(("save", 12)) + 1:]               # work after the last checkpoint is lost
    model, schedule = new_model(), fresh()
    comps = [ac.StateComponent("m", model, ac.SharingPattern.GLOBAL),
             ac.StateComponent("schedule", schedule, ac.SharingPattern.GLOBAL)]
    with ac.AsyncCheckpointer(tmp_path / "b", comps) as ck:
        info = ck.load()
        assert info.step == 12 and schedule.save.next_step == 16 and schedule.eval.next_step == 18
        loop(ck, schedule, model, info.step + 1, 30, log)
    assert log == uninterrupted
    assert ("eval", 12) in log and ("save", 12) in log


def test_changed_schedule_applies_after_the_last_firing():
    old = ac.PeriodicTrigger(10)
    fired(old, range(0, 25))
    new = ac.PeriodicTrigger(4, first=2)
    new.load_state_dict(old.state_dict())
    assert (new.fired, new.last_step, new.next_step) == (2, 20, 22)


@pytest.mark.parametrize("eval_on_save, left", [(True, [12, 15]), (False, [3, 6, 9, 12, 15])])
def test_eval_on_save_gives_keep_best_a_metric_for_every_checkpoint(tmp_path, eval_on_save, left):
    """Without it, checkpoints saved between evals have no metric and are all kept (retention
    waits for a metric that never comes)."""
    schedule = ac.TrainingSchedule(save_every=3, eval_every=12, eval_on_save=eval_on_save)
    with ac.AsyncCheckpointer(tmp_path, [ac.StateComponent("m", new_model(), ac.SharingPattern.GLOBAL)],
                              keep_last=1, keep_best=1, best_metric="val_loss") as ck:
        for step in range(1, 16):
            due = schedule.due(step)
            metrics = {"val_loss": 1.0 if step != 12 else 0.1} if due.eval else None
            if due.save:
                ck.save(step, metrics=metrics)
        ck.wait()
        assert [i.step for i in ck.list_checkpoints()] == left
