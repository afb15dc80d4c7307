"""Round trips: what is saved comes back bit-exactly, with its container types, through real
files under tmp_path, raw and zstd-compressed."""
from __future__ import annotations

import collections
import copy
import fractions
import json
import math
import os
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import async_ckpt as ac
from support.compare import assert_same
from support.stateful import Box

COMPRESSIONS = [None, "zstd"]
G = ac.SharingPattern.GLOBAL


def roundtrip(tmp_path, state, compression=None, **opts):
    """Save `state` as component 'c' with one checkpointer, load it with a fresh one."""
    root = tmp_path / "ckpt"
    with ac.AsyncCheckpointer(root, [ac.StateComponent("c", Box(state), G)],
                              compression=compression, **opts) as ck:
        info = ck.save(1).wait()
    target = Box()
    with ac.AsyncCheckpointer(root, [ac.StateComponent("c", target, G)], **opts) as ck:
        loaded = ck.load()
    assert loaded is not None and loaded.step == 1
    return target.loaded, info


# ------------------------------------------------------------------------------------------
# (a) bit-exact training resume: model with BatchNorm + AdamW + RNGState
# ------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def train_step(model, opt) -> float:
    # The batch depends on all three generators RNGState covers: torch, numpy and `random`.
    x = torch.randn(32, 8) + float(np.random.standard_normal()) + random.random()
    y = torch.randn(32, 1)
    opt.zero_grad()
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def components(model, opt, rng):
    return [ac.StateComponent("model", model, G),
            ac.StateComponent("optim", opt, G),
            ac.StateComponent("rng", rng, ac.SharingPattern.PER_RANK)]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_training_resume_is_bit_exact(tmp_path, compression):
    K = 4
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        train_step(model, opt)
    root = tmp_path / "ckpt"
    with ac.AsyncCheckpointer(root, components(model, opt, ac.RNGState()), compression=compression) as ck:
        expected_model = copy.deepcopy(model.state_dict())
        expected_opt = copy.deepcopy(opt.state_dict())
        handle = ck.save(3)
        # keep training while the save goes on: the snapshot must be the state at save()
        losses = [train_step(model, opt) for _ in range(K)]
        handle.wait()
    final_model = copy.deepcopy(model.state_dict())
    assert int(expected_model["bn.num_batches_tracked"]) == 3

    # a "new process": different seeds, fresh objects
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    model2 = Net()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1)
    assert not torch.equal(model2.fc1.weight, expected_model["fc1.weight"])
    with ac.AsyncCheckpointer(root, components(model2, opt2, ac.RNGState())) as ck2:
        info = ck2.load()
    assert info is not None and info.step == 3
    assert_same(model2.state_dict(), expected_model, "model")
    assert_same(opt2.state_dict(), expected_opt, "optim")
    losses2 = [train_step(model2, opt2) for _ in range(K)]
    assert losses2 == losses
    assert_same(model2.state_dict(), final_model, "model after training")


