"""Shared by the codec tests (test_codec_shuffle.py, test_codec_planes.py): dtype lists, random
samples of every bit pattern, a save/load round trip of one component "c", its manifest and
edits to it, and an in-memory sink for DataFileStreamer."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import async_ckpt as ac
from support.corruption import resealed
from support.stateful import Box

G = ac.SharingPattern.GLOBAL

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
FP8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                   "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)]
COMPLEX = [torch.complex32, torch.complex64, torch.complex128]
OTHERS = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]


def sample(dtype: torch.dtype, numel: int, seed: int = 0) -> torch.Tensor:
    """Random bytes viewed as `dtype`: every bit pattern (NaNs, -0.0, denormals) must survive."""
    itemsize = dtype.itemsize
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(seed))
    if dtype == torch.bool:
        return raw[:numel] % 2 == 1
    return raw.view(dtype)


def save_load(tmp_path, state, compression="zstd"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # complex32 is "experimental" in torch
        with ac.AsyncCheckpointer(tmp_path / "ckpt", [ac.StateComponent("c", Box(state), G)],
                                  compression=compression) as ckpt:
            ckpt.save(1).wait()
        box = Box()
        ac.AsyncCheckpointer(tmp_path / "ckpt", [ac.StateComponent("c", box, G)]).load(1)
    return box.loaded


def manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "ckpt" / "step-0000000001" / "manifest.json").read_text())


def tensors(doc: dict) -> list[dict]:
    return doc["components"]["c"]["shards"]["global"]["tensors"]


def edit(tmp_path, change) -> None:
    """Apply `change` to the first tensor entry of the saved manifest."""
    path = tmp_path / "ckpt" / "step-0000000001" / "manifest.json"
    doc = json.loads(path.read_text())
    change(tensors(doc)[0])
    path.write_bytes(resealed(doc))       # past the seal, to the validator


def load_fails(tmp_path, match: str) -> None:
    box = Box()
    with pytest.raises(ac.CorruptCheckpointError, match=match):
        ac.AsyncCheckpointer(tmp_path / "ckpt", [ac.StateComponent("c", box, G)]).load(1)
    assert box.loaded is None


class Sink:
    """Where DataFileStreamer writes in memory."""

    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += b
