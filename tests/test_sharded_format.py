"""Hostile chunk records (format_version 2, SHARDED components): every malformed or inconsistent
`sharded` entry makes load() raise CorruptCheckpointError naming the component (and the tensor)
before any load_state_dict runs, and list_checkpoints() skips that step and still lists the other.

Each test copies the checked-in fixture tests/fixtures/sharded_v2/ (2 ranks' DTensor chunks, step
1 raw, step 2 zstd), edits step 1's manifest and seals it again (support/corruption.py: what a
hostile editor would do, so the edit reaches the validator), then loads it into plain components
holding zeros. Multi-chunk tensors come from the fixture; `split` makes more by cutting a raw
record in two at a byte boundary, with each half's hash (support/sharded_edits.py).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import async_ckpt as ac
from async_ckpt import CorruptCheckpointError
from support import sharded_state
from support.compare import assert_same
from support.corruption import Saved, edit_manifest, flip_bit, pop_field, set_field
from support.sharded_edits import chunk, entry, split, tensor

FIXTURE = Path(__file__).parent / "fixtures" / "sharded_v2"


@pytest.fixture
def saved(tmp_path) -> Saved:
    shutil.copytree(FIXTURE, tmp_path / "ckpts")
    return Saved(tmp_path / "ckpts", None)


W0 = lambda d: tensor(d, "0.weight")           # noqa: E731  [5, 6], chunks rows 0:3 and 3:5
C1 = chunk                                      # its second chunk


def load_fails(saved: Saved, step: int = 1, error: type = CorruptCheckpointError) -> Exception:
    model, extra = sharded_state.plain_targets()
    ckpt = ac.AsyncCheckpointer(saved.root, sharded_state.components(model, extra))
    with pytest.raises(error) as info:
        ckpt.load(step)
    assert extra.loads == 0 and not any(p.any() for p in model.parameters()), \
        "a component was changed although the checkpoint was refused"
    return info.value


def load_exact(saved: Saved, step: int) -> None:
    model, extra = sharded_state.plain_targets()
    ckpt = ac.AsyncCheckpointer(saved.root, sharded_state.components(model, extra))
    assert ckpt.load(step).step == step
    want = sharded_state.expected()
    assert_same(dict(model.state_dict()), want["model"])
    assert_same(extra.state, want["extra"])


def check_refused(saved: Saved, names: tuple[str, ...], caplog) -> None:
    err = load_fails(saved)
    for name in (str(saved.manifest(1)),) + names:
        assert name in str(err), f"the error does not name {name!r}: {err}"
    model, extra = sharded_state.plain_targets()
    ckpt = ac.AsyncCheckpointer(saved.root, sharded_state.components(model, extra))
    with caplog.at_level(logging.WARNING, logger="async_ckpt"):
        assert [i.step for i in ckpt.list_checkpoints()] == [2], "listing must skip the bad step only"
    assert any(str(saved.manifest(1)) in r.getMessage() for r in caplog.records), \
        "listing skipped the step without a warning naming it"
    load_exact(saved, 2)


def _w0(key: str, value: Any) -> Callable[[dict], None]:
    return set_field(W0, key, value)


def _c1(key: str, value: Any) -> Callable[[dict], None]:
    return set_field(C1, key, value)


def _delete_chunk(doc: dict) -> None:
    del W0(doc)["chunks"][1]


def _with_copy(doc: dict) -> None:
    record = {k: v for k, v in chunk(doc, j=0).items() if k not in ("offsets", "sizes")}
    doc["components"]["model"]["shards"] = {"global": {"owners": [0], "tree": {"t": 0}, "tensors": [record]}}


def _unreferenced(doc: dict) -> None:
    items = entry(doc)["tree"]["d"]
    items[0][1] = 0.5                                  # "0.weight": a value instead of {"t": 0}


def _ref(value: Any) -> Callable[[dict], None]:
    def change(doc):
        entry(doc)["tree"]["d"][1][1] = {"t": value}  # "0.bias"
    return change


# case -> (edit of step 1's manifest, what the error must name besides the manifest)
CASES: dict[str, tuple[Callable[[dict], Any], tuple[str, ...]]] = {
    # tiling: the chunks of a tensor cover it exactly once
    "overlap": (_c1("offsets", [2, 0]), ("model", "tensors[0]", "overlap")),
    "gap-missing-chunk": (_delete_chunk, ("model", "tensors[0]", "cover 18 of the 30")),
    "outside-the-global-shape": (_c1("offsets", [4, 0]), ("model", "tensors[0].chunks[1]", "outside")),
    "offset-beyond-int64": (_c1("offsets", [2 ** 64, 0]), ("model", "tensors[0].chunks[1]", "outside")),
    "global-shape-larger": (_w0("shape", [6, 6]), ("model", "tensors[0]", "cover 30 of the 36")),
    "global-shape-huge": (_w0("shape", [2 ** 62, 6]), ("model", "tensors[0]", "cover")),
    "global-shape-smaller": (_w0("shape", [4, 6]), ("model", "tensors[0].chunks[1]", "outside")),
    # dimensions
    "offsets-one-dimension-short": (_c1("offsets", [3]), ("model", "tensors[0].chunks[1]", "dimensions")),
    "sizes-one-dimension-more": (_c1("sizes", [2, 6, 1]), ("model", "tensors[0].chunks[1]", "dimensions")),
    "global-one-dimension": (_w0("shape", [30]), ("model", "tensors[0].chunks[0]", "dimensions")),
    # records against their boxes and the tensor
    "record-dtype-other": (_c1("dtype", "int32"), ("model", "tensors[0].chunks[1]", "record is int32")),
    "tensor-dtype-other": (_w0("dtype", "int32"), ("model", "tensors[0].chunks[0]", "chunk says int32")),
    "tensor-dtype-unknown": (_w0("dtype", "float33"), ("model", "tensors[0]", "float33")),
    "record-shape-transposed": (_c1("shape", [6, 2]), ("model", "tensors[0].chunks[1]", "float32[6, 2]")),
    "record-nbytes-other": (_c1("nbytes", 40), ("model", "tensors[0].chunks[1]", "nbytes 40")),
    "sizes-disagree-with-record": (_c1("sizes", [1, 6]), ("model", "tensors[0].chunks[1]", "chunk says float32[1, 6]")),
    "sizes-and-shape-disagree-with-bytes": (lambda d: C1(d).update(sizes=[1, 6], shape=[1, 6]),
                                            ("model", "tensors[0].chunks[1]", "nbytes 48")),
    "record-runs-past-its-file": (_c1("offset", 10 ** 6), ("model", "tensors[0].chunks[1]", "runs past the end")),
    # the skeleton and the tensor list
    "tree-references-a-missing-tensor": (_ref(99), ("model", "references tensor 99")),
    "tree-references-negative": (_ref(-1), ("model", "references tensor -1")),
    "tree-references-bool": (_ref(True), ("model", "references tensor True")),
    "tensor-not-referenced": (_unreferenced, ("model", "tensors[0]", "not referenced")),
    "path-not-where-the-tree-puts-it": (_w0("path", ["elsewhere"]), ("model", "tensors[0]", "not referenced")),
    "repeated-path": (lambda d: entry(d)["tensors"][1].__setitem__("path", ["0.weight"]),
                      ("model", "tensors[1]", "repeated")),
    "path-malformed": (_w0("path", [["0.weight"]]), ("model", "tensors[0]", "malformed")),
    "tree-malformed": (lambda d: entry(d).__setitem__("tree", {"d": "items"}), ("model",)),
    "tree-missing": (pop_field(entry, "tree"), ("model", "needs a tree")),
    "tensors-not-a-list": (lambda d: entry(d).__setitem__("tensors", {}), ("model", "needs a tree")),
    "chunks-not-a-list": (_w0("chunks", {}), ("model", "tensors[0]", "list of chunks")),
    "chunk-not-an-object": (lambda d: W0(d)["chunks"].__setitem__(1, 5), ("model", "tensors[0].chunks[1]")),
    "offsets-negative": (_c1("offsets", [-3, 0]), ("model", "tensors[0].chunks[1].offsets")),
    "offsets-bool": (_c1("offsets", [True, 0]), ("model", "tensors[0].chunks[1].offsets")),
    "offsets-missing": (pop_field(C1, "offsets"), ("model", "tensors[0].chunks[1].offsets")),
    "owners-not-ranks": (lambda d: entry(d).__setitem__("owners", "0"), ("model", "owners")),
    # the component entry against its pattern and the format version
    "sharded-in-format-version-1": (set_field(lambda d: d, "format_version", 1),
                                    ("format_version 1", "'sharded'")),
    "sharded-without-its-entry": (pop_field(lambda d: d["components"]["model"], "sharded"),
                                  ("components.model", "needs a 'sharded' entry")),
    "sharded-entry-not-an-object": (lambda d: d["components"]["model"].__setitem__("sharded", []),
                                    ("components.model.sharded",)),
    "sharded-with-a-copy": (_with_copy, ("components.model", "no copies")),
    "sharded-entry-on-global": (set_field(lambda d: d["components"]["extra"], "sharing_pattern", "global"),
                                ("components.extra", "no 'sharded' entry")),
    "sharded-entry-on-per-rank": (set_field(lambda d: d["components"]["model"], "sharing_pattern", "per_rank"),
                                  ("components.model", "no 'sharded' entry")),
    # files
    "file-not-in-files": (_c1("file", "data-n00000-r00007-00000000.bin"), ("model", "tensors[0].chunks[1]", "lacks")),
    "file-outside-the-folder": (_c1("file", "../data.bin"), ("model", "tensors[0].chunks[1]", "lacks")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_chunk_records_are_refused_before_anything_loads(saved, case, caplog):
    change, names = CASES[case]
    edit_manifest(saved, change, step=1)
    check_refused(saved, names, caplog)


def test_a_chunk_record_split_in_two_loads_the_same_state(saved):
    """The reader takes any tiling: single chunks cut into halves (one of them uneven) load
    exactly, so the refusals above are about the damage, not about unusual chunking."""
    split(saved, "extra", "repl", 2)
    split(saved, "extra", "plain", 4)
    load_exact(saved, 1)
    assert [len(tensor(saved.doc(1), p, "extra")["chunks"]) for p in ("repl", "plain")] == [2, 2]


def test_split_chunks_that_overlap_or_leave_a_gap_are_refused(saved, caplog):
    split(saved, "extra", "repl", 3)
    edit_manifest(saved, lambda d: tensor(d, "repl", "extra")["chunks"][1].__setitem__("offsets", [2]), 1)
    check_refused(saved, ("extra", "tensors[2]", "overlap"), caplog)


def test_a_flipped_bit_in_one_chunk_is_refused_naming_the_file(saved):
    c = chunk(saved.doc(1), "2.weight", 1)
    data = saved.folder(1) / c["file"]
    flip_bit(data, c["offset"] + 5)
    err = load_fails(saved)
    assert c["file"] in str(err) and "model" in str(err)
    load_exact(saved, 2)


def test_format_version_2_without_sharded_components_still_loads(saved):
    """Version 2 is only written with a SHARDED component, but a reader takes any version it
    knows: a version-1 checkpoint relabelled 2 (resealed) loads as before."""
    from support.fixture_state import expected_state
    from support.stateful import Holder
    root = saved.root.parent / "v1"
    shutil.copytree(FIXTURE.parent / "format_v1", root)
    v1 = Saved(root, None)
    edit_manifest(v1, set_field(lambda d: d, "format_version", 2), step=1)
    holder = Holder()
    ac.AsyncCheckpointer(root, [ac.StateComponent("state", holder, ac.SharingPattern.GLOBAL)]).load(1)
    assert_same(holder.state, expected_state())


def test_zstd_chunks_of_the_fixture_are_validated_too(saved, caplog):
    """The same rules hold for compressed chunk records (step 2 of the fixture)."""
    edit_manifest(saved, _delete_chunk, step=2)
    err = load_fails(saved, step=2)
    assert "cover 18 of the 30" in str(err) and str(saved.manifest(2)) in str(err)
    model, extra = sharded_state.plain_targets()
    ckpt = ac.AsyncCheckpointer(saved.root, sharded_state.components(model, extra))
    assert [i.step for i in ckpt.list_checkpoints()] == [1]
    assert ckpt.load(1).step == 1 and torch.equal(model[0].weight, sharded_state.expected_model()["0.weight"])


# -- the tiling check's cost: linear for the grids writers make, bounded for anything else ---------
def _bricks(rows: int, per_row: int, seed: int) -> list:
    """Rows of one element each, every row cut at its own random columns: a tiling that is not a
    grid (the cells of all rows' cuts far outnumber the boxes)."""
    import random
    r, width, out = random.Random(seed), rows * per_row, []
    for i in range(rows):
        cuts = sorted(set([0, width] + r.sample(range(1, width), per_row - 1)))
        out += [((i, a), (1, b - a)) for a, b in zip(cuts, cuts[1:], strict=False)]
    return out


def test_tiling_check_is_linear_for_grids_and_bounded_otherwise():
    import time
    from async_ckpt.format.sharded import check_tiling
    started = time.perf_counter()
    check_tiling((1, 2900), [((0, i), (1, 1)) for i in range(2900)], "row")   # was ~4 M pairs
    check_tiling((4096, 64), [((i * 4, j * 8), (4, 8)) for i in range(1024) for j in range(8)], "fsdp x tp")
    check_tiling((20, 400), _bricks(20, 20, 1), "bricks")                      # swept pairwise
    assert time.perf_counter() - started < 5
    grid = [((i, j, k), (1, 1, 1)) for i in range(4) for j in range(4) for k in range(4)]
    grid[7] = ((0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match=r"\[0, 0, 0\]\+\[1, 1, 1\] and \[0, 0, 0\]\+\[1, 1, 1\] overlap"):
        check_tiling((4, 4, 4), grid, "cube")
    bricks = _bricks(20, 20, 2)
    o1, s1 = bricks[1]
    bricks[1] = ((0, o1[1] - 1), (1, s1[1] + 1))        # overlaps its neighbour by one element
    last = bricks[-1]
    bricks[-1] = (last[0], (1, last[1][1] - 1))          # and leaves a gap of one: same volume
    with pytest.raises(ValueError, match="overlap"):
        check_tiling((20, 400), bricks, "bricks")
    started = time.perf_counter()
    with pytest.raises(ValueError, match="too many to check"):
        check_tiling((80, 6400), _bricks(80, 80, 3), "crafted")
    assert time.perf_counter() - started < 5