# ------------------------------------------------------------------------------------------
# (b) every CPU dtype, 0-d, empty, non-contiguous, nested containers
# ------------------------------------------------------------------------------------------
def _cpu_dtypes() -> list[torch.dtype]:
    """Every dtype torch defines whose tensors can be created and filled on CPU (quantized
    dtypes need quantize_per_tensor, and the sub-byte int1..7/uint1..7 placeholders have no
    copy kernel at all, not even torch.save supports them)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in {v for v in vars(torch).values() if isinstance(v, torch.dtype)}:
            try:
                src = torch.zeros(4, dtype=dtype)
                torch.empty(4, dtype=dtype).copy_(src)
            except (RuntimeError, NotImplementedError, TypeError):
                continue
            found.append(dtype)
    return sorted(found, key=str)


CPU_DTYPES = _cpu_dtypes()
MUST_HAVE = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
             torch.float8_e5m2, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
             torch.bool, torch.complex64, torch.complex128]


def test_dtype_list_is_complete():
    assert set(MUST_HAVE) <= set(CPU_DTYPES)
    for name in ("uint16", "uint32", "uint64", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
        if hasattr(torch, name):
            assert getattr(torch, name) in CPU_DTYPES, name


def random_tensor(dtype: torch.dtype, shape, gen: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as `dtype` (so floats include NaN payloads, subnormals, -0.0)."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    size = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def dtype_state(dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(7)
    big = random_tensor(dtype, (6, 10), gen)
    return {
        "plain": random_tensor(dtype, (3, 5), gen),
        "scalar": random_tensor(dtype, (), gen),
        "empty": torch.empty((0,), dtype=dtype),
        "empty2d": torch.empty((3, 0), dtype=dtype),
        "transposed": big.t(),
        "stepped": big[::2, 1::3],
        "flat_stepped": big.reshape(-1)[5::7],
    }


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_bit_exact(tmp_path, dtype, compression):
    state = dtype_state(dtype)
    assert not state["transposed"].is_contiguous() and not state["stepped"].is_contiguous()
    back, info = roundtrip(tmp_path, state, compression)
    assert_same(back, state)
    for name, t in state.items():
        assert back[name].dtype == dtype and back[name].shape == t.shape, name
    assert info.nbytes == sum(t.numel() * t.element_size() for t in state.values())


def test_nested_containers_preserve_types(tmp_path):
    gen = torch.Generator().manual_seed(3)
    od = collections.OrderedDict([("z", torch.arange(3)), ("a", 1), ("m", [2, 3])])
    od._metadata = {"": {"version": 2}}   # like nn.Module.state_dict()
    state = {
        "od": od,
        "int_keys": {3: torch.ones(2), 1: "one", -7: [1.5], 0: None},
        "mixed_keys": {1: "int", "1": "str", None: "none"},
        "bool_keys": {True: "yes", False: "no"},
        "list": [torch.randn(2, 3, generator=gen), [torch.tensor(1, dtype=torch.int16), ()], {}],
        "tuple": (torch.randn(4, generator=gen).to(torch.bfloat16), ("x", (1, 2)), []),
        "deep": {"a": {"b": {"c": [({"d": torch.tensor([True, False])},)]}}},
        "tag_lookalikes": {"t": 0, "d": [1], "l": "x", "u": None, "f": "nan", "p": "AAAA"},
        "dtype_leaf": torch.float16,
        "empty_od": collections.OrderedDict(),
    }
    for compression in COMPRESSIONS:
        back, _ = roundtrip(tmp_path / str(compression), state, compression)
        assert_same(back, state)
        assert type(back["od"]) is collections.OrderedDict
        assert list(back["int_keys"]) == [3, 1, -7, 0]
        assert back["dtype_leaf"] is torch.float16


def test_numpy_arrays_round_trip(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    readonly = np.arange(5, dtype=np.int64)
    readonly.flags.writeable = False
    state = {
        "plain": a, "transposed": a.T, "stepped": a[:, ::2], "reversed": a[::-1], "flipped": np.flip(a, 1),
        "readonly": readonly, "u16": np.arange(4, dtype=np.uint16), "bool": np.array([True, False]),
        "c128": np.array([1 + 2j, -0.0 - 1j]), "f16": np.full(3, 0.1, dtype=np.float16),
        "scalar": np.array(3.5),
    }
    back, _ = roundtrip(tmp_path, state)
    assert list(back) == list(state)
    for name, arr in state.items():
        got = back[name]
        assert type(got) is np.ndarray, name
        assert got.dtype == arr.dtype and got.shape == arr.shape, name
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(arr).tobytes(), name


def test_module_state_dict_metadata_survives(tmp_path):
    model = Net()
    sd = model.state_dict()
    back, _ = roundtrip(tmp_path, sd)
    assert_same(back, sd)
    assert back._metadata == sd._metadata
    fresh = Net()
    fresh.load_state_dict(back)
    assert_same(fresh.state_dict(), sd)


# ------------------------------------------------------------------------------------------
# (c) non-tensor leaves
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_non_tensor_leaves_exact(tmp_path, compression):
    state = {
        "int": 3, "neg": -5, "zero": 0, "big": 2 ** 70, "bigneg": -(2 ** 65),
        "float": 1.5, "whole_float": 2.0, "tiny": 5e-324, "huge": 1.7976931348623157e308,
        "third": 1 / 3, "nan": float("nan"), "inf": float("inf"), "ninf": float("-inf"),
        "negzero": -0.0, "poszero": 0.0,
        "str": "héllo \n\t\"quoted\" \\ \u0000 \U0001F600", "empty_str": "",
        "true": True, "false": False, "none": None,
        "nested": [1, (2.5, "x", None, float("nan")), {"k": [float("-inf"), -0.0]}, [[[]]]],
        "tuple_of_bools": (True, False, True),
    }
    back, info = roundtrip(tmp_path, state, compression)
    assert_same(back, state)
    assert type(back["whole_float"]) is float and type(back["int"]) is int
    assert type(back["true"]) is bool
    assert info.nbytes == 0


# ------------------------------------------------------------------------------------------
# (d) pickle only behind the opt-in
# ------------------------------------------------------------------------------------------
def test_pickle_is_opt_in(tmp_path):
    root = tmp_path / "ckpt"
    state = {"cfg": {"ratio": fractions.Fraction(1, 3), "name": "x"}, "w": torch.arange(4)}
    with ac.AsyncCheckpointer(root, [ac.StateComponent("extra", Box(state), G)]) as ck:
        with pytest.raises(ac.CheckpointError) as exc_info:
            ck.save(1)
        assert "extra/cfg/ratio" in str(exc_info.value)
        assert "allow_pickle" in str(exc_info.value)
        assert ck.list_checkpoints() == []
    assert not root.exists() or not any(n.startswith("step-") for n in os.listdir(root))

    with ac.AsyncCheckpointer(root, [ac.StateComponent("extra", Box(state), G)], allow_pickle=True) as ck:
        ck.save(1).wait()

    target = Box()
    with ac.AsyncCheckpointer(root, [ac.StateComponent("extra", target, G)]) as ck:
        with pytest.raises(ac.CheckpointError) as exc_info:
            ck.load()
        assert "pickle" in str(exc_info.value)
    assert target.loaded is None

    with ac.AsyncCheckpointer(root, [ac.StateComponent("extra", target, G)], allow_pickle=True) as ck:
        assert ck.load().step == 1
    assert target.loaded["cfg"]["ratio"] == fractions.Fraction(1, 3)
    assert type(target.loaded["cfg"]["ratio"]) is fractions.Fraction
    assert torch.equal(target.loaded["w"], torch.arange(4))


# ------------------------------------------------------------------------------------------
# (e) tied weights are stored once and come back tied
# ------------------------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 100, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_tied_weights_stored_once(tmp_path, compression):
    model = Tied()
    root = tmp_path / "ckpt"
    with ac.AsyncCheckpointer(root, [ac.StateComponent("model", model, G)], compression=compression) as ck:
        info = ck.save(1).wait()
    one_copy = 100 * 16 * 4
    assert info.nbytes == one_copy
    manifest = json.loads((root / "step-0000000001" / "manifest.json").read_text())
    assert manifest["nbytes"] == one_copy
    tensors = manifest["components"]["model"]["shards"]["global"]["tensors"]
    assert len(tensors) == 1
    if compression is None:
        assert one_copy <= info.stored_nbytes < 2 * one_copy

    fresh = Tied()
    with ac.AsyncCheckpointer(root, [ac.StateComponent("model", fresh, G)]) as ck:
        ck.load()
    assert torch.equal(fresh.emb.weight, model.emb.weight)
    assert fresh.head.weight is fresh.emb.weight

    # the raw state dict comes back with both keys sharing one tensor
    back, _ = roundtrip(tmp_path / "raw", model.state_dict(), compression)
    assert list(back) == ["emb.weight", "head.weight"]
    assert torch.equal(back["emb.weight"], model.emb.weight)
    assert back["emb.weight"].data_ptr() == back["head.weight"].data_ptr()


def test_views_of_one_storage_are_distinct(tmp_path):
    # Different views of one storage are different tensors: both must come back right.
    base = torch.arange(20, dtype=torch.float32)
    state = {"a": base[:10], "b": base[10:], "c": base.view(4, 5), "d": base.view(4, 5).t()}
    back, info = roundtrip(tmp_path, state)
    assert_same(back, state)
    assert info.nbytes == 4 * (10 + 10 + 20 + 20)


# ------------------------------------------------------------------------------------------
# (f) big tensors: several 16 MiB pieces
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_big_tensor_several_pieces(tmp_path, compression):
    gen = torch.Generator().manual_seed(11)
    numel = 10 * 2 ** 20 + 3                      # 40 MiB + 12 bytes: 3 pieces of 16 MiB
    big = torch.randn(numel, generator=gen)
    zeros = torch.zeros(9 * 2 ** 20, dtype=torch.float16)   # 18 MiB, compressible
    state = {"big": big, "zeros": zeros, "small": torch.arange(5)}
    back, info = roundtrip(tmp_path, state, compression)
    assert_same(back, state)
    assert info.nbytes == numel * 4 + zeros.numel() * 2 + 5 * 8
    manifest = json.loads((tmp_path / "ckpt" / "step-0000000001" / "manifest.json").read_text())
    entries = manifest["components"]["c"]["shards"]["global"]["tensors"]
    if compression == "zstd":
        # zstd-planes<W>: one stored length per byte plane of each piece (W = 4, 2, 1 here).
        assert [(e["codec"], len(e["frames"])) for e in entries] == [
            ("zstd-planes4", 3 * 4), ("zstd-planes2", 2 * 2), ("zstd-planes1", 1)]
        assert info.stored_nbytes < info.nbytes - zeros.numel()   # the zeros compress away
    else:
        assert info.stored_nbytes >= info.nbytes
