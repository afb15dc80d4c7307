"""What a hostile editor might write into a checkpoint, for the fuzzer (tests/test_fuzz_checkpoints.py):
special integers and strings, random JSON values, an edit of one place of a JSON document, the
document written back with its seal kept, recomputed or broken, and single bit flips."""
from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from async_ckpt.format.manifest import HASH_KEY
from support.corruption import resealed


SPECIAL_INTS = [0, 1, -1, 2, 3, 7, 63, 64, 333, 4095, 4096, 16384, 2 ** 24, 2 ** 31, 2 ** 32, 2 ** 40,
                2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 2 ** 70, 10 ** 400]
SPECIAL_STRINGS = ["", ".", "..", "../x.bin", "/dev/zero", "x" * 300, "raw", "zstd", "zstd-planes1",
                   "zstd-planes4", "zstd-shuffle2", "lz4", "float32", "bfloat16", "complex32", "qint8",
                   "float8_e4m3fn", "bool", "nan", "inf", "-inf", "global", "replicated", "per_rank",
                   "0" * 32, "g" * 32, "xxh3-128:" + "0" * 32, "manifest.json", "metrics_hash"]
SCALARS = st.one_of(
    st.sampled_from(SPECIAL_INTS), st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0.0, -0.0, 0.5, 1e308, 5e-324, float("inf"), float("-inf"), float("nan")]),
    st.floats(), st.sampled_from(SPECIAL_STRINGS), st.text(max_size=12), st.none(), st.booleans())
VALUES = st.recursive(
    st.one_of(SCALARS, st.sampled_from([[], {}, [2 ** 70, 0], {"t": 0, "np": 1}, {"t": 1}, {"f": "nan"},
                                        {"dt": "bfloat16"}, {"p": "gAR9lC4="}, {"d": [["k", {"t": 0}]]},
                                        [[[[[[[[]]]]]]]]])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


def value(data, label: str = "value") -> Any:
    """A drawn value, copied: edits change values in place, and hypothesis hands out the same
    objects again (st.just, sampled_from)."""
    return copy.deepcopy(data.draw(VALUES, label=label))


def json_paths(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += json_paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += json_paths(v, path + (i,))
    return out


def perturb(value: Any, how: int) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    return [value + 1, value - 1, value * 2, value // 2, value + 2 ** 40, -value, value ^ 1, value ^ (1 << 20),
            value + 64, value - 64][how % 10]


def edit_json(doc: Any, data) -> Any:
    """One drawn edit, among those that apply there, at one drawn place of `doc` (in place where
    possible); integers (offsets, lengths, sizes, shapes, frames, steps) are perturbed most."""
    path = data.draw(st.sampled_from(json_paths(doc)), label="path")
    if not path:
        return value(data, "root")
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, node = path[-1], parent[path[-1]]
    ops = ["replace", "delete"]
    if isinstance(node, int) and not isinstance(node, bool):
        ops += ["perturb"] * 4
    if isinstance(node, (dict, list)):
        ops += ["insert"]
    if isinstance(parent, list):
        ops += ["duplicate"] + (["swap"] if len(parent) > 1 else [])
    op = data.draw(st.sampled_from(ops), label="op")
    if op == "replace":
        parent[key] = value(data)
    elif op == "perturb":
        parent[key] = perturb(node, data.draw(st.integers(0, 9), label="how"))
    elif op == "delete":
        del parent[key]
    elif op == "insert" and isinstance(node, dict):
        node[data.draw(st.sampled_from(["x", "frames", "np", "members", "o", "m", "t"]))] = value(data)
    elif op == "insert":
        node.insert(data.draw(st.integers(0, len(node))), value(data))
    elif op == "duplicate":
        parent.insert(key, json.loads(json.dumps(node)))
    else:
        other = data.draw(st.integers(0, len(parent) - 1))
        parent[key], parent[other] = parent[other], parent[key]
    return doc


def dumps(doc: Any) -> bytes:
    try:
        return json.dumps(doc, separators=(",", ":")).encode()
    except (ValueError, TypeError, RecursionError):
        assume(False)
        raise


def manifest_bytes(doc: Any, mode: str, old_digest: str) -> tuple[bytes, bool]:
    """(the edited manifest, whether it vouches for itself) under a sealing `mode`."""
    body = dumps({k: v for k, v in doc.items() if k != HASH_KEY} if isinstance(doc, dict) else doc)
    if mode == "reseal":
        return resealed(doc), True
    if mode == "stale-seal" and body.startswith(b"{") and body != b"{}":
        return body[:-1] + f',"{HASH_KEY}":"{old_digest}"}}'.encode(), False
    return body, True           # no seal: what a writer before sealing wrote


def flip(raw: bytes, bit: int) -> bytes:
    i = bit // 8 % len(raw)
    return raw[:i] + bytes([raw[i] ^ (1 << (bit % 8))]) + raw[i + 1:]


TEMPLATES = st.sampled_from(["raw", "zstd"])
