"""Hostile checkpoint folders, continued (tests/test_hostile_folders.py has the rest): the seals
of the manifest and of late metrics files (a flipped bit anywhere is refused or harmless, damage
to the seal itself is refused, reads are bounded, the checked-in sealed fixture loads), and the
net that lets only CheckpointErrors leave the readers."""
from __future__ import annotations

import json

import pytest
import xxhash
from support.compare import assert_same
from support.corruption import (
    assert_untouched,
    b_state,
    edit_manifest,
    fresh,
    load_ok,
    resealed,
    save_steps,
)
from support.fixture_state import expected_state
from support.hostile import FIXTURE, LATE, G, listed, load_refused, step2_skipped, write_metrics
from support.stateful import Box, Holder

import async_ckpt as ac
from async_ckpt import CheckpointError, CorruptCheckpointError
from async_ckpt.format import names as names_module
from async_ckpt.format import seal
from async_ckpt.format.manifest import HASH_KEY, parse_manifest
from async_ckpt.format.metrics_file import HASH_KEY as METRICS_HASH_KEY
from async_ckpt.load import restore as restore_module


# -- the manifest's seal --------------------------------------------------------------------------
def test_flipped_bit_in_a_json_leaf_is_caught_by_the_seal(guarded):
    """'step': 2 in component b's state becomes 0 with one flipped bit: valid JSON, a valid
    manifest, a different state. Only the seal can tell."""
    saved = guarded.saved
    raw = saved.manifest(2).read_bytes()
    at = raw.index(b'["step",2]') + len(b'["step",')
    saved.manifest(2).write_bytes(raw[:at] + bytes([raw[at] ^ 0b10]) + raw[at + 1:])
    assert json.loads(saved.manifest(2).read_bytes())["components"]["b"]     # still valid JSON
    guarded.freeze()
    err = load_refused(saved, match="manifest_hash does not match")
    assert str(saved.manifest(2)) in str(err)


@pytest.mark.parametrize("how", ["hash-digit", "hash-not-hex", "key-renamed", "seal-moved", "seal-removed"])
def test_damage_to_the_seal_itself(guarded, how):
    saved = guarded.saved
    raw = saved.manifest(2).read_bytes()
    doc = json.loads(raw)
    digest = doc[HASH_KEY]
    if how == "hash-digit":
        raw = raw.replace(digest.encode(), (digest[:-1] + ("0" if digest[-1] != "0" else "1")).encode())
    elif how == "hash-not-hex":
        raw = raw.replace(digest.encode(), (digest[:-1] + "g").encode())
    elif how == "key-renamed":     # one flipped bit in the key: the body is intact, and loads
        raw = raw.replace(b'"manifest_hash"', b'"manifest_hasi"')
    elif how == "seal-moved":
        raw = json.dumps({HASH_KEY: digest, **{k: v for k, v in doc.items() if k != HASH_KEY}}).encode()
    else:                          # a manifest as written before sealing: loads
        raw = json.dumps({k: v for k, v in doc.items() if k != HASH_KEY}, separators=(",", ":")).encode()
    saved.manifest(2).write_bytes(raw)
    guarded.freeze()
    if how in ("key-renamed", "seal-removed"):
        load_ok(saved, 2)
    else:
        load_refused(saved, match=HASH_KEY)


def test_the_seal_is_the_last_member_and_covers_everything_before_it(saved):
    raw = saved.manifest(2).read_bytes()
    assert raw.endswith(b'"}') and raw.rindex(f',"{HASH_KEY}":"xxh3-128:'.encode()) == len(raw) - 61
    body = raw[:raw.rindex(b',"' + HASH_KEY.encode())] + b"}"
    assert json.loads(raw)[HASH_KEY] == "xxh3-128:" + xxhash.xxh3_128_hexdigest(body)
    assert seal.seal(body, HASH_KEY) == raw
    assert seal.seal(b"{}", "k") == b'{"k":"xxh3-128:' + xxhash.xxh3_128_hexdigest(b"{}").encode() + b'"}'
    assert seal.loads(seal.seal(b"{}", "k"), "k", "x") == ({}, True)
    parse_manifest(raw, "x", 2)


