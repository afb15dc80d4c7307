"""Corruption and hostile input in data files, file names and late metrics: every damaged or malicious checkpoint fails to load with a
CheckpointError (mostly CorruptCheckpointError), never loads silently, never runs code, and leaves
every registered component untouched (load verifies everything before any load_state_dict).

Each test saves real checkpoints (steps 1 and 2, components "a" = nn.Linear and "b" = a dict with
several tensors and JSON leaves), damages step 2 on disk, then loads it with a fresh checkpointer
whose components hold sentinel state.
"""
from __future__ import annotations

import base64
import os
import shutil

import pytest

from support.corruption import (AT_T0, Saved, edit_manifest, file0, flip_bit, fresh, live_payload, load_fails, load_ok, save_steps, set_field, shard, tensor0)

# -- control ----------------------------------------------------------------------------------
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_intact_checkpoints_load_exactly(tmp_path, compression):
    saved = save_steps(tmp_path / "ckpts", compression)
    load_ok(saved, 1)
    load_ok(saved, 2)
    ckpt, _, _ = fresh(saved.root)
    assert ckpt.latest_step() == 2
    assert [i.step for i in ckpt.list_checkpoints()] == [1, 2]


# -- damaged data files -----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["b-first-byte", "b-middle", "b-last-byte", "a-middle"])
def test_flipped_bit_in_data_file(saved, where):
    key, pick = where.split("-", 1)
    tensors = saved.tensors(key)
    entry = tensors[0] if pick == "first-byte" else tensors[-1]
    offset = {"first-byte": entry["offset"], "middle": entry["offset"] + entry["length"] // 2,
              "last-byte": entry["offset"] + entry["length"] - 1}[pick]
    flip_bit(saved.data(), offset)
    err = load_fails(saved)
    assert saved.data().name in str(err) and "hash" in str(err)
    load_ok(saved, 1)


@pytest.mark.parametrize("how", ["minus-one-byte", "half", "empty", "appended-byte",
                                 "truncated-and-manifest-size-edited"])
def test_truncated_or_resized_data_file(saved, how):
    data = saved.data()
    size = data.stat().st_size
    if how == "appended-byte":
        with open(data, "ab") as f:
            f.write(b"\0")
    else:
        new = {"minus-one-byte": size - 1, "half": size // 2, "empty": 0,
               "truncated-and-manifest-size-edited": size - 64}[how]
        os.truncate(data, new)
        if how == "truncated-and-manifest-size-edited":
            edit_manifest(saved, lambda d: file0(d).update(size=new))
    err = load_fails(saved)
    assert data.name in str(err)
    load_ok(saved, 1)


def test_deleted_data_file(saved):
    name = saved.data().name
    saved.data().unlink()
    err = load_fails(saved)
    assert name in str(err)


@pytest.mark.parametrize("padded", [False, True], ids=["bare", "padded-to-size"])
def test_data_file_replaced_by_pickle_payload(saved, tmp_path, padded):
    marker = tmp_path / "PWNED-data"
    payload = live_payload(tmp_path, marker)
    data = saved.data()
    size = data.stat().st_size
    data.write_bytes(payload + (b"\0" * (size - len(payload)) if padded else b""))
    err = load_fails(saved)
    assert data.name in str(err)
    for options in ({}, {"allow_pickle": True}):   # not even the pickle opt-in unpickles data files
        load_fails(saved, **options)
    assert not marker.exists(), "loading a data file ran pickled code"


