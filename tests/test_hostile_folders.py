"""Hostile checkpoint folders (issue 14, item 5): every case the fuzzer found, one test each.

Every file the loader opens must be a regular file inside the root (no symlink below the root, no
FIFO or device), read with a bound; every allocation derived from checkpoint bytes is bounded
before it is made; the manifest and the late metrics files are sealed with a hash of their own
bytes; and only CheckpointErrors leave load(), latest_step() and list_checkpoints(). Each test
damages step 2 of a real checkpoint (steps 1 and 2, support/corruption.py), then checks that
load() raises a CheckpointError without touching the registered components, that listing skips
the bad step with a warning (or, for a bad metrics file, lists the step without those metrics),
that step 1 still loads, that nothing under the root (or outside it) was changed, and that no
call could hang: every call runs under `bounded` (a FIFO is released if a read blocks on it).
"""
from __future__ import annotations

import os
import resource
import shutil
from pathlib import Path

import pytest
import torch
import xxhash
from support.compare import assert_same
from support.corruption import (
    Saved,
    b_state,
    edit_manifest,
    fresh,
    load_ok,
    shard,
)
from support.hostile import LATE, G, fifos_under, listed, load_refused, outside_copy, step2_skipped, write_metrics
from support.stateful import Box

import async_ckpt as ac
from async_ckpt import CheckpointError, CorruptCheckpointError, InvalidArgumentError
from async_ckpt.format import seal
from async_ckpt.format.codec import PIECE, min_frame_size
from async_ckpt.format.metrics_file import HASH_KEY as METRICS_HASH_KEY
from async_ckpt.format.tree import unflatten
from async_ckpt.storage.testing.conformance import bounded


# -- manifest and metrics files that are not regular files inside the root -----------------------
@pytest.mark.parametrize("target", ["dev-zero", "outside-file"])
def test_manifest_symlink_is_refused(guarded, tmp_path, caplog, target):
    saved = guarded.saved
    manifest = saved.manifest(2)
    dest = Path("/dev/zero") if target == "dev-zero" else outside_copy(
        saved, tmp_path, "manifest.json", manifest.read_bytes())   # a valid manifest: only the link is wrong
    manifest.unlink()
    manifest.symlink_to(dest)
    guarded.freeze()
    err = load_refused(saved)
    assert str(manifest) in str(err) and "symlink" in str(err)
    step2_skipped(saved, caplog, "symlink")
    assert fresh(saved.root)[0].latest_step() == 2       # committed (it has a manifest), but refused
    load_refused(saved, step=None)                       # latest: raises rather than fall back


@pytest.mark.parametrize("target", ["dev-zero", "outside-file"])
def test_metrics_symlink_is_ignored(guarded, tmp_path, caplog, target):
    saved = guarded.saved
    link = saved.folder(2) / LATE
    # An outside JSON whose numbers must never show up in CheckpointInfo.metrics.
    dest = Path("/dev/zero") if target == "dev-zero" else outside_copy(
        saved, tmp_path, "metrics.json", seal.seal(b'{"loss":123.0}', METRICS_HASH_KEY))
    link.symlink_to(dest)
    guarded.freeze()
    infos, warnings = listed(saved, caplog)
    assert [i.step for i in infos] == [1, 2]
    assert infos[1].metrics == {}, "a metrics file outside the folder was trusted"
    assert any(LATE in w and "symlink" in w for w in warnings), warnings
    ckpt, a, b = fresh(saved.root)
    info = bounded(lambda: ckpt.load(step=2))
    assert info.metrics == {} and b.loads == 1
    assert_same(b.loaded, b_state(2))


def test_fifo_as_manifest_is_refused_without_hanging(guarded, caplog):
    saved = guarded.saved
    saved.manifest(2).unlink()
    os.mkfifo(saved.manifest(2))
    guarded.freeze()
    err = load_refused(saved)
    assert "FIFO" in str(err)
    step2_skipped(saved, caplog, "FIFO")


def test_fifo_as_metrics_file_is_ignored_without_hanging(guarded, caplog):
    saved = guarded.saved
    os.mkfifo(saved.folder(2) / LATE)
    guarded.freeze()
    infos, warnings = listed(saved, caplog)
    assert [i.step for i in infos] == [1, 2] and infos[1].metrics == {}
    assert any(LATE in w and "FIFO" in w for w in warnings), warnings
    ckpt, a, b = fresh(saved.root)
    assert bounded(lambda: ckpt.load(step=2), fifos=fifos_under(saved.root)).step == 2


