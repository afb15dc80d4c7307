"""Replica validation of REPLICATED, PER_GROUP and SHARDED components, computed off the training
thread.

Every rank digests its staged copy (QUICK: one hash of the whole state; TENSOR and FULL: one hash
per tensor plus one of the non-tensor skeleton). The coordinator compares the digests of all
ranks and names the component, tensors and ranks that disagree. FULL then compares each
mismatching replica element-wise against the copy that was written and reports the largest
absolute difference, so "bitwise different" and "numerically different" can be told apart.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import torch

from ..dist.messages import Announcement, layout_hash
from ..format.codec import byte_view, new_hasher
from ..errors import ReplicationError
from .plan import ShardPlan
from ..types import SharingPattern, ValidationLevel


def tensor_paths(tree: Any) -> dict[int, str]:
    """Tensor index -> its path in the state ("state/0/exp_avg"), from a flatten() skeleton."""
    paths: dict[int, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "t" in node and isinstance(node["t"], int):
                paths.setdefault(node["t"], path or "/")
            for item in node.get("d", []) if isinstance(node.get("d"), list) else []:
                if isinstance(item, list) and len(item) == 2:
                    walk(item[1], f"{path}/{item[0]}" if path else str(item[0]))
            for key in ("l", "u"):
                if isinstance(node.get(key), list):
                    for i, v in enumerate(node[key]):
                        walk(v, f"{path}/{i}" if path else str(i))
    walk(tree, "")
    return paths


def digest(shard: ShardPlan, views: list[torch.Tensor], tree: Any, level: ValidationLevel) -> dict:
    """This rank's digest of one staged REPLICATED shard (all its tensors are staged)."""
    tree_hash = new_hasher()
    tree_hash.update(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode())
    if level is ValidationLevel.QUICK:
        whole = new_hasher()
        whole.update(tree_hash.digest())
        for view in views:
            whole.update(byte_view(view.view(-1).view(torch.uint8)) if view.numel() else b"")
        return {"quick": whole.hexdigest()}
    tensors = []
    for view in views:
        h = new_hasher()
        if view.numel():
            h.update(byte_view(view.reshape(-1).view(torch.uint8)))
        tensors.append(h.hexdigest())
    return {"tree": tree_hash.hexdigest(), "tensors": tensors}


def digest_chunks(shard: ShardPlan, views: list[torch.Tensor]) -> dict:
    """SHARDED: one hash per staged chunk that other ranks hold too, keyed by the chunk's identity
    (path and offsets), at QUICK and TENSOR alike (a rank's chunks differ from its peers', so one
    hash of everything would compare nothing)."""
    out = {}
    for slot, view in zip(shard.slots, views, strict=True):
        if slot.chunk is not None and slot.chunk.replicated:
            h = new_hasher()
            if view.numel():
                h.update(byte_view(view.reshape(-1).view(torch.uint8)))
            out[slot.chunk.ident] = h.hexdigest()
    return {"chunks": out}


def _chunk_mismatches(announces: dict[int, Announcement], key: str, level: str) -> list[dict]:
    by_chunk: dict[str, dict[int, str]] = {}
    for rank, a in announces.items():
        for ident, value in a.digests.get(key, {}).get("chunks", {}).items():
            by_chunk.setdefault(ident, {})[rank] = value
    found = []
    for ident, values in sorted(by_chunk.items()):
        groups = _groups(values)
        if len(groups) > 1:
            differ = sorted(r for g in groups[1:] for r in g)
            found.append({"component": key, "level": level, "chunk": ident, "ranks": differ,
                          "agree": groups[0]})
    return found