def test_zstd_checkpoint_with_flipped_bit(saved_zstd):
    entry = saved_zstd.tensors("b")[0]
    assert entry["codec"] == "zstd-planes4"   # float32: per-plane
    flip_bit(saved_zstd.data(), entry["offset"] + entry["length"] // 2)
    err = load_fails(saved_zstd)
    assert saved_zstd.data().name in str(err)
    load_ok(saved_zstd, 1)


@pytest.mark.parametrize("how", ["frames-shifted", "raw-plane-called-a-frame", "shape-shrunk",
                                 "shape-grown", "shape-huge", "codec-raw", "frames-missing",
                                 "codec-shuffle"])
def test_zstd_manifest_tampering(saved_zstd, how):
    """Hashes still match the stored bytes, so decompression itself must catch the lie."""
    def change(doc):
        t = tensor0(doc)
        assert t["codec"] == "zstd-planes4" and t["dtype"] == "float32"
        f = t["frames"]
        assert len(f) == 4 and f[0] > 8
        # arange * 0.25, stored from plane 3 down: planes 3, 1 and 0 are frames, plane 2
        # (mantissa noise) is raw.
        assert f[1] == t["nbytes"] // 4 and max(f[0], f[2], f[3]) < f[1]
        if how == "frames-shifted":            # 7 bytes of plane 3's frame move to plane 1's
            t["frames"] = [f[0] - 7, f[1], f[2] + 7, f[3]]
        elif how == "raw-plane-called-a-frame":
            t["frames"] = [f[0] + 1, f[1] - 1, f[2], f[3]]
        elif how == "shape-shrunk":       # frame decodes to more bytes than the tensor holds
            t["shape"], t["nbytes"] = [t["shape"][0] - 16], t["nbytes"] - 64
        elif how == "shape-grown":        # frame decodes to fewer bytes than the tensor holds
            t["shape"], t["nbytes"] = [t["shape"][0] + 16], t["nbytes"] + 64
        elif how == "shape-huge":         # 4 TiB claimed for one 16 KiB frame: refuse, don't allocate
            t["shape"], t["nbytes"] = [2 ** 40], 2 ** 42
        elif how == "codec-raw":
            t["codec"] = "raw"
        elif how == "codec-shuffle":      # the planes read as one grouped frame
            t["codec"], t["frames"] = "zstd-shuffle4", [sum(f)]
        else:
            del t["frames"]
    edit_manifest(saved_zstd, change)
    load_fails(saved_zstd)


# -- data file names and locations ------------------------------------------------------------
def _rename_data(saved: Saved, new_name: str) -> None:
    def change(doc):
        (old,) = doc["files"]
        doc["files"] = {new_name: doc["files"][old]}
        for comp in doc["components"].values():
            for t in comp["shards"]["global"]["tensors"]:
                t["file"] = new_name
    edit_manifest(saved, change)


@pytest.mark.parametrize("kind", ["parent", "absolute", "subfolder", "dotdot", "dot", "empty",
                                  "nul"])
def test_data_file_name_escaping_the_folder(saved, tmp_path, kind):
    """A valid copy of the data waits where each hostile name points: only the name check can
    stop the load."""
    original = saved.data()
    outside_abs = tmp_path / "outside-abs.bin"
    names = {
        "parent": ("../x.bin", saved.root / "x.bin"),
        "absolute": (str(outside_abs), outside_abs),
        "subfolder": ("sub/x.bin", saved.folder(2) / "sub" / "x.bin"),
        "dotdot": ("..", None),
        "dot": (".", None),
        "empty": ("", None),
        "nul": ("x.bin\0", None),
    }
    name, place = names[kind]
    if place is not None:
        place.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original, place)
    _rename_data(saved, name)
    err = load_fails(saved)
    assert str(saved.manifest(2)) in str(err)


def test_tensor_file_escaping_while_file_list_is_clean(saved):
    shutil.copyfile(saved.data(), saved.root / "x.bin")
    edit_manifest(saved, set_field(AT_T0, "file", "../x.bin"))
    load_fails(saved)


@pytest.mark.parametrize("target", ["outside-root", "sibling-step", "relative-dotdot"])
def test_data_file_symlink_pointing_outside_the_folder(saved, tmp_path, target):
    data = saved.data()
    if target == "sibling-step":
        # the bytes moved into step 1's folder: inside the root, but outside step 2's folder
        dest = saved.folder(1) / data.name
        shutil.copyfile(data, dest)
        data.unlink()
        data.symlink_to(dest)
    else:
        dest = tmp_path / "elsewhere" / "stolen.bin"
        dest.parent.mkdir()
        shutil.move(data, dest)   # identical bytes: only the symlink check can refuse it
        data.symlink_to(dest if target == "outside-root" else os.path.relpath(dest, data.parent))
    assert data.is_symlink() and data.stat().st_size == dest.stat().st_size
    err = load_fails(saved)
    assert data.name in str(err)
    # the refusal is about the link, not the bytes: the same bytes in place load fine
    data.unlink()
    shutil.copyfile(dest, data)
    load_ok(saved, 2)


