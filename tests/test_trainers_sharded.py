"""The SHARDED rows of the trainer table (FSDP2Trainer, TPTrainer for DP x TP) on real process
groups (gloo, torchrun, CPU): an uninterrupted run and a run SIGKILLed mid-training then resumed,
compared loss by loss with ``==`` and by the checkpoints retained; and the DP x TP checkpoint
resumed at another topology (2x2 -> 1x2), continuing from the right step with the same model and
optimizer state, bit for bit (the losses of another DP degree draw other batches, so parameters
are compared instead)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.trainers import check_kill_and_resume, finish, losses, start

pytestmark = [pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")]


@pytest.mark.multiproc
@pytest.mark.crash
def test_fsdp2_trainer_killed_mid_training_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "trainer_run.py", "fsdp", nproc=2, steps=12, kill=("--kill-at", 8))


@pytest.mark.long
@pytest.mark.multiproc
@pytest.mark.crash
def test_dp_x_tp_trainer_killed_resumes_bit_exact_and_reshards_to_1x2(tmp_path):
    check_kill_and_resume(tmp_path, "trainer_run.py", "dptp", nproc=4, steps=12, kill=("--kill-at", 8),
                          extra=("--digest",))
    full = json.loads(Path(f"{tmp_path / 'full'}.final.rank0.json").read_text())
    assert full["step"] == 12
    other = tmp_path / "other"
    proc = start("trainer_run.py", "dptp", tmp_path / "ck_full", other, "--steps", "14", "--digest",
                 "--reshard", nproc=2)
    rc, text = finish(proc, other)
    assert rc == 0, text[-4000:]
    for rank in range(2):
        got = json.loads(Path(f"{other}.resumed.rank{rank}.json").read_text())
        assert got["step"] == 12, f"rank {rank} resumed at {got['step']}"
        assert got["digest"] == full["digest"], f"rank {rank}: the 1x2 model/optimizer differ from the 2x2 run's"
        assert sorted(losses(other, rank)) == [13, 14]


def test_default_tp_plan_pairs_linears_and_names_what_to_pass_otherwise():
    import torch
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    import async_ckpt as ac
    from async_ckpt.trainers.tensor_parallel import default_plan

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    plan = default_plan(mlp)
    assert list(plan) == ["0", "2"]
    assert isinstance(plan["0"], ColwiseParallel) and isinstance(plan["2"], RowwiseParallel)
    with pytest.raises(ac.InvalidArgumentError, match="tp_plan"):
        default_plan(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                         torch.nn.Linear(8, 2)))
