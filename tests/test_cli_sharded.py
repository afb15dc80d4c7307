"""The command line on SHARDED components (format_version 2): inspect lists each global tensor
with its chunks, export assembles chunks to global tensors (safetensors, .pt, Hugging Face
folder), verify checks every chunk record, diff compares global tensors however they are chunked,
ls is unaffected. Each test runs the command line on a copy of the checked-in fixture
tests/fixtures/sharded_v2/ (2 ranks' DTensor chunks; step 1 raw, step 2 zstd): in process
(`support.cli.run_cli`, the console script's entry), and one command also as a subprocess
(`end_to_end`: `python -m async_ckpt`, with the same output in process).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from support import sharded_state
from support.cli import as_json, end_to_end, fails, ok, run_cli, same_tensors
from support.corruption import Saved, flip_bit
from support.sharded_edits import chunk, rewrite_chunk, split

FIXTURE = Path(__file__).parent / "fixtures" / "sharded_v2"


@pytest.fixture
def saved(tmp_path) -> Saved:
    shutil.copytree(FIXTURE, tmp_path / "ckpts")
    return Saved(tmp_path / "ckpts", None)


def global_tensors(prefix: bool = True) -> dict[str, torch.Tensor]:
    """The fixture's global tensors under the names export gives them."""
    out = {}
    for comp, state in sharded_state.expected().items():
        for key, v in state.items():
            if isinstance(v, torch.Tensor):
                out[f"{comp}.{key}" if prefix else key] = v
    return out


def test_inspect_lists_global_tensors_and_their_chunks(saved):
    doc = as_json(end_to_end("inspect", saved.root, "--step", 1, "--json"))
    assert doc["format_version"] == 2
    comp = doc["components"]["model"]
    assert comp["sharing_pattern"] == "sharded" and list(comp["copies"]) == ["sharded"]
    tensors = {t["path"]: t for t in comp["copies"]["sharded"]["tensors"]}
    w = tensors["0.weight"]
    assert (w["dtype"], w["shape"], w["global"], w["nbytes"]) == ("float32", [5, 6], True, 120)
    assert w["layout"] == {"mesh": [2], "dims": [], "placements": ["S(0)"]}
    assert [(c["offsets"], c["sizes"], c["rank"], c["node"], c["codec"]) for c in w["chunks"]] == \
        [([0, 0], [3, 6], 0, 0, "raw"), ([3, 0], [2, 6], 1, 0, "raw")]
    assert all(c["file"] in doc["files"] and c["stored"] == c["nbytes"] for c in w["chunks"])
    extra = {t["path"]: t for t in doc["components"]["extra"]["copies"]["sharded"]["tensors"]}
    assert [c["offsets"] for c in extra["cols"]["chunks"]] == [[0, 0], [0, 3]]
    assert len(extra["repl"]["chunks"]) == 1                    # replicated: written once
    assert doc["components"]["extra"]["copies"]["sharded"]["values"] == {"step": 42, "name": "sharded fixture"}

    text = ok(run_cli("inspect", saved.root, "--step", 2, "--component", "model"))
    assert "component model: sharded" in text and "format_version 2" in text
    assert "copy sharded: chunks written by rank(s) [0, 1]; 4 global tensor(s)" in text
    lines = text.splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["0.weight", "float32", "5x6"])
    assert "2 chunk(s)" in lines[row]
    assert lines[row + 1].split()[:2] == ["[0:3,0:6]", "3x6"] and "rank 0" in lines[row + 1]
    assert lines[row + 2].split()[:2] == ["[3:5,0:6]", "2x6"] and "rank 1" in lines[row + 2]
    assert "zstd-planes4" in lines[row + 1]


def test_export_safetensors_assembles_global_tensors(saved, tmp_path):
    """Every component of the raw step; one component of the zstd step (names without prefix)."""
    from safetensors.torch import load_file
    out = tmp_path / "all.safetensors"
    ok(run_cli("export", saved.root, "--step", 1, "--to", out))
    same_tensors(load_file(out), global_tensors())
    one = tmp_path / "model.safetensors"
    ok(run_cli("export", saved.root, "--step", 2, "--component", "model", "--to", one))
    same_tensors(load_file(one), sharded_state.expected_model())


def test_export_torch_save_and_hugging_face_folder(saved, tmp_path):
    from safetensors.torch import load_file
    pt = tmp_path / "all.pt"
    ok(run_cli("export", saved.root, "--step", 2, "--to", pt))
    state = torch.load(pt, weights_only=True)
    want = sharded_state.expected()
    same_tensors(dict(state["model"]), want["model"])
    assert {k: v for k, v in state["extra"].items() if not isinstance(v, torch.Tensor)} == \
        {"step": 42, "name": "sharded fixture"}
    same_tensors({k: v for k, v in state["extra"].items() if isinstance(v, torch.Tensor)},
                 {k: v for k, v in want["extra"].items() if isinstance(v, torch.Tensor)})
    hf = tmp_path / "hf"
    ok(run_cli("export", saved.root, "--step", 1, "--to", hf, "--shard-size", "150B"))
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in global_tensors().values())
    got = {}
    for name in set(index["weight_map"].values()):
        got.update(load_file(hf / name))
    same_tensors(got, global_tensors())


def test_verify_checks_every_chunk_record(saved):
    doc = as_json(run_cli("verify", saved.root, "--all", "--json"))
    assert doc["ok"] and [s["step"] for s in doc["steps"]] == [1, 2]
    c = chunk(saved.doc(2), "cols", 1, "extra")
    flip_bit(saved.folder(2) / c["file"], c["offset"] + 3)
    proc = run_cli("verify", saved.root, "--step", 2)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CORRUPT" in proc.stdout
    assert "component 'extra' tensor 'cols' chunk [0, 3]+[4, 3]" in proc.stdout, proc.stdout


def test_diff_compares_global_tensors_however_chunked(saved):
    """Steps 1 (raw) and 2 (zstd) hold the same state: equal by bytes (the codecs differ). Step 1
    chunked otherwise (a chunk cut in two) is still equal; a changed chunk (vouched for by its
    hashes) shows as a changed global tensor with its max |diff|."""
    doc = as_json(run_cli("diff", saved.root, 1, 2, "--json"))
    assert doc["changed"] == 0 and doc["equal_tensors"] == 8
    assert {t["by"] for t in doc["tensors"]} == {"bytes"}
    split(saved, "extra", "repl", 2)
    doc = as_json(run_cli("diff", saved.root, 1, 2, "--json", "--component", "extra"))
    assert doc["changed"] == 0 and doc["equal_tensors"] == 4
    bumped = sharded_state.expected_extra()["plain"].clone()
    bumped[3] += 7
    rewrite_chunk(saved, 1, "extra", "plain", 0, bumped.numpy().tobytes())
    doc = as_json(run_cli("diff", saved.root, 2, 1, "--json", "--component", "extra"))
    (changed,) = [t for t in doc["tensors"] if t["status"] != "equal"]
    assert changed["name"] == "extra[sharded] plain" and changed["max_abs_diff"] == 7.0
    assert doc["changed"] == 1


def test_ls_lists_sharded_steps(saved):
    doc = as_json(run_cli("ls", saved.root, "--json"))
    assert [(s["step"], s["components"], s["nbytes"]) for s in doc["checkpoints"]] == \
        [(1, ["extra", "model"], 510), (2, ["extra", "model"], 510)]


def test_a_copy_that_is_not_there_is_named(saved):
    fails(run_cli("export", saved.root, "--component", "model", "--copy", "rank0", "--to",
                  saved.root.parent / "x.safetensors"), 1, "rank0", "sharded")
