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


# -- format_version 2: SHARDED components (DTensor chunks written by 2 gloo ranks) ------------------
SHARDED_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sharded_v2")


def test_there_is_a_sharded_fixture_of_the_first_version_with_sharded_components():
    from async_ckpt.format.manifest import SHARDED_VERSION
    assert SHARDED_FIXTURE.endswith(f"sharded_v{SHARDED_VERSION}") and os.path.isdir(SHARDED_FIXTURE)


@pytest.mark.parametrize("step", [1, 2], ids=["raw", "zstd"])
def test_sharded_fixture_consolidates_into_plain_tensors_in_one_process(step):
    """The FSDP2 / sharded-DTensor checkpoint of 2 ranks, loaded into a plain model and plain
    tensors: every global tensor assembled from its chunks, bit for bit (what consolidating an
    FSDP checkpoint on one machine needs)."""
    from support import sharded_state
    manifest = json.load(open(os.path.join(SHARDED_FIXTURE, f"step-{step:010d}", "manifest.json")))
    assert manifest["format_version"] == 2
    chunks = {tuple(t["path"]): t["chunks"] for c in manifest["components"].values()
              for t in c["sharded"]["tensors"]}
    # what makes the fixture worth having: several chunks per tensor, uneven ones, a replicated
    # DTensor written once, both ranks' files, and the codec of the step
    assert len(chunks[("0.weight",)]) == 2 and [c["sizes"] for c in chunks[("0.weight",)]] == [[3, 6], [2, 6]]
    assert [c["offsets"] for c in chunks[("cols",)]] == [[0, 0], [0, 3]] and len(chunks[("repl",)]) == 1
    assert len({c["file"] for cs in chunks.values() for c in cs}) == 2
    assert {c["codec"] for cs in chunks.values() for c in cs} == ({"raw"} if step == 1 else
                                                                 {"zstd-planes1", "zstd-planes2",
                                                                  "zstd-planes4", "zstd-planes8"})
    model, extra = sharded_state.plain_targets()
    ckpt = ac.AsyncCheckpointer(SHARDED_FIXTURE, sharded_state.components(model, extra))
    info = ckpt.load(step)
    assert info.step == step and info.metrics == {"loss": 0.5 * step}
    want = sharded_state.expected()
    assert_same(dict(model.state_dict()), want["model"])
    assert extra.loads == 1
    assert_same(extra.state, want["extra"])
    assert ckpt.latest_step() == 2


@pytest.mark.multiproc
def test_sharded_fixture_reshards_into_another_layout_on_two_ranks(tmp_path):
    """The FSDP2 chunks (rows) loaded into tensor-parallel DTensors (columns for the second
    layer) and other placements on 2 gloo ranks: every gathered tensor bit-exact."""
    from support import sharded_state
    sharded_state.load_resharded(SHARDED_FIXTURE, 2, str(tmp_path))
    results = [json.load(open(tmp_path / f"r{r}.json")) for r in range(2)]
    for r in results:
        assert r["step"] == 2 and all(r["exact"].values()), r["exact"]
        assert {"model/0.weight", "model/2.weight", "extra/cols", "extra/bf16", "extra/repl"} <= set(r["dtensors"])
