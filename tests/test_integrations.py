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


@pytest.mark.long
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


@pytest.mark.long
@pytest.mark.multiproc
@pytest.mark.crash
def test_hf_trainer_callback_two_ranks_killed_during_a_save_resumes_bit_exact(tmp_path):
    check_kill_and_resume(tmp_path, "integration_run.py", "hf", nproc=2, kill=("--kill-in-save", 9))


# -- guard rails (one process: Accelerator(cpu=True)) -----------------------------------------------
def _pairs(n: int = 8):
    return torch.utils.data.TensorDataset(torch.arange(float(n)).unsqueeze(1), torch.zeros(n, 1))


def test_prepared_loader_without_state_names_its_component_and_the_fix():
    from accelerate import Accelerator

    from async_ckpt.integrations.accelerate import components
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(1, 1)
    loader = acc.prepare_data_loader(torch.utils.data.DataLoader(_pairs(), batch_size=2))
    with pytest.raises(ac.InvalidArgumentError, match="component 'data'.*use_stateful_dataloader=True"):
        components(acc, model=model, dataloader=loader)


def test_resumable_sampler_sharded_twice_in_a_prepared_loader_is_refused():
    from accelerate import Accelerator, DataLoaderConfiguration
    from torchdata.stateful_dataloader import StatefulDataLoader

    from async_ckpt.integrations.accelerate import loader_position
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True))
    sampler = ac.ResumableSampler(_pairs(), num_replicas=2, rank=0)
    loader = acc.prepare_data_loader(StatefulDataLoader(_pairs(), batch_size=2, sampler=sampler))
    with pytest.raises(ac.InvalidArgumentError, match="sharded|half its share"):
        loader_position(loader)
    once = ac.ResumableSampler(_pairs(), num_replicas=1, rank=0)
    ok = acc.prepare_data_loader(StatefulDataLoader(_pairs(), batch_size=2, sampler=once))
    assert loader_position(ok).loader is ok


def test_unregistered_lr_scheduler_is_warned_about():
    from accelerate import Accelerator

    from async_ckpt.integrations.accelerate import components
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    with pytest.warns(UserWarning, match="component 'optimizer'.*LR scheduler"):
        components(acc, model=model, optimizer=opt)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keys = [c.key for c in components(acc, model=model, optimizer=opt, lr_scheduler=sched)]
    assert keys == ["model", "optimizer", "lr_scheduler", "rng"]


def test_single_process_accelerator_under_several_ranks_is_refused(monkeypatch):
    import torch.distributed as dist

    from async_ckpt.integrations.accelerate import check_launch

    class OneProcess:
        num_processes, distributed_type = 1, "NO"
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ac.InvalidArgumentError, match="cpu=True"):
        check_launch(OneProcess())
    monkeypatch.setattr(dist, "is_initialized", lambda: False)       # `accelerate launch --multi_gpu`,
    monkeypatch.setenv("WORLD_SIZE", "2")                              # Accelerator() on a CPU machine
    with pytest.raises(ac.InvalidArgumentError, match="2 ranks"):
        check_launch(OneProcess())
