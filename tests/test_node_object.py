"""One data object per node (save/node_object.py): the writer in process on every backend, the
manifest rules for segmented files, and real 2 x 2 torchrun saves on local disk and S3 that
leave exactly one data object per node, load bit-exactly and whose damage `verify` names."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from async_ckpt.errors import CorruptCheckpointError
from async_ckpt.format.codec import Compressor, byte_view, codec_for, hash_bytes, segments_hash
from async_ckpt.format.manifest import FileEntry, Manifest, parse_manifest
from async_ckpt.save.datafile import DataFileStreamer
from async_ckpt.save.node_object import RankRecords, write_node_object
from async_ckpt.storage import open_storage
from async_ckpt.storage.base import SEGMENT_ALIGN
from support.cli import run_cli
from support.dist import run
from support.paths import HELPERS

WORKER = HELPERS / "node_object_worker.py"


def rank_tensors(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(3 << 18, generator=g),                       # 3 MiB of noise: stored raw
            torch.zeros(1 << 20, dtype=torch.bfloat16),               # compresses to almost nothing
            torch.arange(1000 * (rank + 1), dtype=torch.int32), torch.empty(0)]


def backend(kind: str, tmp_path, request):
    if kind == "local":
        return open_storage(tmp_path / "root")
    if kind == "memory":
        return open_storage(f"memory://node-object-{uuid.uuid4().hex}")
    server = request.getfixturevalue("seaweedfs")
    return open_storage(server.fresh_root(), server.storage_options())


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "zstd"])
@pytest.mark.parametrize("kind", ["local", "memory", "s3"])
def test_segments_hold_each_ranks_records_at_their_offsets(kind, compressed, tmp_path, request):
    storage = backend(kind, tmp_path, request)
    streamer = DataFileStreamer(Compressor() if compressed else None)
    try:
        tensors = {rank: rank_tensors(rank) for rank in (0, 1, 2)}
        ranks = [RankRecords(r, [byte_view(t) for t in ts], [codec_for(t.dtype, compressed) for t in ts])
                 for r, ts in tensors.items()]
        written, results = write_node_object(storage, streamer, "step-0000000001", 3, ranks)
    finally:
        streamer.close()
    assert written.name.startswith("data-n00003-") and len(written.segments) == 3
    assert storage.list_dir("step-0000000001") == [written.name]
    data = storage.read_bytes(f"step-0000000001/{written.name}")
    assert len(data) == written.size and written.hash == segments_hash(written.segments)
    end = 0
    for (offset, length, digest), rank in zip(written.segments, (0, 1, 2), strict=True):
        assert offset % SEGMENT_ALIGN == 0 and offset >= end
        assert hash_bytes(data[offset:offset + length]) == digest
        end = offset + length
        records = results[rank].records
        assert [r.codec == "raw" for r in records] == [not compressed] * 4
        for rec, tensor in zip(records, tensors[rank], strict=True):
            assert offset <= rec.offset and rec.offset + rec.length <= offset + length
            stored = data[rec.offset:rec.offset + rec.length]
            assert hash_bytes(stored) == rec.hash
            if not compressed:
                assert stored == bytes(byte_view(tensor))
    if compressed:      # the reserve for zstd is only an upper bound: what it did not use is a gap
        assert written.segments[1][1] < 4 << 20


def test_s3_segments_of_several_parts_pad_only_their_last_part(seaweedfs):
    """5 MiB parts: segment 0 (12 MiB) sends 5 + 5 + 2 -> padded to 5; segment 1 (6 MiB + 100 B)
    5 + 1 -> padded to 5; the last segment (3 MiB) is the object's last part, unpadded."""
    storage = open_storage(seaweedfs.fresh_root(), {**seaweedfs.storage_options(), "part_size": 5 << 20})
    payloads = [os.urandom(12 << 20), os.urandom((6 << 20) + 100), os.urandom(3 << 20)]
    writer = storage.open_segmented("s/node.bin", [len(p) for p in payloads])
    for i, data in enumerate(payloads):        # one after another is fine for a parallel writer too
        seg = writer.segment(i)
        seg.write(memoryview(data))
        assert seg.close() == len(data)
    layout = writer.commit()
    mib = 1 << 20
    assert layout.segments == ((0, 12 * mib), (15 * mib, 6 * mib + 100), (25 * mib, 3 * mib))
    assert layout.size == 28 * mib == storage.size("s/node.bin")
    whole = storage.read_bytes("s/node.bin")
    for (offset, length), data in zip(layout.segments, payloads, strict=True):
        assert whole[offset:offset + length] == data
    assert whole[12 * mib:15 * mib] == bytes(3 * mib) and whole[21 * mib + 100:25 * mib] == bytes(4 * mib - 100)
    assert storage.list_uploads("s") == []


def test_a_failing_segment_aborts_the_object_and_raises_its_own_error(tmp_path):
    storage = open_storage(tmp_path / "root")

    class Failing(DataFileStreamer):
        def write(self, out, records, codecs=None):
            if len(records) == 1:
                raise OSError("disk on fire")
            return super().write(out, records, codecs)
    streamer = Failing(None)
    ranks = [RankRecords(0, [byte_view(t) for t in rank_tensors(0)], ["raw"] * 4),
             RankRecords(1, [memoryview(b"x" * 64)], ["raw"])]
    try:
        with pytest.raises(OSError, match="disk on fire"):
            write_node_object(storage, streamer, "step-0000000001", 0, ranks)
    finally:
        streamer.close()
    assert storage.list_dir("step-0000000001") == []


