"""The trainers of the seed's table (async_ckpt.trainers) on real process groups (gloo, torchrun):
an uninterrupted run, a run SIGKILLed mid-training or during a save, and its resume, compared loss
by loss with ``==``, and the retained checkpoints equal to the uninterrupted run's."""
from __future__ import annotations

import pytest
import torch

import async_ckpt as ac

from support.trainers import check_kill_and_resume
from support.profile import pick

pytestmark = [pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")]


@pytest.mark.crash
def test_simple_trainer_killed_mid_training_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "trainer_run.py", "simple")


@pytest.mark.crash
def test_simple_trainer_killed_during_a_save_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "trainer_run.py", "simple", kill=("--kill-in-save", 9))


@pytest.mark.multiproc
@pytest.mark.crash
@pytest.mark.parametrize("kind", pick(["ddp_dispatch"], ["ddp", "ddp_dispatch", "pipeline"]))
def test_two_rank_trainers_killed_mid_training_resume_bit_exact(tmp_path, kind):
    check_kill_and_resume(tmp_path, "trainer_run.py", kind, nproc=2)


@pytest.mark.multiproc
@pytest.mark.crash
def test_hybrid_dp_x_pp_killed_mid_training_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "trainer_run.py", "hybrid", nproc=4)


@pytest.mark.multiproc
@pytest.mark.crash
def test_accel_trainer_killed_mid_training_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "trainer_run.py", "accel", nproc=2)


def test_training_arguments_are_validated():
    from async_ckpt.trainers import TrainingArguments
    with pytest.raises(ac.InvalidArgumentError, match="save_strategy"):
        TrainingArguments("x", max_steps=1, save_strategy="hourly")
    with pytest.raises(ac.InvalidArgumentError, match="resume_from_checkpoint"):
        TrainingArguments("x", max_steps=1, resume_from_checkpoint=-1)
    assert TrainingArguments("x", max_steps=1, resume_from_checkpoint=7).resume_step == 7
    assert TrainingArguments("x", max_steps=1, resume_from_checkpoint="s3://b/r").resume_root == "s3://b/r"


def _trainer(root, **kw):
    from async_ckpt.trainers import SimpleTrainer, TrainingArguments
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    args = TrainingArguments(str(root), **{"max_steps": 6, "batch_size": 4, "save_steps": 2, **kw})
    return SimpleTrainer(args, torch.nn.Linear(3, 1), data, torch.nn.functional.mse_loss,
                         lambda p: torch.optim.SGD(p, lr=0.1))


def test_sigterm_saves_the_step_and_stops_cleanly(tmp_path):
    import os
    import signal

    trainer = _trainer(tmp_path, save_steps=100)
    trainer.on_step_end = lambda step, loss: os.kill(os.getpid(), signal.SIGTERM) if step == 3 else None
    result = trainer.train()
    assert result.preempted and result.step == 3
    with ac.AsyncCheckpointer(tmp_path, []) as ck:
        assert ck.latest_step() == 3
    again = _trainer(tmp_path, save_steps=100)
    assert again.train().step == 6 and again.progress.step == 6


def test_save_strategies_epochs_and_resume_from_a_step(tmp_path):
    trainer = _trainer(tmp_path / "a", save_strategy="epochs", save_steps=1, keep_last=None)
    trainer.train()
    with ac.AsyncCheckpointer(tmp_path / "a", []) as ck:
        assert [i.step for i in ck.list_checkpoints()] == [4]          # 16 samples / 4 = 4 steps an epoch
    other = _trainer(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a"), max_steps=5)
    assert other.resume() == 4
    with pytest.raises(ac.CheckpointNotFoundError):
        _trainer(tmp_path / "a", resume_from_checkpoint=3).train()


def test_trainer_overhead_benchmark_runs_and_reports_both_measures():
    from bench.trainer_overhead import run
    md = run(steps=20, repeats=1)
    assert "| median step time |" in md and "trainer layer alone (direct)" in md


def test_grad_scaler_and_scheduler_resume_in_process_bit_exact(tmp_path):
    from async_ckpt.trainers import SimpleTrainer, TrainingArguments

    def make(root, max_steps, record):
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(24, 3), torch.randn(24, 1))
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        args = TrainingArguments(str(root), max_steps=max_steps, batch_size=4, save_steps=2, keep_last=None)

        class Rec(SimpleTrainer):
            def on_step_end(self, step, loss):
                record[step] = loss
        return Rec(args, model, data, torch.nn.functional.mse_loss, lambda p: torch.optim.AdamW(p, lr=1e-2),
                   lr_scheduler_factory=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5),
                   grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=2))
    want: dict = {}
    full = make(tmp_path / "full", 9, want)
    full.train()
    got: dict = {}
    make(tmp_path / "r", 4, got).train()
    resumed = make(tmp_path / "r", 9, got)
    assert "grad_scaler" in [c.key for c in resumed.get_state_components()]
    resumed.train()
    assert got == want and resumed.grad_scaler.get_scale() == full.grad_scaler.get_scale()
    assert resumed.lr_scheduler.state_dict() == full.lr_scheduler.state_dict()


def test_divergence_stop_saves_and_ends_the_run(tmp_path):
    from async_ckpt.trainers import SimpleTrainer, TrainingArguments
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randn(16, 1))
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        loss = torch.nn.functional.mse_loss(out, target)
        return loss * float("nan") if len(calls) == 5 else loss
    args = TrainingArguments(str(tmp_path), max_steps=10, batch_size=4, save_steps=100,
                             divergence_action="stop", divergence_spans=(2, 4))
    result = SimpleTrainer(args, torch.nn.Linear(3, 1), data, loss_fn, lambda p: torch.optim.SGD(p, lr=0.1)).train()
    assert result.step == 5 and result.diverged is not None and result.diverged.action == "stop"
    with ac.AsyncCheckpointer(tmp_path, []) as ck:
        assert ck.latest_step() == 5


def test_evaluation_leaves_the_training_rng_untouched(tmp_path):
    import random
    trainer = _trainer(tmp_path)
    trainer.eval_fn = lambda m: {"x": float(torch.rand(1)) + random.random()}
    before = (torch.get_rng_state(), random.getstate())
    trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    trainer.checkpointer.close()
