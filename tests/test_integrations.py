"""async_ckpt.integrations: the Accelerate helpers in a hand-written loop and the Hugging Face
TrainerCallback, killed and resumed on real process groups (gloo, torchrun) and compared loss by
loss with ``==``; and the guard rails of issue 13 (a loader without state, double sharding, the
single-process fallback, an unregistered LR scheduler)."""
from __future__ import annotations

import sys

import pytest
import torch

import async_ckpt as ac
from support.trainers import check_kill_and_resume

pytestmark = [pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")]


def test_importing_async_ckpt_imports_neither_accelerate_nor_transformers():
    import subprocess
    code = ("import sys, async_ckpt, async_ckpt.trainers, async_ckpt.integrations; "
            "print(sorted(m for m in ('accelerate', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.multiproc
@pytest.mark.crash
def test_accelerate_loop_killed_mid_training_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "integration_run.py", "accelerate", nproc=2)


@pytest.mark.multiproc
@pytest.mark.crash
def test_accelerate_prepared_loader_killed_during_a_save_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "integration_run.py", "accelerate_prepared", nproc=2,
                          kill=("--kill-in-save", 9))


@pytest.mark.crash
def test_hf_trainer_callback_killed_mid_training_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "integration_run.py", "hf")


@pytest.mark.multiproc
@pytest.mark.crash
def test_hf_trainer_callback_two_ranks_killed_during_a_save_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "integration_run.py", "hf", nproc=2, kill=("--kill-in-save", 9))