def test_fifo_as_data_file_behind_an_empty_tensor_is_refused(tmp_path):
    """A data file that holds only empty tensors is 0 bytes long: no byte of it is ever read, but
    opening a FIFO in its place used to block for ever."""
    root = tmp_path / "ckpt"
    with ac.AsyncCheckpointer(root, [ac.StateComponent("e", Box({"x": torch.zeros(3, 0), "n": 1}), G)]) as ck:
        ck.save(1).wait()
    (data,) = (root / "step-0000000001").glob("data-*.bin")
    assert data.stat().st_size == 0
    box = Box()
    ac.AsyncCheckpointer(root, [ac.StateComponent("e", box, G)]).load(1)       # control
    assert box.loaded["x"].shape == (3, 0)
    data.unlink()
    os.mkfifo(data)
    box = Box()
    ckpt = ac.AsyncCheckpointer(root, [ac.StateComponent("e", box, G)])
    with pytest.raises(CorruptCheckpointError, match="FIFO"):
        bounded(lambda: ckpt.load(1), fifos=(str(data),))
    assert box.loads == 0
    assert data.is_fifo()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
@pytest.mark.parametrize("which", ["manifest", "data"])
def test_device_node_is_never_opened(guarded, which):
    saved = guarded.saved
    path = saved.manifest(2) if which == "manifest" else saved.data(2)
    path.unlink()
    try:
        os.mknod(path, 0o600 | 0o020000, os.makedev(1, 5))       # a character device: /dev/zero
    except PermissionError:
        pytest.skip("this container may not make device nodes")
    guarded.freeze()
    load_refused(saved, match="device")


def test_step_folder_symlinked_out_of_the_root_is_refused(guarded, tmp_path, caplog):
    saved = guarded.saved
    outside = tmp_path / "elsewhere" / "step-0000000002"
    outside.parent.mkdir()
    shutil.move(saved.folder(2), outside)       # an intact checkpoint: only the link is wrong
    saved.folder(2).symlink_to(outside)
    guarded.freeze()
    err = load_refused(saved)
    assert "symlink" in str(err)
    step2_skipped(saved, caplog, "symlink")
    guarded.check()
    # The anchor is the root: the same folder inside it loads.
    saved.folder(2).unlink()
    shutil.copytree(outside, saved.folder(2))
    load_ok(saved, 2)
    guarded.before = None


def test_step_folder_symlinked_to_another_step_inside_the_root_is_refused(guarded, caplog):
    saved = guarded.saved
    shutil.rmtree(saved.folder(2))
    saved.folder(2).symlink_to(saved.folder(1).name)
    guarded.freeze()
    load_refused(saved)
    step2_skipped(saved, caplog, "symlink")


def test_a_root_that_is_itself_a_symlink_is_the_anchor(saved, tmp_path):
    link = tmp_path / "linked-root"
    link.symlink_to(saved.root)
    load_ok(Saved(link, None), 2)


# -- exceptions that were not CheckpointErrors ----------------------------------------------------
@pytest.mark.parametrize("where", ["manifest", "late-file"])
def test_huge_integer_metric_is_ignored_not_overflowed(guarded, caplog, where):
    saved = guarded.saved
    if where == "manifest":
        edit_manifest(saved, lambda d: d["metrics"].update(loss=10 ** 400, acc=0.5))
    else:
        write_metrics(saved.folder(2), {"loss": 10 ** 400, "acc": 0.5})
    guarded.freeze()
    infos, warnings = listed(saved, caplog)
    assert [i.step for i in infos] == [1, 2]
    assert infos[1].metrics == {"acc": 0.5}
    assert any("'loss'" in w for w in warnings), warnings
    load_ok(saved, 2)


def test_huge_integer_metric_does_not_break_keep_best_retention(saved):
    edit_manifest(saved, lambda d: d["metrics"].update(loss=10 ** 400))
    with ac.AsyncCheckpointer(saved.root, [ac.StateComponent("b", Box(b_state(3)), G)],
                              keep_last=1, keep_best=1, best_metric="loss") as ckpt:
        ckpt.save(3, metrics={"loss": 0.5}).wait()
        ckpt.save(4, metrics={"loss": 0.25}).wait()      # retention ranks steps 1-4 here
        ckpt.wait()                                       # ... and has run once wait() returns
        steps = [i.step for i in ckpt.list_checkpoints()]
    assert 4 in steps and 3 not in steps       # 4: newest and best; 3: neither


def test_huge_integer_metric_is_refused_when_saved_or_reported(tmp_path):
    with ac.AsyncCheckpointer(tmp_path / "ck", [ac.StateComponent("b", Box(b_state(1)), G)]) as ckpt:
        with pytest.raises(InvalidArgumentError, match="too large"):
            ckpt.save(1, metrics={"loss": 10 ** 400})
        ckpt.save(1).wait()
        with pytest.raises(InvalidArgumentError, match="too large"):
            ckpt.report_metrics(1, {"loss": 10 ** 400})
        with pytest.raises(InvalidArgumentError, match="reserved"):
            ckpt.report_metrics(1, {METRICS_HASH_KEY: 1.0})


