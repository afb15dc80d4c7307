"""Reading a format_version 3 checkpoint's JSON the way tests look at version 1 and 2 manifests:
the root with every fragment's copies and chunks put back where a single-document manifest keeps
them (no checks: the library's reader is what tests check; this is only a view for assertions)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def fragment_docs(folder: Path) -> dict[str, dict]:
    root = json.loads((folder / "manifest.json").read_text())
    return {name: json.loads((folder / name).read_text()) for name in root.get("fragments", {})}


def merged_doc(folder: Path) -> dict[str, Any]:
    """The root manifest of `folder` with its fragments merged in (a copy of the root if none)."""
    doc = json.loads((folder / "manifest.json").read_text())
    for frag in fragment_docs(folder).values():
        for key, copies in frag["copies"].items():
            shards = doc["components"][key]["shards"]
            for name, copy in copies.items():
                shards[name] = {**copy, "tree": frag["trees"][copy["tree"]]}
        for key, chunks in frag["chunks"].items():
            by_path = {json.dumps(t["path"]): t for t in doc["components"][key]["sharded"]["tensors"]}
            for chunk in chunks:
                by_path[json.dumps(chunk["path"])]["chunks"].append(
                    {k: v for k, v in chunk.items() if k != "path"})
    return doc