def _groups(values: dict[int, Any]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for rank, value in sorted(values.items()):
        groups.setdefault(json.dumps(value, sort_keys=True), []).append(rank)
    return sorted(groups.values(), key=lambda g: (-len(g), g))


def _layout_key(announce: Announcement) -> dict[str, str]:
    """A rank's REPLICATED layouts as one hash per component (what ranks announce: comparing
    hashes keeps the check O(ranks x components), not O(ranks x tensors))."""
    return announce.layout_hashes or {k: layout_hash(v) for k, v in announce.replicated_shapes.items()}


def check_agreement(announces: dict[int, Announcement], shapes: dict | None = None) -> str | None:
    """Every rank resolved the same components, patterns, groups and replicated shapes. `shapes`:
    the caller's own REPLICATED layouts, which name the layouts behind matching hashes in the
    message (see `with_layouts`)."""
    for field, what in (("patterns", "sharing patterns / validation levels"),
                        ("replicated_shapes", "REPLICATED tensor layouts")):
        groups = _groups({r: (a.patterns if field == "patterns" else _layout_key(a))
                          for r, a in announces.items()})
        if len(groups) > 1:
            shown = with_layouts({r: announces[r] for r in (groups[0][0], groups[1][0])}, shapes or {})
            first = getattr(shown[groups[0][0]], field)
            other = getattr(shown[groups[1][0]], field)
            keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            return (f"ranks disagree on {what} of component(s) {keys}: ranks {groups[0]} have "
                    f"{ {k: first.get(k) for k in keys} }, ranks {groups[1]} have "
                    f"{ {k: other.get(k) for k in keys} }; every rank must register the same "
                    "components, and a sharing_pattern callable must return the same pattern on "
                    "every rank")
    for rank, announce in sorted(announces.items()):
        for key, members in announce.groups.items():
            for other in members:
                peer = announces.get(other)
                theirs = peer.groups.get(key) if peer is not None else None
                if theirs != members:
                    return (f"component {key!r} is PER_GROUP with group {list(members)} on rank {rank}, "
                            f"but rank {other} has group {list(theirs) if theirs else theirs}; every "
                            "member must pass the same "
                            "process_group")
    return None


def replica_sets(announces: dict[int, Announcement], key: str,
                 copies: Mapping[tuple[str, str], tuple[int, ...]]) -> list[tuple[str, list[int]]]:
    """(copy, ranks holding a replica of it) for a validated component: REPLICATED, one copy held
    by every rank; PER_GROUP, one copy per group of several members (`copies`: the members of
    each (component, copy) as assembled)."""
    pattern = next(iter(announces.values())).patterns[key][0]
    if pattern == SharingPattern.REPLICATED.value:
        return [("replicated", sorted(announces))]
    return [(copy, list(members)) for (k, copy), members in sorted(copies.items())
            if k == key and len(members) > 1]


def find_mismatches(announces: dict[int, Announcement],
                    owners: Mapping[str | tuple[str, str], list[int]],
                    copies: Mapping[tuple[str, str], tuple[int, ...]] | None = None) -> list[dict]:
    """Mismatches between replicas. Each: component, level, and either `groups` of ranks that
    agree (QUICK / skeleton) or a `tensor` index with the ranks whose copy differs from the
    majority's. PER_GROUP mismatches also name their `copy` and are compared within the group.
    `owners`: per tensor, the rank that wrote it: keyed by component for REPLICATED, by
    (component, copy) for PER_GROUP copies."""
    found: list[dict[str, Any]] = []
    any_rank = next(iter(announces.values()))
    for key, (pattern, level) in sorted(any_rank.patterns.items()):
        if level == ValidationLevel.NONE.value:
            continue
        if pattern == SharingPattern.SHARDED.value or any(
                "chunks" in a.digests.get(key, {}) for a in announces.values()):
            found.extend(_chunk_mismatches(announces, key, level))     # SHARDED, split REPLICATED
            continue
        for copy, ranks in replica_sets(announces, key, copies or {}):
            extra = {} if pattern == SharingPattern.REPLICATED.value else {"copy": copy}
            copy_owners = owners[key] if not extra else owners[(key, copy)]
            digests = {r: announces[r].digests[key] for r in ranks if key in announces[r].digests}
            if len(digests) < 2:
                continue
            if level == ValidationLevel.QUICK.value:
                groups = _groups({r: d["quick"] for r, d in digests.items()})
                if len(groups) > 1:
                    found.append({"component": key, "level": level, "groups": groups, **extra})
                continue
            counts = _groups({r: len(d["tensors"]) for r, d in digests.items()})
            tree_groups = _groups({r: d["tree"] for r, d in digests.items()})
            if len(tree_groups) > 1 or len(counts) > 1:
                found.append({"component": key, "level": level, "groups": tree_groups if len(counts) == 1
                              else counts, "tree": True, **extra})
            if len(counts) > 1:
                continue            # replicas of different lengths: no tensor to compare one to one
            for index, owner in enumerate(copy_owners):
                groups = _groups({r: d["tensors"][index] for r, d in digests.items()})
                if len(groups) == 1:
                    continue
                # The largest agreeing set is the reference (ties: the set holding the written copy).
                majority = max(groups, key=lambda g: (len(g), owner in g))
                differ = sorted(r for g in groups if g is not majority for r in g)
                found.append({"component": key, "level": level, "tensor": index, "owner": owner,
                              "ranks": differ, "agree": majority, **extra})
    return found


def compare_full(mine: torch.Tensor, reference: torch.Tensor) -> dict:
    """Element-wise comparison of this rank's replica with the written one."""
    if mine.dtype.is_floating_point or mine.dtype.is_complex or mine.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool):
        a, b = mine.to(torch.complex128 if mine.is_complex() else torch.float64), \
            reference.to(torch.complex128 if mine.is_complex() else torch.float64)
        diff = (a - b).abs()
        differing = (a != b) & ~(torch.isnan(a.real) & torch.isnan(b.real))
        return {"max_abs_diff": float(diff[differing].max()) if differing.any() else 0.0,
                "differing": int(differing.sum())}
    a, b = mine.reshape(-1).view(torch.uint8), reference.reshape(-1).view(torch.uint8)
    return {"max_abs_diff": None, "differing": int((a != b).sum())}


