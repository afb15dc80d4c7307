"""The byte-grouped zstd codec (zstd-shuffle<W>, what compression="zstd" wrote before
zstd-planes<W>): round trips of every dtype, rejection of unknown or inconsistent codecs, the
checked-in fixture, and that grouping really compresses bf16 weights better than plain zstd.
The codec that is written now has its own tests in test_codec_planes.py."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
import zstandard

import async_ckpt as ac
from async_ckpt.format.codec import (CODECS, PIECE, Compressor, byte_view, codec_for, codec_width,
                              decompress_frames, piece_sizes)
from async_ckpt.save.datafile import DataFileStreamer
from async_ckpt.format.shuffle import shuffle, shuffle_width, unshuffle
from support.codec import (COMPLEX, FLOATS, FP8, OTHERS, G, Sink, edit, load_fails, manifest, sample,
                           save_load, tensors)
from support.compare import assert_same
from support.fixture_state import codec_state
from support.stateful import Holder

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "codec_zstd-shuffle_v1")

# Grouping width per dtype: element (complex: component) size; 1-byte types and integers: none.
WANT = {torch.bfloat16: "zstd-shuffle2", torch.float16: "zstd-shuffle2",
        torch.float32: "zstd-shuffle4", torch.float64: "zstd-shuffle8",
        torch.complex32: "zstd-shuffle2", torch.complex64: "zstd-shuffle4",
        torch.complex128: "zstd-shuffle8", **{d: "zstd" for d in FP8 + OTHERS}}


def write_records(records, codecs):
    """DataFileStreamer into memory: (stored bytes, results)."""
    writer, sink = DataFileStreamer(Compressor()), Sink()
    try:
        result = writer.write(sink, records, codecs)
    finally:
        writer.close()
    return bytes(sink.data), result.records


def test_every_dtype_round_trips_through_the_codec_its_size_calls_for():
    """As releases before zstd-planes wrote them (the writer still can, given the codec)."""
    dtypes = FLOATS + FP8 + COMPLEX + OTHERS
    # Sizes around the grouping width and the 64-byte alignment, and empty tensors.
    tensors_ = [sample(d, n, i) for i, d in enumerate(dtypes) for n in (0, 1, 3, 333)]
    tensors_.append(sample(torch.bfloat16, PIECE // 2 + 5, 9))       # two pieces
    codecs = [WANT[t.dtype] for t in tensors_]
    data, records = write_records([byte_view(t) for t in tensors_], codecs)
    for t, rec, codec in zip(tensors_, records, codecs):
        assert rec.codec == codec and len(rec.frames) == len(piece_sizes(t.numel() * t.itemsize))
        out = torch.empty(t.numel() * t.itemsize, dtype=torch.uint8)
        decompress_frames(memoryview(data[rec.offset:rec.offset + rec.length]), list(rec.frames),
                          byte_view(out), "t", codec_width(codec))
        assert bytes(out.numpy()) == bytes(byte_view(t.contiguous()))


def test_uncompressed_checkpoints_stay_raw(tmp_path):
    back = save_load(tmp_path, {"w": sample(torch.bfloat16, 100)}, compression=None)
    assert [e["codec"] for e in tensors(manifest(tmp_path))] == ["raw"]
    assert "frames" not in tensors(manifest(tmp_path))[0]
    assert back["w"].dtype == torch.bfloat16


def test_pieces_of_a_multi_piece_record_round_trip(tmp_path):
    # 40 MiB + 6 bytes of fp16: 3 pieces, the last one short; and an fp64 record whose middle piece
    # boundary falls inside no element (PIECE is a multiple of every width).
    numel = (40 << 20) // 2 + 3
    half = (torch.randn(numel, generator=torch.Generator().manual_seed(3)) * 0.02).half()
    f64 = torch.randn((17 << 20) // 8 + 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    back = save_load(tmp_path, {"half": half, "f64": f64})
    assert_same(back["half"], half)
    assert_same(back["f64"], f64)
    entries = tensors(manifest(tmp_path))
    # The codec written now: one stored length per plane and piece.
    assert [(e["codec"], len(e["frames"])) for e in entries] == [("zstd-planes2", 6), ("zstd-planes8", 16)]


def test_shuffle_groups_bytes_and_inverts():
    data = bytes(range(24))
    planes = shuffle(memoryview(data), 4)
    assert planes.tobytes() == bytes([0, 4, 8, 12, 16, 20, 1, 5, 9, 13, 17, 21,
                                      2, 6, 10, 14, 18, 22, 3, 7, 11, 15, 19, 23])
    for width in (2, 4, 8):
        src = np.random.default_rng(width).integers(0, 256, 8 * 129, dtype=np.uint8).tobytes()
        out = bytearray(len(src))
        unshuffle(shuffle(memoryview(src), width).tobytes(), memoryview(out), width)
        assert bytes(out) == src
    with pytest.raises(ValueError, match="2-byte elements"):
        shuffle(memoryview(bytes(5)), 2)


def test_a_record_whose_length_is_not_whole_elements_falls_back_to_plain_zstd():
    """The writer never groups bytes it cannot ungroup: an odd-length record asked to be
    shuffled is stored (and recorded) as plain zstd."""
    writer = DataFileStreamer(Compressor())
    try:
        odd, even = memoryview(bytes(range(7)) * 3), memoryview(bytes(range(8)) * 4)
        sink = Sink()
        result = writer.write(sink, [odd, even], ["zstd-shuffle2", "zstd-shuffle4"])
    finally:
        writer.close()
    assert [r.codec for r in result.records] == ["zstd", "zstd-shuffle4"]
    for rec, src in zip(result.records, (odd, even)):
        out = bytearray(len(src))
        decompress_frames(memoryview(bytes(sink.data[rec.offset:rec.offset + rec.length])),
                          list(rec.frames), memoryview(out), "test", codec_width(rec.codec))
        assert bytes(out) == bytes(src)


def test_codec_names_and_widths():
    assert CODECS == ("raw", "zstd", "zstd-shuffle2", "zstd-shuffle4", "zstd-shuffle8",
                      "zstd-planes1", "zstd-planes2", "zstd-planes4", "zstd-planes8")
    assert [codec_width(c) for c in CODECS] == [0, 0, 2, 4, 8, 1, 2, 4, 8]
    with pytest.raises(ValueError, match="unknown codec 'zstd-shuffle3'"):
        codec_width("zstd-shuffle3")
    assert codec_for(torch.bfloat16, False) == "raw"
    assert all(shuffle_width(d) == (int(c[-1]) if c != "zstd" else 0) for d, c in WANT.items())
    assert shuffle_width(torch.int16) == 0 and shuffle_width(torch.complex64) == 4
    assert piece_sizes(0) == [0] and piece_sizes(PIECE + 1) == [PIECE, 1]


@pytest.fixture
def saved(tmp_path):
    w = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    save_load(tmp_path, {"w": w})
    return tmp_path, w


@pytest.mark.parametrize("codec, match", [
    ("zstd-shuffle3", "unknown codec"),             # not a width we write
    ("zstd-bitshuffle2", "unknown codec"),          # a filter this release does not know
    ("zstd-shuffle4", "groups 4-byte elements"),    # bf16 has 2-byte elements
    ("ZSTD-SHUFFLE2", "unknown codec"),
])
def test_unknown_or_inconsistent_codec_is_corrupt(saved, codec, match):
    tmp_path, _ = saved
    edit(tmp_path, lambda t: t.update(codec=codec))
    load_fails(tmp_path, match)


def test_frame_count_must_match_the_pieces(saved):
    tmp_path, _ = saved
    edit(tmp_path, lambda t: t.update(codec="zstd-shuffle2", frames=[t["length"] - 5, 5]))
    load_fails(tmp_path, "one per 16 MiB piece")


def test_frame_that_declares_another_size_is_rejected_before_decoding():
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(100))
    out = bytearray(96)
    with pytest.raises(ValueError, match="size other than its piece"):
        decompress_frames(memoryview(frame), [len(frame)], memoryview(out), "t", 2)


def test_parallel_decode_fails_when_one_piece_is_wrong_and_succeeds_when_all_are_right():
    comp = Compressor()
    src = (torch.randn(PIECE // 2 * 3 // 2) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    frames = [comp.compress(memoryview(src)[i:i + PIECE], 2) for i in range(0, len(src), PIECE)]
    assert len(frames) == 2
    wrong = comp.compress(memoryview(src)[:PIECE - 2], 2)    # a valid frame of the wrong size
    out = bytearray(len(src))
    with pytest.raises(ValueError, match="size other than its piece"):
        decompress_frames(memoryview(wrong + frames[1]), [len(wrong), len(frames[1])],
                          memoryview(out), "t", 2)
    decompress_frames(memoryview(b"".join(frames)), [len(f) for f in frames], memoryview(out), "t", 2)
    assert bytes(out) == src
    # A truncated frame fails on this thread's reused decoder, which then still decodes good data.
    cut = frames[1][:-10]
    tail = bytearray(len(src) - PIECE)
    with pytest.raises(zstandard.ZstdError):
        decompress_frames(memoryview(cut), [len(cut)], memoryview(tail), "t", 2, parallel=False)
    decompress_frames(memoryview(frames[1]), [len(frames[1])], memoryview(tail), "t", 2, parallel=False)
    assert bytes(tail) == src[PIECE:]


def test_checked_in_fixture_of_the_grouped_codec_loads_bit_exact():
    holder = Holder()
    info = ac.AsyncCheckpointer(FIXTURE, [ac.StateComponent("state", holder, G)]).load(1)
    assert info.step == 1 and info.metrics == {"loss": 0.5}
    assert_same(holder.state, codec_state())
    doc = json.load(open(glob.glob(os.path.join(FIXTURE, "step-*", "manifest.json"))[0]))
    assert doc["format_version"] == 1
    codecs = {t["codec"] for t in doc["components"]["state"]["shards"]["global"]["tensors"]}
    assert codecs == {"zstd", "zstd-shuffle2", "zstd-shuffle4", "zstd-shuffle8"}


def test_old_plain_zstd_fixture_still_loads_with_its_codec():
    old = os.path.join(os.path.dirname(__file__), "fixtures", "format_v1")
    holder = Holder()
    ac.AsyncCheckpointer(old, [ac.StateComponent("state", holder, G)]).load(2)
    from support.fixture_state import expected_state
    assert_same(holder.state, expected_state())
    doc = json.load(open(os.path.join(old, "step-0000000002", "manifest.json")))
    assert {t["codec"] for t in doc["components"]["state"]["shards"]["global"]["tensors"]} == {"zstd"}


def test_grouping_compresses_bf16_weights_better_than_plain_zstd(tmp_path):
    """The point of the filter: measurably smaller bf16 weights (ratios, not timings)."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(4 << 20, generator=gen) * 0.02).to(torch.bfloat16)       # 8 MiB
    view = memoryview(w.view(torch.uint8).numpy())
    comp = Compressor()
    plain = len(view) / len(comp.compress(view))
    grouped = len(view) / len(comp.compress(view, 2))
    assert plain < 1.33 and grouped >= 1.4 and grouped > plain * 1.1, (plain, grouped)
    # And end to end (the per-plane codec written now): fewer bytes than plain zstd.
    save_load(tmp_path, {"w": w})
    (entry,) = tensors(manifest(tmp_path))
    assert entry["codec"] == "zstd-planes2" and entry["nbytes"] / entry["length"] >= 1.4