def test_manifest_and_metrics_reads_are_bounded(saved, monkeypatch, caplog):
    from async_ckpt.format import manifest as manifest_module
    from async_ckpt.format import metrics_file
    write_metrics(saved.folder(2), {"acc": 0.5})
    edit_manifest(saved, lambda d: d["versions"].update(pad="x" * 200))     # larger than step 1's
    size = len(saved.manifest(2).read_bytes())
    monkeypatch.setattr(manifest_module, "MAX_BYTES", size - 1)
    monkeypatch.setattr(names_module, "MAX_BYTES", size - 1)
    monkeypatch.setattr(metrics_file, "MAX_BYTES", 10)
    load_refused(saved, match="more than")
    step2_skipped(saved, caplog, "more than")
    with pytest.raises(CorruptCheckpointError, match="more than"):
        parse_manifest(saved.manifest(2).read_bytes(), "x")
    monkeypatch.setattr(manifest_module, "MAX_BYTES", size)
    monkeypatch.setattr(names_module, "MAX_BYTES", size)
    infos, warnings = listed(saved, caplog)
    assert infos[1].metrics == {} and any(LATE in w and "more than" in w for w in warnings), warnings


def test_late_metrics_are_sealed_and_checked(saved, caplog):
    with ac.AsyncCheckpointer(saved.root, [ac.StateComponent("b", Box(b_state(2)), G)]) as ckpt:
        ckpt.report_metrics(2, {"acc": 0.75})
    (late,) = saved.folder(2).glob("metrics-*.json")
    raw = late.read_bytes()
    assert seal.loads(raw, METRICS_HASH_KEY, "x") == ({"acc": 0.75}, True)
    assert listed(saved, caplog)[0][1].metrics == {"acc": 0.75}
    late.write_bytes(raw.replace(b"0.75", b"0.25"))           # a bit flip changed a value
    infos, warnings = listed(saved, caplog)
    assert infos[1].metrics == {} and any(METRICS_HASH_KEY in w for w in warnings), warnings
    write_metrics(saved.folder(2), {"acc": 0.5}, sealed=False)   # as written before sealing
    assert listed(saved, caplog)[0][1].metrics == {"acc": 0.5}


def test_checked_in_sealed_fixture_loads_bit_exact():
    holder = Holder()
    ckpt = ac.AsyncCheckpointer(FIXTURE, [ac.StateComponent("state", holder, G)])
    info = ckpt.load(1)
    assert info.step == 1 and info.metrics == {"loss": 0.5, "val": 0.25}
    assert_same(holder.state, expected_state())
    raw = (FIXTURE / "step-0000000001" / "manifest.json").read_bytes()
    assert seal.loads(raw, HASH_KEY, "fixture")[1], "the fixture's manifest is not sealed"
    (late,) = (FIXTURE / "step-0000000001").glob("metrics-*.json")
    assert seal.loads(late.read_bytes(), METRICS_HASH_KEY, "fixture")[1]


def test_every_single_bit_flip_of_the_manifest_is_exact_or_refused(tmp_path):
    """A sample of single-bit flips over the whole manifest: each one loads exactly the saved
    state (a flip in the seal's key leaves an intact, unsealed manifest) or raises a
    CorruptCheckpointError; never anything else."""
    saved = save_steps(tmp_path / "ckpts")
    raw = saved.manifest(2).read_bytes()
    outcomes = {"exact": 0, "refused": 0}
    for i in range(3, len(raw) * 8, max(1, len(raw) * 8 // 150)):
        saved.manifest(2).write_bytes(raw[:i // 8] + bytes([raw[i // 8] ^ (1 << (i % 8))]) + raw[i // 8 + 1:])
        ckpt, a, b = fresh(saved.root)
        try:
            ckpt.load(step=2)
        except CorruptCheckpointError:
            assert_untouched(a, b)
            outcomes["refused"] += 1
            continue
        assert_same(b.loaded, b_state(2))
        outcomes["exact"] += 1
    assert outcomes["refused"] >= 0.9 * sum(outcomes.values()), outcomes


# -- only CheckpointErrors leave the readers --------------------------------------------------------
def test_an_unreadable_root_raises_a_checkpoint_error(saved, monkeypatch):
    ckpt, a, b = fresh(saved.root)

    def denied(self, path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(type(ckpt.storage), "list_dir", denied)
    for call in (ckpt.latest_step, ckpt.list_checkpoints, ckpt.load):
        with pytest.raises(CheckpointError, match="Permission denied") as info:
            call()
        assert isinstance(info.value.__cause__, PermissionError)
    assert_untouched(a, b)


def test_the_net_names_an_unexpected_error_as_a_bug(saved, monkeypatch):
    """The readers raise precise errors; what slips through is still a CheckpointError, marked
    as unexpected (the fuzzer fails on those)."""
    ckpt, a, b = fresh(saved.root)
    monkeypatch.setattr(restore_module, "info_of", lambda *args: {}["boom"])
    with pytest.raises(CheckpointError, match="unexpected KeyError") as info:
        ckpt.load(2)
    assert isinstance(info.value.__cause__, KeyError)
    assert_untouched(a, b)


def test_resealed_helper_matches_the_writer(saved):
    raw = saved.manifest(2).read_bytes()
    assert resealed(json.loads(raw)) == raw