def describe(mismatches: list[dict], trees: Mapping[tuple[str, str], Any],
             full: dict[tuple[str, int, int], dict] | None = None) -> ReplicationError:
    """One ReplicationError naming every component (and group copy), tensor and rank that
    disagrees. `trees`: each copy's skeleton, for the tensors' paths in the state."""
    paths: dict[tuple[str, str], dict[int, str]] = {}

    def name_of(m: dict) -> str:
        where = (m["component"], m.get("copy", "replicated"))
        if where not in paths:
            paths[where] = tensor_paths(trees.get(where))
        return paths[where].get(m["tensor"], f"#{m['tensor']}")

    def label(m: dict) -> str:
        copy = f", group copy {m['copy']!r}" if "copy" in m else ""
        return f"component {m['component']!r} ({m['level'].upper()}{copy})"

    lines = []
    for m in mismatches:
        if "chunk" in m:
            path, offsets = json.loads(m["chunk"])
            lines.append(f"{label(m)}: chunk at offsets {offsets} of tensor "
                         f"{'/'.join(str(k) for k in path)!r} on rank(s) {m['ranks']} differs from "
                         f"ranks {m['agree']}")
            continue
        if "groups" in m:
            what = "non-tensor state" if m.get("tree") else "state"
            groups = "; ".join(f"ranks {g}" for g in m["groups"])
            lines.append(f"{label(m)}: replicas' {what} differs between {groups}")
            continue
        detail = ""
        for rank in m["ranks"]:
            res = (full or {}).get((m["component"], m["tensor"], rank))
            if res is not None:
                diff = res["max_abs_diff"]
                detail += (f"; rank {rank}: {res['differing']} element(s) differ, max |diff| = "
                           f"{diff:.6g}" if diff is not None else
                           f"; rank {rank}: {res['differing']} byte(s) differ")
        tie = (f" (no majority: rank {m['owner']}'s copy, the written one, is the reference)"
               if len(m["agree"]) <= len(m["ranks"]) else "")
        lines.append(f"{label(m)}: tensor {name_of(m)!r} on rank(s) {m['ranks']} differs "
                     f"from ranks {m['agree']}{tie}{detail}")
    message = ("replicas disagree: " + "; ".join(lines) +
               ". Replicated state must be identical on every rank holding a replica (check "
               "seeds, gradient all-reduce, or use PER_RANK for state that differs)")
    per_rank: dict[int, list[str]] = {}
    for m in mismatches:
        what = (f"{m['component']!r} tensor {name_of(m)!r}" if "tensor" in m else
                f"{m['component']!r} chunk {m['chunk']}" if "chunk" in m else f"{m['component']!r}")
        for rank in m.get("ranks", []) + [r for g in m.get("groups", [])[1:] for r in g]:
            per_rank.setdefault(rank, []).append(what)
    return ReplicationError(message, {r: f"its replica of {', '.join(w)} differs from the other ranks'"
                                      for r, w in sorted(per_rank.items())})


def with_layouts(announces: dict[int, Announcement], shapes: dict) -> dict[int, Announcement]:
    """Announcements carry REPLICATED layouts as hashes; put back the coordinator's own layouts
    (rank 0's) where a rank's hash matches, and the odd hash where it does not, so that
    `check_agreement` names the component and the ranks that differ."""
    mine = {key: layout_hash(value) for key, value in shapes.items()}
    restored = {}
    for rank, announce in announces.items():
        if announce.replicated_shapes or not announce.layout_hashes and not mine:
            restored[rank] = announce
            continue
        layouts = {key: (shapes[key] if mine.get(key) == digest else ((f"layout {digest}", ()),))
                   for key, digest in announce.layout_hashes.items()}
        restored[rank] = dataclasses.replace(announce, replicated_shapes=layouts)
    return restored
