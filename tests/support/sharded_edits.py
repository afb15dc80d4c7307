"""Edits of SHARDED manifests (format_version 2) for the tests that take the checked-in fixture
tests/fixtures/sharded_v2/ apart: finding a tensor's entry and chunks, cutting a raw chunk in two
(another valid tiling of the same bytes) and rewriting a chunk's bytes with its hashes updated (a
vouched change). Manifests are resealed (support/corruption.py), so edits reach the validator.
"""
from __future__ import annotations

import json
from pathlib import Path

import xxhash

from .corruption import Saved, edit_manifest, resealed


def entry(doc: dict, comp: str = "model") -> dict:
    return doc["components"][comp]["sharded"]


def tensor(doc: dict, path: str, comp: str = "model") -> dict:
    return next(t for t in entry(doc, comp)["tensors"] if t["path"] == [path])


def chunk(doc: dict, path: str = "0.weight", j: int = 1, comp: str = "model") -> dict:
    return tensor(doc, path, comp)["chunks"][j]


def split(saved: Saved, comp: str, path: str, at: int, step: int = 1) -> None:
    """Cut the single raw chunk of 1-d tensor `path` into [0, at) and [at, n): two records over
    the same bytes, each with its own hash; the manifest is resealed. The state is unchanged."""
    data = {p.name: p.read_bytes() for p in saved.folder(step).glob("data-*.bin")}

    def change(doc):
        t = tensor(doc, path, comp)
        (whole,) = t["chunks"]
        assert whole["codec"] == "raw" and len(t["shape"]) == 1
        item = whole["nbytes"] // t["shape"][0]
        parts = []
        for lo, hi in ((0, at), (at, t["shape"][0])):
            start = whole["offset"] + lo * item
            raw = data[whole["file"]][start:start + (hi - lo) * item]
            parts.append({**whole, "offsets": [lo], "sizes": [hi - lo], "shape": [hi - lo], "offset": start,
                          "length": len(raw), "nbytes": len(raw), "hash": xxhash.xxh3_128_hexdigest(raw)})
        t["chunks"] = parts
    edit_manifest(saved, change, step)


def rewrite_chunk(saved: Saved, step: int, comp: str, path: str, j: int, new: bytes) -> None:
    """Replace the stored bytes of one raw chunk (same length) and update its record's hash and
    its file's size and hash in a resealed manifest: a checkpoint that vouches for the change."""
    doc = json.loads(saved.manifest(step).read_bytes())
    c = tensor(doc, path, comp)["chunks"][j]
    assert c["codec"] == "raw" and len(new) == c["length"]
    file: Path = saved.folder(step) / c["file"]
    raw = file.read_bytes()
    raw = raw[:c["offset"]] + new + raw[c["offset"] + len(new):]
    file.write_bytes(raw)
    c["hash"] = xxhash.xxh3_128_hexdigest(new)
    doc["files"][c["file"]].update(size=len(raw), hash=xxhash.xxh3_128_hexdigest(raw))
    saved.manifest(step).write_bytes(resealed(doc))
