"""The trainers of the seed's table (async_ckpt.trainers) on real process groups (gloo, torchrun):
an uninterrupted run, a run SIGKILLed mid-training or during a save, and its resume, compared loss
by loss with ``==``, and the retained checkpoints equal to the uninterrupted run's."""
from __future__ import annotations

import pytest

from support.trainers import check_kill_and_resume

pytestmark = [pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")]


@pytest.mark.crash
def test_simple_trainer_killed_mid_training_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "trainer_run.py", "simple")


@pytest.mark.crash
def test_simple_trainer_killed_during_a_save_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "trainer_run.py", "simple", kill=("--kill-in-save", 9))


@pytest.mark.multiproc
@pytest.mark.crash
@pytest.mark.parametrize("kind", ["ddp", "ddp_dispatch", "pipeline"])
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
