"""format_version 3: per-node manifest fragments, on the checked-in fixture (2 gloo ranks as 2
nodes, tests/fixtures/fragments_v3, support/fragment_state.py) and hostile edits of it.

What is checked: the root keeps only O(tensors) records and the fragments' references; a loader
reads only the fragments holding its copies (none for GLOBAL/REPLICATED state, all of a component
it reshards); every fixture record loads bit-exactly in one process; and every way a fragment can
disagree with its root (missing, damaged, replaced, another node's or step's, holding other copies
or chunks, pointing at another node's file) is CorruptCheckpointError before any load_state_dict.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import async_ckpt as ac
from async_ckpt.format import seal
from async_ckpt.format.fragments import FRAGMENT_KEY, digest
from async_ckpt.format.manifest import FRAGMENT_VERSION, HASH_KEY
from async_ckpt.format.names import read_manifest, step_dir
from async_ckpt.load.reader import load_shard
from async_ckpt.storage.local import LocalStorage
from support import fragment_state, sharded_state
from support.compare import assert_same
from support.fixture_state import expected_state
from support.stateful import Holder

FIXTURE = Path(__file__).parent / "fixtures" / f"fragments_v{FRAGMENT_VERSION}"


def root_doc(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def targets(with_opt: bool = False) -> tuple[list, dict[str, Any]]:
    model, extra = sharded_state.plain_targets()
    held = {"model": model, "extra": extra, "config": Holder({"lr": 0.0}), "shared": Holder({}),
            "opt": Holder({})}
    comps = fragment_state.components(model, extra, held["opt"], held["config"], held["shared"])
    return [c for c in comps if with_opt or c.key != "opt"], held


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The names of the JSON documents (manifests, fragments) read through local storage."""
    seen: list[str] = []
    real = LocalStorage.read_limited

    def spy(self, path: str, limit: int) -> bytes:
        seen.append(os.path.basename(path))
        return real(self, path, limit)
    monkeypatch.setattr(LocalStorage, "read_limited", spy)
    return seen


def test_the_fixture_is_a_root_and_one_fragment_per_node():
    for step in (1, 2):
        folder = FIXTURE / step_dir(step)
        doc = root_doc(folder)
        assert doc["format_version"] == FRAGMENT_VERSION and doc["topology"]["num_nodes"] == 2
        refs = doc["fragments"]
        assert sorted(r["node"] for r in refs.values()) == [0, 1]
        assert {n: r["copies"] for n, r in refs.items()} == {
            n: {"opt": {f"rank{r['node']}": []}} for n, r in refs.items()}
        assert all(r["chunks"] == ["extra", "model"] for r in refs.values())
        # the root: GLOBAL/REPLICATED records, chunked components without a single chunk
        comps = doc["components"]
        assert comps["opt"]["shards"] == {} and comps["config"]["shards"] and comps["shared"]["shards"]
        assert all(t["chunks"] == [] for k in ("model", "extra") for t in comps[k]["sharded"]["tensors"])
        assert {f["node"] for f in doc["files"].values()} == {0, 1}


@pytest.mark.parametrize("step", [1, 2], ids=["raw", "zstd"])
def test_the_fixture_loads_bit_exactly_in_one_process(step, reads):
    comps, held = targets()
    info = ac.AsyncCheckpointer(str(FIXTURE), comps).load(step)
    assert info is not None and info.step == step and info.metrics == {"loss": 0.5 * step}
    want = sharded_state.expected()
    assert_same(dict(held["model"].state_dict()), want["model"])
    assert_same(held["extra"].state, want["extra"])
    assert_same(held["config"].state, fragment_state.global_state())
    assert_same(held["shared"].state, expected_state())
    # resharding the chunked components needs every fragment holding their chunks
    listed = root_doc(FIXTURE / step_dir(step))["fragments"]
    assert sorted(n for n in reads if n.startswith("fragment-")) == sorted(listed)


@pytest.mark.parametrize("step", [1, 2], ids=["raw", "zstd"])
def test_each_ranks_copy_is_in_its_nodes_fragment(step):
    storage = LocalStorage(str(FIXTURE))
    manifest = read_manifest(storage, step_dir(step), step)
    for rank in range(2):
        got = load_shard(storage, step_dir(step), manifest, "opt", f"rank{rank}", False, True, None)
        assert_same(got, fragment_state.per_rank(rank))


def test_a_load_of_root_state_reads_no_fragment_and_listing_reads_roots_only(reads):
    config, shared = Holder({}), Holder({})
    ckpt = ac.AsyncCheckpointer(str(FIXTURE), [
        ac.StateComponent("config", config, ac.SharingPattern.GLOBAL),
        ac.StateComponent("shared", shared, ac.SharingPattern.REPLICATED)])
    assert ckpt.load().step == 2
    assert_same(config.state, fragment_state.global_state())
    assert not [n for n in reads if n.startswith("fragment-")]
    assert [i.step for i in ckpt.list_checkpoints()] == [1, 2] and ckpt.latest_step() == 2
    assert not [n for n in reads if n.startswith("fragment-")]


def test_a_per_rank_copy_at_another_world_size_is_refused_and_skipped_when_optional():
    comps, held = targets(with_opt=True)
    with pytest.raises(ac.CheckpointError, match="opt"):
        ac.AsyncCheckpointer(str(FIXTURE), comps).load(2)
    assert held["opt"].loads == 0 and held["config"].loads == 0


# -- hostile fragments -------------------------------------------------------------------------
def _write_sealed(path: Path, doc: dict, key: str) -> bytes:
    raw = seal.seal(json.dumps(doc, separators=(",", ":")).encode(), key)
    path.write_bytes(raw)
    return raw


