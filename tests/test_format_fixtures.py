"""Every format_version ever released must keep loading: one checked-in fixture per version."""
import glob
import json
import os

import pytest

import async_ckpt as ac
from support.compare import assert_same
from support.fixture_state import expected_state
from support.stateful import Holder

FIXTURES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "fixtures", "format_v*")))


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