# -- pickle in the skeleton -------------------------------------------------------------------
@pytest.mark.parametrize("where", ["root", "nested", "ordered-dict-metadata"])
def test_pickle_tree_node_is_refused_without_opt_in(saved, tmp_path, where):
    marker = tmp_path / "PWNED-tree"
    node = {"p": base64.b64encode(live_payload(tmp_path, marker)).decode("ascii")}

    def change(doc):
        s = shard(doc)
        if where == "root":
            s["tree"] = node
        elif where == "nested":
            items = s["tree"]["d"]
            key_meta = next(i for i, (k, _) in enumerate(items) if k == "meta")
            items[key_meta][1] = {"l": [1, node]}
        else:
            s["tree"] = {"d": [], "o": 1, "m": node}
    edit_manifest(saved, change)
    err = load_fails(saved)
    assert "pickle" in str(err)
    assert not marker.exists(), "a pickled tree node was unpickled without allow_pickle"
    ckpt, _, _ = fresh(saved.root)
    assert [i.step for i in ckpt.list_checkpoints()] == [1, 2]   # listing never unpickles
    assert not marker.exists()
    # Control: with the explicit opt-in the same manifest does unpickle, so the gate is what
    # protected us above (and the payload is live inside the library too).
    ckpt, a, b = fresh(saved.root, allow_pickle=True)
    ckpt.load(step=2)
    assert marker.exists()


# -- records that do not fit ------------------------------------------------------------------
@pytest.mark.parametrize("how", ["shape-only", "nbytes-only", "dtype-wider", "consistent-shrink",
                                 "consistent-grow"])
def test_tensor_shape_and_nbytes_disagree(saved, how):
    def change(doc):
        t = tensor0(doc)
        assert t["dtype"] == "float32" and t["shape"] == [4096] and t["codec"] == "raw"
        if how == "shape-only":
            t["shape"] = [4095]
        elif how == "nbytes-only":
            t["nbytes"] = t["nbytes"] - 4
        elif how == "dtype-wider":
            t["dtype"] = "float64"
        elif how == "consistent-shrink":   # self-consistent entry, but not what was hashed
            t["shape"], t["nbytes"], t["length"] = [4095], 16380, 16380
        else:
            t["shape"], t["nbytes"], t["length"] = [4112], 16448, 16448
    edit_manifest(saved, change)
    load_fails(saved)


@pytest.mark.parametrize("how", ["at-file-end", "huge", "last-record-shifted", "other-record",
                                 "manifest-size-lies"])
def test_tensor_offset_past_file_end(saved, how):
    size = saved.data().stat().st_size

    def change(doc):
        tensors = shard(doc)["tensors"]
        t = tensors[0]
        if how == "at-file-end":
            t["offset"] = size
        elif how == "huge":
            t["offset"] = 2 ** 62
        elif how == "last-record-shifted":
            last = max((x for c in doc["components"].values() for x in c["shards"]["global"]["tensors"]),
                       key=lambda x: x["offset"])
            last["offset"] = size - last["length"] + 64
        elif how == "other-record":        # inside the file, but someone else's bytes
            t["offset"] = shard(doc, "a")["tensors"][0]["offset"]
        else:                              # manifest claims a bigger file than exists
            file0(doc)["size"] = size + 4096
            t["offset"] = size
    edit_manifest(saved, change)
    load_fails(saved)


# -- late metrics files are data too ----------------------------------------------------------
@pytest.mark.parametrize("content", [b"\xff\x00garbage", b"[1, 2]", b"[" * 200_000, b'{"loss": "x"}'],
                         ids=["garbage", "list", "deeply-nested", "non-numeric"])
def test_hostile_late_metrics_file_is_ignored(saved, content):
    (saved.folder(2) / "metrics-00000000000000000001-deadbeef.json").write_bytes(content)
    ckpt, _, _ = fresh(saved.root)
    infos = ckpt.list_checkpoints()
    assert [i.step for i in infos] == [1, 2]
    assert infos[1].metrics == {}
    load_ok(saved, 2)
