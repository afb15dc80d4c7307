"""The per-plane codec (zstd-planes<W>, what compression="zstd" writes): bit-exact round trips of
every dtype and awkward size, the per-plane raw/frame decisions (within a piece and across the
pieces of one tensor), both zstd engines, hostile manifests and frames, and the checked-in fixture."""
from __future__ import annotations

import glob
import json
import os
import warnings

import numpy as np
import pytest
import torch
import zstandard

import async_ckpt as ac
from async_ckpt.format import planes
from async_ckpt.format.codec import PIECE, Compressor, byte_view, codec_for, codec_width, decompress_frames
from async_ckpt.save.datafile import DataFileStreamer
from support.codec import (COMPLEX, FLOATS, FP8, OTHERS, G, Sink, edit, load_fails, manifest, sample,
                           save_load, tensors)
from support.compare import assert_same
from support.fixture_state import planes_state
from support.stateful import Holder

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "codec_zstd-planes_v1")
WIDTH = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4, torch.float64: 8,
         torch.complex32: 2, torch.complex64: 4, torch.complex128: 8,
         **{d: 1 for d in FP8 + OTHERS}}
N_SAMPLED = planes.SAMPLE_RUNS * planes.SAMPLE_RUN    # planes above this many bytes are sampled


def weights(numel: int, seed: int = 0) -> torch.Tensor:
    return (torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)


def words(low: torch.Tensor | int, high: torch.Tensor | int, n: int) -> torch.Tensor:
    """bf16 elements whose low and high bytes are given (memory order, little-endian host)."""
    low = low if isinstance(low, torch.Tensor) else torch.full((n,), low, dtype=torch.int32)
    high = high if isinstance(high, torch.Tensor) else torch.full((n,), high, dtype=torch.int32)
    return (low.to(torch.int32) | (high.to(torch.int32) << 8)).to(torch.int16).view(torch.bfloat16)


def noise_bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))


def roundtrip(t: torch.Tensor, comp: Compressor | None = None) -> tuple[int, ...]:
    """Encode every piece of `t` with the codec its dtype calls for, decode, compare bytes."""
    comp = comp or Compressor()
    codec = codec_for(t.dtype, True)
    view = byte_view(t.contiguous())
    chunks, frames = [], []
    for piece in [view[i:i + PIECE] for i in range(0, len(view), PIECE)] or [view]:
        data, lengths = comp.encode(piece, codec)
        assert len(data) <= len(piece) and sum(lengths) == len(data)
        chunks.append(bytes(data))
        frames.extend(lengths)
    out = torch.empty(len(view), dtype=torch.uint8)
    decompress_frames(memoryview(b"".join(chunks)), frames, byte_view(out), "t", codec_width(codec))
    assert bytes(out.numpy()) == bytes(view)
    return tuple(frames)