def _unsealed(path: Path, key: str) -> dict:
    doc = json.loads(path.read_bytes())
    doc.pop(key, None)
    return doc


def _relist(folder: Path, name: str, raw: bytes, edit_root: Callable[[dict], None] | None = None) -> None:
    """Make the root list fragment `name` with `raw`'s size and hash (what an editor who knows the
    format would do: the root's checks, not the hash, must catch the edit)."""
    doc = _unsealed(folder / "manifest.json", HASH_KEY)
    doc["fragments"][name].update(size=len(raw), hash=digest(raw))
    if edit_root is not None:
        edit_root(doc)
    _write_sealed(folder / "manifest.json", doc, HASH_KEY)


def _fragment(folder: Path, node: int) -> Path:
    return next(folder.glob(f"fragment-n{node:05d}-*.json"))


def _edit_fragment(folder: Path, node: int, edit: Callable[[dict], None]) -> None:
    path = _fragment(folder, node)
    doc = _unsealed(path, FRAGMENT_KEY)
    edit(doc)
    _relist(folder, path.name, _write_sealed(path, doc, FRAGMENT_KEY))


def _other_nodes_file(folder: Path) -> Callable[[dict], None]:
    node0 = next(n for n, f in root_doc(folder)["files"].items() if f["node"] == 0)

    def edit(doc: dict) -> None:
        doc["copies"]["opt"]["rank1"]["tensors"][0]["file"] = node0
    return edit


def _swap_in_step1(folder: Path) -> None:
    """Step 1's fragment of node 1 under step 2's name, the root relisting it."""
    target = _fragment(folder, 1)
    raw = _fragment(folder.parent / step_dir(1), 1).read_bytes()
    target.write_bytes(raw)
    _relist(folder, target.name, raw)


def _drop_chunk(doc: dict) -> None:
    doc["chunks"]["model"].pop()


def _extra_copy(doc: dict) -> None:
    doc["copies"]["opt"]["rank7"] = doc["copies"]["opt"]["rank1"]


def _bad_tree(doc: dict) -> None:
    doc["copies"]["opt"]["rank1"]["tree"] = 5


def _unknown_path(doc: dict) -> None:
    doc["chunks"]["model"][0]["path"] = ["no.such.weight"]


def _listed_twice(doc: dict) -> None:
    frags = list(doc["fragments"].values())
    frags[0]["copies"]["opt"]["rank1"] = []


def _wrong_node(doc: dict) -> None:
    name = next(n for n, r in doc["fragments"].items() if r["node"] == 1)
    doc["fragments"][name]["node"] = 0


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (lambda f: _fragment(f, 1).unlink(), "is missing"),
    "flipped-byte": (lambda f: _fragment(f, 1).write_bytes(
        _fragment(f, 1).read_bytes().replace(b'"rank1"', b'"rank2"', 1)), "damaged or replaced"),
    "truncated": (lambda f: _fragment(f, 1).write_bytes(_fragment(f, 1).read_bytes()[:-9]),
                  "damaged or replaced"),
    "another-step": (_swap_in_step1, "of step 1"),
    "other-nodes-file": (lambda f: _edit_fragment(f, 1, _other_nodes_file(f)), "which node 0 wrote"),
    "missing-chunk": (lambda f: _edit_fragment(f, 1, _drop_chunk), "chunks cover"),
    "unlisted-copy": (lambda f: _edit_fragment(f, 1, _extra_copy), "not the ones the manifest lists"),
    "bad-tree-index": (lambda f: _edit_fragment(f, 1, _bad_tree), "indexes no tree"),
    "unknown-path": (lambda f: _edit_fragment(f, 1, _unknown_path), "names no tensor"),
    "copy-listed-twice": (lambda f: _relist_root(f, _listed_twice), "listed by both"),
    "named-for-another-node": (lambda f: _relist_root(f, _wrong_node), "another node"),
}


def _relist_root(folder: Path, edit: Callable[[dict], None]) -> None:
    doc = _unsealed(folder / "manifest.json", HASH_KEY)
    edit(doc)
    _write_sealed(folder / "manifest.json", doc, HASH_KEY)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_fragment_that_disagrees_with_its_root_fails_the_load_before_any_restore(tmp_path, case):
    root = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, root)
    edit, message = HOSTILE[case]
    edit(root / step_dir(2))
    comps, held = targets()
    with pytest.raises(ac.CorruptCheckpointError, match=message):
        ac.AsyncCheckpointer(str(root), comps).load(2)
    assert all(getattr(h, "loads", 0) == 0 for h in held.values() if not isinstance(h, torch.nn.Module))
    assert torch.count_nonzero(held["model"][0].weight) == 0        # nothing was restored
    # the tools merge every fragment and say the same; the untouched step still loads
    with pytest.raises(ac.CorruptCheckpointError, match=message):
        read_manifest(LocalStorage(str(root)), step_dir(2), 2)
    comps, held = targets()
    assert ac.AsyncCheckpointer(str(root), comps).load(1).step == 1


def test_retention_and_gc_keep_fragments_and_remove_unlisted_ones(tmp_path):
    from async_ckpt.cli.cleanup import plan
    root = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, root)
    stray = root / step_dir(2) / "fragment-n00001-00000000.json"
    stray.write_bytes(_fragment(root / step_dir(2), 1).read_bytes())
    actions, _ = plan(LocalStorage(str(root)))
    assert [a["path"] for a in actions if a["kind"] == "file"] == [f"{step_dir(2)}/{stray.name}"]