@pytest.mark.multiproc
@pytest.mark.timeout(900)
def test_two_nodes_save_grouped_records_and_reload_them(tmp_path):
    """The node writers' path (node_save.py): 4 ranks on 2 nodes, compression="zstd"."""
    from support.dist import run
    env = {"DIST_TEST_COMPRESSION": "zstd"}     # launch() puts this checkout first on PYTHONPATH
    before = run("save", tmp_path / "ckpt", tmp_path / "out-save", env=env)
    after = run("load", tmp_path / "ckpt", tmp_path / "out-load", env=env)
    for rank, res in after.items():
        assert res["step"] == 2 and res["model"] == before[rank]["model"]
        assert res["per_rank"] == {"v": [float(rank)] * 5, "name": f"rank{rank}"}
    doc = json.loads((tmp_path / "ckpt" / "step-0000000002" / "manifest.json").read_text())
    by_dtype = {(t["dtype"], t["codec"]) for c in doc["components"].values()
                for s in c["shards"].values() for t in s["tensors"]}
    assert ("float32", "zstd-planes4") in by_dtype and ("float32", "zstd") not in by_dtype
    assert all(codec == codec_for(getattr(torch, d), True) for d, codec in by_dtype)
    assert {d for d, codec in by_dtype if codec == "zstd-planes1"}, "integer state: one plane"