def test_every_dtype_round_trips_with_the_codec_its_size_calls_for(tmp_path):
    dtypes = FLOATS + FP8 + COMPLEX + OTHERS
    state = {f"{str(d)[6:]}_{n}": sample(d, n, i) for i, d in enumerate(dtypes) for n in (1, 3, 333)}
    state["empty_bf16"] = torch.empty(0, 7, dtype=torch.bfloat16)
    state["scalar_f64"] = torch.tensor(-0.0, dtype=torch.float64)
    state["weights"] = weights(N_SAMPLED + 77).reshape(-1, 1)    # sampled planes
    back = save_load(tmp_path, state)
    assert list(back) == list(state)
    for k, v in state.items():
        assert_same(back[k], v, k)
    entries = tensors(manifest(tmp_path))
    assert {(e["dtype"], e["codec"]) for e in entries} == {
        (str(d)[6:], f"zstd-planes{WIDTH[d]}") for d in dtypes}
    for e in entries:
        width = int(e["codec"][len("zstd-planes"):])
        assert len(e["frames"]) == width and all(f <= e["nbytes"] // width for f in e["frames"])
        assert all(f or not e["nbytes"] for f in e["frames"])


@pytest.mark.parametrize("dtype", FLOATS + COMPLEX + [torch.int64, torch.int32, torch.int8])
@pytest.mark.parametrize("numel", [1, 7, 4097, N_SAMPLED // 2 + 1, N_SAMPLED + 3, 3 * N_SAMPLED])
def test_sizes_around_the_sample_round_trip(dtype, numel):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roundtrip(sample(dtype, numel, numel))
        if dtype.is_floating_point:
            roundtrip((torch.randn(numel, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype))
        elif dtype.is_complex:
            roundtrip(torch.randn(numel, dtype=torch.complex64,
                                  generator=torch.Generator().manual_seed(1)).to(dtype))
        else:
            roundtrip(torch.arange(numel, dtype=dtype))


def test_each_plane_is_raw_or_a_frame_as_it_pays():
    n = 3 * N_SAMPLED
    cases = {
        "weights: noise mantissa raw, exponent a frame": (weights(n), ("raw", "frame")),
        "all-random bytes: both raw": (words(noise_bytes(n, 1), noise_bytes(n, 2), n), ("raw", "raw")),
        "all zeros: both frames": (torch.zeros(n, dtype=torch.bfloat16), ("frame", "frame")),
        "random low, zero high": (words(noise_bytes(n, 3), 0, n), ("raw", "frame")),
        "zero low, random high": (words(0, noise_bytes(n, 4), n), ("frame", "raw")),
    }
    for name, (t, want) in cases.items():
        frames = roundtrip(t)[::-1]               # stored from the highest plane down
        got = tuple("raw" if f == n else "frame" for f in frames)
        assert got == want, (name, frames)
        assert all(f == n or f <= n * planes.KEEP for f in frames), name
    # fp32: only the sign/exponent plane pays; zeros make every plane a tiny frame.
    m = 2 * N_SAMPLED
    adam = torch.randn(m, generator=torch.Generator().manual_seed(5)) * 1e-3
    assert roundtrip(adam)[1:] == (m, m, m) and roundtrip(adam)[0] < m / 2
    assert all(f < 100 for f in roundtrip(torch.zeros(m)))
    # One byte per element: the piece itself when it does not pay, plain zstd when it does.
    assert roundtrip(noise_bytes(n, 6).to(torch.uint8)) == (n,)
    assert roundtrip(torch.zeros(n, dtype=torch.int8))[0] < 100


def test_decisions_differ_across_the_pieces_of_one_tensor(tmp_path):
    """Piece 0 random bytes (both planes raw), piece 1 weights (raw + frame), piece 2 zeros and a
    short tail (two frames)."""
    n = PIECE // 2
    t = torch.cat([words(noise_bytes(n, 7), noise_bytes(n, 8), n), weights(n),
                   torch.zeros(n // 3 + 1, dtype=torch.bfloat16)])
    back = save_load(tmp_path, {"t": t})
    assert_same(back["t"], t)
    (e,) = tensors(manifest(tmp_path))
    f, tail = e["frames"], n // 3 + 1
    assert e["codec"] == "zstd-planes2" and len(f) == 6
    # Stored from the highest plane down: exponent frame first, then the raw mantissa plane.
    assert f[:2] == [n, n] and f[2] < n / 2 and f[3] == n and f[4] < tail / 10 and f[5] < tail / 10


def test_records_of_partial_elements_fall_back_to_one_plane():
    writer, sink = DataFileStreamer(Compressor()), Sink()
    odd, even = memoryview(bytes(range(7)) * 3), memoryview(bytes(8) * 4)
    try:
        result = writer.write(sink, [odd, even], ["zstd-planes2", "zstd-planes4"])
    finally:
        writer.close()
    assert [r.codec for r in result.records] == ["zstd-planes1", "zstd-planes4"]
    assert len(result.records[1].frames) == 4
    for rec, src in zip(result.records, (odd, even)):
        out = bytearray(len(src))
        decompress_frames(memoryview(bytes(sink.data[rec.offset:rec.offset + rec.length])),
                          list(rec.frames), memoryview(out), "t", codec_width(rec.codec))
        assert bytes(out) == bytes(src)


@pytest.mark.parametrize("native, level", [(False, 1), (True, 3), (False, 3)])
def test_without_the_cffi_engine_or_at_other_levels_frames_are_the_same_format(monkeypatch, native,
                                                                                level):
    if not native:
        monkeypatch.setattr(planes, "_NATIVE", None)
    comp = Compressor(level)
    assert not comp.planes.native
    t = torch.cat([weights(N_SAMPLED * 2), torch.zeros(1000, dtype=torch.bfloat16)])
    frames = roundtrip(t, comp)
    assert frames[0] < len(t) / 2 and frames[1] == len(t)     # exponent frame, raw mantissa
    roundtrip(sample(torch.float64, 5000), comp)
    roundtrip(torch.arange(5000, dtype=torch.int64), comp)


def test_frames_are_plain_zstd_frames_with_their_size():
    t = weights(N_SAMPLED * 2)
    data, (hi, lo) = Compressor().encode(byte_view(t), "zstd-planes2")
    assert lo == len(t) and hi < lo / 2
    frame = bytes(data)[:hi]
    assert zstandard.frame_content_size(frame) == len(t)
    plane = zstandard.ZstdDecompressor().decompress(frame)
    assert plane == bytes(t.view(torch.int16).numpy().view(np.uint8)[1::2])


@pytest.fixture
def saved(tmp_path):
    save_load(tmp_path, {"w": weights(N_SAMPLED * 2)})
    return tmp_path


def _swap(t, frames):
    t["frames"] = frames
    t["length"] = sum(frames)


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(codec="zstd-planes4"), "groups 4-byte elements"),
    (lambda t: t.update(codec="zstd-planes1"), "groups 1-byte elements"),
    (lambda t: t.update(codec="zstd-planes3"), "unknown codec"),
    (lambda t: t.update(codec="zstd-planes16"), "unknown codec"),
    (lambda t: t.update(frames=[t["length"]]), "2 per 16 MiB piece"),
    (lambda t: t.update(frames=t["frames"] + [0, 0]), "2 per 16 MiB piece"),
    (lambda t: t.update(frames=[t["frames"][0] - 1, t["frames"][1] + 1]), "more than its"),
    (lambda t: t.update(frames=[t["length"], 0]), "more than its"),
    (lambda t: t.update(frames=[0, t["length"]]), "none of its"),
    (lambda t: t.update(frames=[-1, t["frames"][1] + t["frames"][0] + 1]), ">= 0"),
    (lambda t: t.update(frames=[True, t["frames"][1] + t["frames"][0] - 1]), ">= 0"),
    (lambda t: t.update(frames={"0": 1}), "list of stored lengths"),
    (lambda t: t.pop("frames"), "2 per 16 MiB piece"),
    # Lengths that validate but lie about which plane is raw: decoding must catch them.
    (lambda t: t.update(frames=[t["frames"][0] + 9, t["frames"][1] - 9]), "cannot decompress"),
    (lambda t: t.update(frames=[t["frames"][0] + 1, t["frames"][1] - 1]), "cannot decompress"),
    (lambda t: t.update(codec="zstd-shuffle2", frames=[t["length"]]), "cannot decompress"),
])
def test_hostile_plane_descriptions_are_corrupt(saved, change, match):
    edit(saved, change)
    load_fails(saved, match)


def _frame(content: bytes, **kw) -> bytes:
    return zstandard.ZstdCompressor(**kw).compress(content)


@pytest.mark.parametrize("frame, why", [
    (_frame(bytes(8192)), "size other than"),                      # declares 8192, plane is 4096
    (_frame(bytes(64 << 20)), "size other than"),                  # a bomb: 64 MiB in 2 KB
    (_frame(bytes(4096), write_content_size=False), "size other than"),   # declares nothing
    (_frame(bytes(4000)), "size other than"),
])
def test_plane_frames_must_declare_exactly_their_plane(frame, why):
    n = 4096
    assert len(frame) < n
    stored = memoryview(bytes(n) + frame)                 # plane 1 raw, plane 0 the frame
    out = bytearray(2 * n)
    with pytest.raises(ValueError, match=why):
        decompress_frames(stored, [n, len(frame)], memoryview(out), "t", codec_width("zstd-planes2"))


def test_a_frame_that_holds_more_than_its_header_declares_is_refused():
    frame = bytearray(_frame(bytes(range(256)) * 4))        # 1024 bytes, one segment
    fhd = frame[4]
    assert fhd >> 6 == 1 and fhd & 0x20                     # a 2-byte size field right after it
    frame[5:7] = (500 - 256).to_bytes(2, "little")          # now it claims 500
    assert zstandard.frame_content_size(bytes(frame)) == 500
    out = bytearray(1000)
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decompress_frames(memoryview(bytes(500) + bytes(frame)), [500, len(frame)],
                          memoryview(out), "t", codec_width("zstd-planes2"))


def test_parallel_decode_fails_on_one_bad_piece_and_succeeds_on_good_ones():
    comp = Compressor()
    t = weights(PIECE // 2 * 3 // 2)
    view = byte_view(t)
    enc = [comp.encode(view[i:i + PIECE], "zstd-planes2") for i in range(0, len(view), PIECE)]
    stored = b"".join(bytes(d) for d, _ in enc)
    frames = [f for _, fr in enc for f in fr]
    out = torch.empty(len(view), dtype=torch.uint8)
    width = codec_width("zstd-planes2")
    decompress_frames(memoryview(stored), frames, byte_view(out), "t", width)
    assert torch.equal(out, t.view(torch.uint8))
    bad = bytearray(stored)
    bad[20] ^= 0xFF                                  # inside piece 0's exponent frame (stored first)
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decompress_frames(memoryview(bytes(bad)), frames, byte_view(out), "t", width)


def test_checked_in_fixture_of_the_planes_codec_loads_bit_exact():
    holder = Holder()
    info = ac.AsyncCheckpointer(FIXTURE, [ac.StateComponent("state", holder, G)]).load(1)
    assert info.step == 1 and info.metrics == {"loss": 0.5}
    assert_same(holder.state, planes_state())
    doc = json.load(open(glob.glob(os.path.join(FIXTURE, "step-*", "manifest.json"))[0]))
    entries = doc["components"]["state"]["shards"]["global"]["tensors"]
    assert {t["codec"] for t in entries} == {f"zstd-planes{w}" for w in (1, 2, 4, 8)}
    kinds = set()
    for t in entries:
        w = int(t["codec"][len("zstd-planes"):])
        kinds |= {"raw" if f == t["nbytes"] // w else "frame" for f in t["frames"]}
    assert kinds == {"raw", "frame"}


def test_the_load_leaves_the_registered_state_alone_when_a_plane_is_corrupt(saved):
    path = glob.glob(str(saved / "ckpt" / "step-0000000001" / "data-*.bin"))[0]
    raw = bytearray(open(path, "rb").read())
    (e,) = tensors(manifest(saved))
    raw[e["offset"] + e["frames"][0] + 5] ^= 1          # the exponent frame; hash catches it
    open(path, "wb").write(bytes(raw))
    load_fails(saved, "hash mismatch")
