"""RNGState: after a restore, every generator draws exactly what it drew right after the save."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

import async_ckpt as ac
from async_ckpt.training.rng import _cuda_count


def draws() -> dict:
    """A few values from each of the generators RNGState covers (gauss values exercise the
    cached second normal that Python and NumPy keep between calls)."""
    out = {"torch": torch.rand(5).tolist() + torch.randn(3).tolist(),
           "python": [random.random() for _ in range(3)] + [random.gauss(0, 1) for _ in range(3)],
           "numpy": np.random.rand(3).tolist() + np.random.standard_normal(3).tolist()}
    if _cuda_count():
        out["cuda"] = [torch.rand(3, device=f"cuda:{d}").tolist() for d in range(_cuda_count())]
    return out


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    # Leave a cached gauss value in both Python and NumPy: it is part of the state too.
    random.gauss(0, 1)
    np.random.standard_normal(1)


def rng_component(stateful=None):
    return [ac.StateComponent("rng", stateful or ac.RNGState(), ac.SharingPattern.PER_RANK)]


@pytest.mark.gpu
def test_draws_after_restore_equal_draws_after_save(tmp_path):
    seed_everything(1234)
    with ac.AsyncCheckpointer(tmp_path, rng_component()) as ckpt:
        ckpt.save(1).wait()
        after_save = draws()
        seed_everything(999)            # move every stream somewhere else
        assert draws() != after_save
    with ac.AsyncCheckpointer(tmp_path, rng_component(ac.RNGState())) as ckpt:
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # nothing to warn about on the same machine
            ckpt.load()
        assert draws() == after_save


@pytest.mark.gpu
@pytest.mark.parametrize("generator", ["torch", "python", "numpy"])
def test_each_generator_is_restored(generator):
    """Each generator on its own: restoring only works if that generator's state is captured."""
    seed_everything(7)
    rng = ac.RNGState()
    state = rng.state_dict()
    want = draws()[generator]
    seed_everything(8)
    rng.load_state_dict(state)
    assert draws()[generator] == want


class GPUMachineRNG:
    """What RNGState saved on a machine with GPUs: the CPU-side streams of this process plus the
    per-device CUDA states (16 bytes each: seed and Philox offset)."""

    def __init__(self, extra_devices: int):
        self.extra = extra_devices

    def state_dict(self):
        state = ac.RNGState().state_dict()
        real = list(torch.cuda.get_rng_state_all()) if _cuda_count() else []
        fake = [torch.tensor(list(range(16)), dtype=torch.uint8) for _ in range(self.extra)]
        state["torch_cuda"] = real + fake
        return state

    def load_state_dict(self, sd):
        raise AssertionError("not loaded in this test")


@pytest.mark.gpu
def test_fewer_gpus_than_saved_warns_and_restores_the_rest(tmp_path):
    seed_everything(42)
    with ac.AsyncCheckpointer(tmp_path, rng_component(GPUMachineRNG(extra_devices=2))) as ckpt:
        ckpt.save(5).wait()
    after_save = draws()
    seed_everything(43)
    saved_devices = _cuda_count() + 2
    with ac.AsyncCheckpointer(tmp_path, rng_component(ac.RNGState())) as ckpt:
        with pytest.warns(UserWarning, match=rf"RNG state of {saved_devices} CUDA device\(s\) but "
                                             rf"{_cuda_count()} are visible"):
            info = ckpt.load()
    assert info.step == 5
    cpu_side = {k: v for k, v in draws().items() if k != "cuda"}
    assert cpu_side == {k: v for k, v in after_save.items() if k != "cuda"}


def test_state_is_json_and_tensors_only(tmp_path):
    """No pickle: the default checkpointer (allow_pickle=False) must accept and return it."""
    rng = ac.RNGState()
    sd = rng.state_dict()
    assert sd["torch_cpu"].dtype == torch.uint8
    assert sd["python"]["mt"].dtype == torch.int64 and sd["python"]["mt"].numel() == 625
    assert sd["numpy"]["keys"].numel() == 624
    with ac.AsyncCheckpointer(tmp_path, rng_component(rng), allow_pickle=False) as ckpt:
        ckpt.save(0).wait()
        ckpt.load(0)


def test_private_generators_are_restored(tmp_path):
    """Named generators (e.g. a DataLoader's generator=) round-trip through a real checkpoint;
    their state is stored after other tensors, so this also proves that restoring does not
    depend on where a loaded tensor sits in the read buffer."""
    gens = {"loader": torch.Generator().manual_seed(1), "aug": torch.Generator().manual_seed(2)}
    with ac.AsyncCheckpointer(tmp_path, rng_component(ac.RNGState(gens))) as ckpt:
        ckpt.save(1).wait()
    want = {k: torch.rand(4, generator=g).tolist() for k, g in gens.items()}
    fresh = {"loader": torch.Generator().manual_seed(9), "aug": torch.Generator().manual_seed(9)}
    with ac.AsyncCheckpointer(tmp_path, rng_component(ac.RNGState(fresh))) as ckpt:
        ckpt.load(1)
    assert {k: torch.rand(4, generator=g).tolist() for k, g in fresh.items()} == want


def test_generator_missing_from_checkpoint_warns(tmp_path):
    with ac.AsyncCheckpointer(tmp_path, rng_component(ac.RNGState())) as ckpt:
        ckpt.save(1).wait()
    late = torch.Generator().manual_seed(5)
    before = late.get_state()
    with ac.AsyncCheckpointer(tmp_path, rng_component(ac.RNGState({"late": late}))) as ckpt:
        with pytest.warns(UserWarning, match="generator 'late' is not in the checkpoint"):
            ckpt.load(1)
    assert torch.equal(late.get_state(), before)


def test_bad_generators_argument():
    with pytest.raises(ac.InvalidArgumentError, match="torch.Generator"):
        ac.RNGState({"x": 3})
