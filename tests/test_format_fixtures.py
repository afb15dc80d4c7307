"""Every format_version ever released must keep loading: one checked-in fixture per version."""
import glob
import json
import os

import pytest
import torch

import async_ckpt as ac
from support.fixture_state import Holder, expected_state

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "format_v*")))


def assert_same(got, want, path="state"):
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                           want.reshape(-1).view(torch.uint8) if want.numel() else want), path
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            assert_same(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}/{i}")
    else:
        assert got == want, path


def test_there_is_a_fixture_for_the_current_version():
    from async_ckpt.format.manifest import FORMAT_VERSION
    assert any(p.endswith(f"format_v{FORMAT_VERSION}") for p in FIXTURES)


@pytest.mark.parametrize("fixture", FIXTURES, ids=os.path.basename)
@pytest.mark.parametrize("step", [1, 2], ids=["raw", "zstd"])
def test_fixture_loads_bit_exact(fixture, step):
    holder = Holder()
    ckpt = ac.AsyncCheckpointer(fixture, [ac.StateComponent("state", holder, ac.SharingPattern.GLOBAL)])
    info = ckpt.load(step)
    assert info.step == step and info.metrics == {"loss": 0.5 * step}
    assert_same(holder.state, expected_state())
    manifest = json.load(open(os.path.join(fixture, f"step-{step:010d}", "manifest.json")))
    codecs = {t["codec"] for t in manifest["components"]["state"]["shards"]["global"]["tensors"]}
    assert codecs == ({"raw"} if step == 1 else {"zstd"})
    assert ckpt.latest_step() == 2