# -- the manifest: segmented files are format_version 3 and validated -------------------------------
def _manifest(segments, records=((0, 64),), size=8192, hash_=None) -> bytes:
    from async_ckpt.format.manifest import ComponentEntry, ShardEntry, TensorEntry
    entry = FileEntry(size, hash_ or segments_hash(segments), tuple(segments))
    tensors = tuple(TensorEntry("uint8", (n,), "data-n00000-0.bin", o, n, n, "raw", "0" * 32)
                    for o, n in records)
    comp = ComponentEntry("per_rank", True, "none", None,
                          {"rank0": ShardEntry({"l": [{"t": i} for i in range(len(tensors))]}, tensors, (0,))})
    return Manifest(1, "now", {}, {}, {"data-n00000-0.bin": entry}, {"c": comp}, 0, 0, {}, {}).to_json()


GOOD = [(0, 128, "a" * 32), (4096, 64, "b" * 32)]


def test_segmented_manifest_round_trips_as_version_3():
    doc = json.loads(_manifest(GOOD, records=((0, 64), (64, 64), (4096, 64))))
    assert doc["format_version"] == 3 and doc["files"]["data-n00000-0.bin"]["segments"] == [list(s) for s in GOOD]
    parsed = parse_manifest(_manifest(GOOD), "m")
    assert parsed.files["data-n00000-0.bin"].segments == tuple(GOOD)
    assert parsed.version() == 3


@pytest.mark.parametrize("segments,records,hash_,words", [
    ([(4096, 64, "b" * 32), (0, 128, "a" * 32)], ((0, 64),), None, "out of order"),
    ([(0, 128, "a" * 32), (64, 128, "b" * 32)], ((0, 64),), None, "overlaps"),
    ([(0, 128, "a" * 32), (8190, 64, "b" * 32)], ((0, 64),), None, "past the end"),
    (GOOD, ((64, 128),), None, "inside one segment"),          # runs out of segment 0
    (GOOD, ((2048, 64),), None, "inside one segment"),         # in the gap between segments
    (GOOD, ((0, 64),), "c" * 32, "hash of its segments"),
    ([(0, 128, "zz")], ((0, 64),), None, "malformed hash"),
])
def test_segmented_manifest_refuses(segments, records, hash_, words):
    with pytest.raises(CorruptCheckpointError, match=words):
        parse_manifest(_manifest(segments, records, hash_=hash_), "m")


def test_segments_need_format_version_3():
    doc = json.loads(_manifest(GOOD))
    doc["format_version"] = 2
    doc.pop("manifest_hash")
    with pytest.raises(CorruptCheckpointError, match="format_version 3"):
        parse_manifest(json.dumps(doc).encode(), "m")


# -- real 2 x 2 saves ------------------------------------------------------------------------------
def _save(root: str, out: Path, compression: str | None, options: dict | None = None) -> dict:
    env = {"NODE_OBJECT_COMPRESSION": compression or "",
           "NODE_OBJECT_STORAGE_OPTIONS": json.dumps(options) if options else ""}
    results = run("save", root, out, worker=WORKER, env=env)
    assert all(r["exact"] and r["step"] == 1 for r in results.values()), results
    return results


def _check_layout(names: list[str], manifest: dict) -> None:
    data = sorted(n for n in names if n.startswith("data-"))
    fragments = sorted(n for n in names if n.startswith("fragment-"))
    # 2 x nodes + 1: a data object and a manifest fragment per node, and the root manifest
    assert sorted(names) == sorted(data + fragments + ["manifest.json"]) and len(data) == 2, names
    assert sorted(manifest["fragments"]) == fragments and len(fragments) == 2, names
    assert [n[:12] for n in data] == ["data-n00000-", "data-n00001-"]
    assert manifest["format_version"] == 3 and sorted(manifest["files"]) == data
    for entry in manifest["files"].values():
        assert len(entry["segments"]) == 2     # one per local rank


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("compression", [None, "zstd"], ids=["raw", "zstd"])
def test_two_by_two_save_writes_one_object_per_node_and_verify_names_a_damaged_segment(tmp_path, compression):
    root = tmp_path / "ckpt"
    _save(str(root), tmp_path / "out", compression)
    folder = root / "step-0000000001"
    manifest = json.loads((folder / "manifest.json").read_text())
    _check_layout(os.listdir(folder), manifest)
    assert "intact" in run_cli("verify", root).stdout
    name = sorted(manifest["files"])[1]
    offset, length, _ = manifest["files"][name]["segments"][1]
    with open(folder / name, "r+b") as f:      # one byte in the middle of node 1's second segment
        f.seek(offset + length // 2)
        byte = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    proc = run_cli("verify", root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"hash mismatch in {folder / name} for segment 1 (bytes {offset}-{offset + length})" in proc.stdout
    assert "CORRUPT" in proc.stdout


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_two_by_two_save_on_s3_writes_one_object_per_node(tmp_path, seaweedfs):
    root = seaweedfs.fresh_root()
    _save(root, tmp_path / "out", "zstd", seaweedfs.storage_options())
    storage = open_storage(root, seaweedfs.storage_options())
    folder = "step-0000000001"
    manifest = json.loads(storage.read_bytes(f"{folder}/manifest.json"))
    _check_layout(storage.list_dir(folder), manifest)
    assert storage.list_uploads("") == []      # no multipart upload left behind
