"""Misuse fails early and clearly: a CheckpointError subclass (InvalidArgumentError is also a
ValueError and a TypeError), raised at construction or at the latest by save() itself (never
later from the background), with nothing written and the checkpointer still usable."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import async_ckpt as ac

from support.semantics import G, comps  # noqa: F401
from support.stateful import Box


def nothing_on_disk(root) -> bool:
    """The root is absent, or holds nothing at all (no step folder, no temp file)."""
    return not os.path.exists(root) or os.listdir(root) == []


def assert_invalid(exc: BaseException) -> None:
    assert isinstance(exc, ac.CheckpointError)
    assert isinstance(exc, ac.InvalidArgumentError)
    assert isinstance(exc, ValueError) and isinstance(exc, TypeError)


def assert_usable(ck, root, step=1):
    """After a refused call the same checkpointer still saves and loads."""
    info = ck.save(step).wait()
    assert info.step == step
    assert [i.step for i in ck.list_checkpoints()] == [step]
    assert ck.load().step == step


# ------------------------------------------------------------------------------------------
# roots
# ------------------------------------------------------------------------------------------
def _construct_and_save(root):
    ck = ac.AsyncCheckpointer(root, comps())
    try:
        ck.save(1)
    finally:
        try:
            ck.close()
        except ac.CheckpointError:
            pass


def test_root_is_a_regular_file(tmp_path):
    root = tmp_path / "not_a_dir"
    root.write_bytes(b"precious")
    with pytest.raises(ac.CheckpointError) as exc_info:
        ac.AsyncCheckpointer(root, comps())        # found at construction, before any save
    msg = str(exc_info.value)
    assert str(root) in msg
    assert "writable folder" in msg and "pass a folder" in msg   # says what is wrong and what to do
    assert root.read_bytes() == b"precious"


@pytest.mark.parametrize("where", ["under_file", "proc"])
def test_unwritable_root(tmp_path, where):
    if where == "under_file":
        (tmp_path / "file").write_bytes(b"x")
        root = str(tmp_path / "file" / "sub")
    else:
        root = "/proc/async_ckpt_nope"
    with pytest.raises(ac.CheckpointError) as exc_info:
        _construct_and_save(root)
    assert root in str(exc_info.value)
    assert "pass a folder" in str(exc_info.value)
    assert not os.path.exists(root)


def test_root_of_wrong_type(tmp_path):
    with pytest.raises(ac.CheckpointError) as exc_info:
        ac.AsyncCheckpointer(42, comps())
    assert_invalid(exc_info.value)


# ------------------------------------------------------------------------------------------
# components
# ------------------------------------------------------------------------------------------
def test_duplicate_keys_at_construction(tmp_path):
    with pytest.raises(ac.CheckpointError) as exc_info:
        ac.AsyncCheckpointer(tmp_path / "ck", comps(key="m") + comps(key="m"))
    assert_invalid(exc_info.value)
    assert "'m'" in str(exc_info.value) and "duplicate" in str(exc_info.value)
    assert nothing_on_disk(tmp_path / "ck")


def test_duplicate_keys_from_dynamic_components_at_save(tmp_path):
    root = tmp_path / "ck"
    current = comps(key="m")
    ck = ac.AsyncCheckpointer(root, lambda: list(current))
    current.append(ac.StateComponent("m", Box(), G))
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.save(1)
    assert_invalid(exc_info.value)
    assert not root.exists() or not any(n.startswith("step-") for n in os.listdir(root))
    current.pop()
    assert_usable(ck, root)
    ck.close()


@pytest.mark.parametrize("key", ["", "a/b", "a b", "../x", "a\\b", "ü", "x\n", "a:b", 3, None])
def test_bad_key(tmp_path, key):
    with pytest.raises(ac.CheckpointError) as exc_info:
        ac.AsyncCheckpointer(tmp_path / "ck", [ac.StateComponent(key, Box(), G)])
    assert_invalid(exc_info.value)
    assert repr(key) in str(exc_info.value)


def test_good_keys_accepted(tmp_path):
    keys = ["model", "Model_2", "opt.v1", "a-b", "X"]
    ck = ac.AsyncCheckpointer(tmp_path / "ck", [ac.StateComponent(k, Box(), G) for k in keys])
    ck.save(0).wait()
    ck.close()


@pytest.mark.parametrize("stateful", [object(), {"w": 1}, type("OnlySave", (), {"state_dict": lambda self: {}})()])
def test_stateful_without_state_dict(tmp_path, stateful):
    with pytest.raises(ac.CheckpointError) as exc_info:
        ac.AsyncCheckpointer(tmp_path / "ck", [ac.StateComponent("c", stateful, G)])
    assert_invalid(exc_info.value)
    assert "state_dict" in str(exc_info.value) and "'c'" in str(exc_info.value)


def test_components_not_state_components(tmp_path):
    with pytest.raises(ac.CheckpointError) as exc_info:
        ac.AsyncCheckpointer(tmp_path / "ck", [Box()])
    assert_invalid(exc_info.value)


def test_sharing_pattern_not_a_pattern(tmp_path):
    with pytest.raises(ac.CheckpointError) as exc_info:
        ac.AsyncCheckpointer(tmp_path / "ck", [ac.StateComponent("c", Box(), "global")])
    assert_invalid(exc_info.value)


def test_sharing_pattern_callable_returning_garbage(tmp_path):
    root = tmp_path / "ck"
    pattern = {"value": "global"}
    ck = ac.AsyncCheckpointer(root, [ac.StateComponent("dyn", Box(), lambda: pattern["value"])])
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.save(1)
    assert_invalid(exc_info.value)
    assert "'dyn'" in str(exc_info.value) and "'global'" in str(exc_info.value)
    assert not root.exists() or not any(n.startswith("step-") for n in os.listdir(root))
    pattern["value"] = G
    assert_usable(ck, root)
    ck.close()


# ------------------------------------------------------------------------------------------
# constructor options
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needle", [
    (dict(bogus_option=1), "bogus_option"),
    (dict(compresion="zstd"), "compresion"),          # typo of a named option
    (dict(compression="lz4"), "lz4"),
    (dict(compression="ZSTD"), "ZSTD"),
    (dict(keep_best=2), "best_metric"),
    (dict(max_pending=0), "max_pending"),
    (dict(max_pending=-1), "max_pending"),
    (dict(max_pending=1.5), "max_pending"),
    (dict(max_pending=True), "max_pending"),
    (dict(keep_last=-1), "keep_last"),
    (dict(keep_last=2.0), "keep_last"),
    (dict(keep_best=-1, best_metric="loss"), "keep_best"),
    (dict(compression_level=0, compression="zstd"), "compression_level"),
    (dict(encode_threads=0), "encode_threads"),
])
def test_bad_option(tmp_path, kwargs, needle):
    root = tmp_path / "ck"
    with pytest.raises(ac.CheckpointError) as exc_info:
        ac.AsyncCheckpointer(root, comps(), **kwargs)
    assert_invalid(exc_info.value)
    assert needle in str(exc_info.value)
    assert nothing_on_disk(root)


def test_unknown_option_is_catchable_as_type_error(tmp_path):
    with pytest.raises(TypeError):
        ac.AsyncCheckpointer(tmp_path / "ck", comps(), no_such_thing=True)


# ------------------------------------------------------------------------------------------
# save() arguments
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [-1, -100, 1.0, 2.5, True, False, "3", None, [1]], ids=repr)
def test_bad_step_refused_before_anything_is_written(tmp_path, step):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps())
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.save(step)
    assert_invalid(exc_info.value)
    assert "step" in str(exc_info.value)
    assert nothing_on_disk(root)
    assert_usable(ck, root)
    ck.close()


@pytest.mark.parametrize("step", [-1, 1.0, True, "1"], ids=repr)
def test_bad_step_in_load_and_report_metrics(tmp_path, step):
    ck = ac.AsyncCheckpointer(tmp_path / "ck", comps())
    ck.save(1).wait()
    for call in (lambda: ck.load(step), lambda: ck.report_metrics(step, {"loss": 1.0})):
        with pytest.raises(ac.CheckpointError) as exc_info:
            call()
        assert_invalid(exc_info.value)
    ck.close()


@pytest.mark.parametrize("metrics", [
    {"loss": "high"}, {"loss": None}, {"loss": [1.0]}, {"acc": True}, {3: 1.0},
    {"loss": torch.tensor([1.0, 2.0])}, [("loss", 1.0)], "loss",
], ids=repr)
def test_bad_metrics(tmp_path, metrics):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, comps())
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.save(1, metrics=metrics)
    assert_invalid(exc_info.value)
    assert nothing_on_disk(root)
    assert_usable(ck, root)
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.report_metrics(1, metrics)
    assert_invalid(exc_info.value)
    ck.wait()
    assert ck.list_checkpoints()[0].metrics == {}
    ck.close()


@pytest.mark.parametrize("leaf", [object(), lambda x: x, {1, 2}, b"bytes", 1 + 2j],
                         ids=["object", "lambda", "set", "bytes", "complex"])
def test_non_serialisable_leaf_names_its_path(tmp_path, leaf):
    root = tmp_path / "ck"
    box = Box({"a": {"b": [torch.ones(3), 1, leaf]}, "ok": torch.zeros(2)})
    ck = ac.AsyncCheckpointer(root, [ac.StateComponent("model", box, G)])
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.save(1)
    assert_invalid(exc_info.value)
    assert "'model/a/b/2'" in str(exc_info.value)
    assert "allow_pickle" in str(exc_info.value)    # says what to do
    assert not root.exists() or not any(n.startswith("step-") for n in os.listdir(root))
    assert ck.list_checkpoints() == [] and ck.latest_step() is None
    ck.wait()                                       # no background error either
    box.state["a"]["b"][2] = 2
    assert_usable(ck, root, step=1)                 # the same step is still free
    ck.close()


def test_non_string_dict_key_names_its_path(tmp_path):
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, [ac.StateComponent("m", Box({"x": {(1, 2): 3}}), G)])
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.save(1)
    assert_invalid(exc_info.value)
    assert "'m/x'" in str(exc_info.value)
    ck.close()


def test_quantized_tensor_is_refused_clearly(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    root = tmp_path / "ck"
    ck = ac.AsyncCheckpointer(root, [ac.StateComponent("m", Box({"q": q}), G)])
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.save(1)
    assert_invalid(exc_info.value)
    assert "'m/q'" in str(exc_info.value)
    # the advice must fit the problem: a quantized tensor is not cured by .to_dense()
    assert "quantiz" in str(exc_info.value).lower()
    ck.close()


def test_sub_byte_placeholder_dtype_round_trips_or_is_refused_clearly(tmp_path):
    """torch.uint4 & co. have no copy kernel. Saving one must either work or fail at save()
    with an InvalidArgumentError naming the key path, never with a raw torch error."""
    root = tmp_path / "ck"
    t = torch.arange(8, dtype=torch.uint8).view(torch.uint4)
    ck = ac.AsyncCheckpointer(root, [ac.StateComponent("m", Box({"w": t}), G)])
    try:
        info = ck.save(1).wait()
    except ac.CheckpointError as exc:
        assert_invalid(exc)
        assert "'m/w'" in str(exc)
        assert not root.exists() or not any(n.startswith("step-") for n in os.listdir(root))
    else:
        assert info.nbytes == 8
        target = Box()
        with ac.AsyncCheckpointer(root, [ac.StateComponent("m", target, G)]) as ck2:
            ck2.load()
        assert target.loaded["w"].dtype == torch.uint4
        assert torch.equal(target.loaded["w"].view(torch.uint8), t.view(torch.uint8))
    ck.close()


def test_save_after_close(tmp_path):
    ck = ac.AsyncCheckpointer(tmp_path / "ck", comps())
    ck.save(1).wait()
    ck.close()
    with pytest.raises(ac.CheckpointError) as exc_info:
        ck.save(2)
    assert "closed" in str(exc_info.value)
    assert not (tmp_path / "ck" / "step-0000000002").exists()