def test_bf16_tensor_marked_as_numpy(guarded):
    def change(doc):
        s = shard(doc)
        index = next(i for i, t in enumerate(s["tensors"]) if t["dtype"] == "bfloat16")
        s["tree"] = {"d": [["half", {"t": index, "np": 1}]]}
    edit_manifest(guarded.saved, change)
    guarded.freeze()
    load_refused(guarded.saved, match="NumPy")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.complex32])
def test_tree_refuses_numpy_marks_on_dtypes_numpy_lacks(dtype):
    with pytest.raises(CorruptCheckpointError, match="NumPy"):
        unflatten({"t": 0, "np": 1}, [torch.zeros(2, dtype=dtype)], "here")
    assert unflatten({"t": 0, "np": 1}, [torch.zeros(2)], "here").dtype.name == "float32"


def test_tree_nested_too_deeply_is_corrupt():
    deep: dict = {"d": []}
    for _ in range(5000):
        deep = {"d": [], "m": deep}
    with pytest.raises(CorruptCheckpointError, match="deeply"):
        unflatten(deep, [], "here")


@pytest.mark.parametrize("shape", [[2 ** 70, 0], [2 ** 40, 2 ** 40, 0], [0, 2 ** 62, 4]],
                         ids=["2^70", "2^80-in-two", "2^64-bytes"])
def test_empty_tensor_with_impossible_shape(guarded, shape):
    empty = xxhash.xxh3_128_hexdigest(b"")
    edit_manifest(guarded.saved, lambda d: shard(d)["tensors"][0].update(
        dtype="float32", shape=shape, nbytes=0, length=0, offset=0, hash=empty))
    guarded.freeze()
    load_refused(guarded.saved, match="larger than any tensor")


def _add_file(saved: Saved, name: str, size: int, content: bytes = b"", tensor: dict | None = None):
    """A new data file `name` (sparse beyond `content`) and tensor 0 of "b" pointing into it."""
    path = saved.folder(2) / name
    with open(path, "wb") as f:
        f.write(content)
        f.truncate(size)

    def change(doc):
        doc["files"][name] = {"size": size, "hash": "0" * 32}
        shard(doc)["tensors"][0] = {"file": name, "offset": 0, **(tensor or {})}
    edit_manifest(saved, change)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_raw_record_in_a_sparse_terabyte_file_is_refused_before_allocation(guarded):
    saved = guarded.saved
    tib = 1 << 40
    try:
        _add_file(saved, "data-sparse.bin", tib, tensor={
            "dtype": "uint8", "shape": [tib], "length": tib, "nbytes": tib, "codec": "raw",
            "hash": "0" * 32})
    except OSError as exc:
        pytest.skip(f"this filesystem cannot hold a sparse 1 TiB file: {exc}")
    guarded.freeze()
    before = _peak_rss()
    load_refused(saved, error=CheckpointError, match="more than the .* bytes of memory")
    assert _peak_rss() - before < 64 << 20


def test_zstd_record_claiming_a_terabyte_in_one_byte_frames_is_refused(guarded):
    saved = guarded.saved
    tib, pieces = 1 << 40, (1 << 40) // PIECE
    assert pieces == 65536
    content = os.urandom(pieces)       # the record's hash matches: only the frame bound can refuse it
    _add_file(saved, "data-z.bin", len(content), content, tensor={
        "dtype": "uint8", "shape": [tib], "length": len(content), "nbytes": tib, "codec": "zstd",
        "frames": [1] * pieces, "hash": xxhash.xxh3_128_hexdigest(content)})
    guarded.freeze()
    before = _peak_rss()
    load_refused(saved, match="cannot hold")
    assert _peak_rss() - before < 64 << 20


def test_zstd_frames_long_enough_but_lying_are_refused_before_allocation(guarded):
    """Frames of the minimum plausible length pass the manifest's bound; their headers, checked
    before the output is allocated, do not declare the pieces' sizes."""
    saved = guarded.saved
    pieces = 64                                   # 1 GiB claimed in 64 frames of ~2 KiB
    frame = min_frame_size(PIECE)
    content = os.urandom(frame * pieces)
    _add_file(saved, "data-z.bin", len(content), content, tensor={
        "dtype": "uint8", "shape": [pieces * PIECE], "length": len(content), "nbytes": pieces * PIECE,
        "codec": "zstd", "frames": [frame] * pieces, "hash": xxhash.xxh3_128_hexdigest(content)})
    guarded.freeze()
    before = _peak_rss()
    load_refused(saved, match="does not declare")
    assert _peak_rss() - before < 64 << 20
