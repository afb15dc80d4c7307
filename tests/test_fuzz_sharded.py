"""The fuzzer of tests/test_fuzz_checkpoints.py (hypothesis) on SHARDED components: hostile edits
of chunk records (format_version 2) and damage to the data they point at.

Templates are copies of the checked-in fixture tests/fixtures/sharded_v2/ (two ranks' DTensor
chunks: 2-D tensors cut along either dimension, uneven chunks, a replicated chunk written once,
step 1 raw, step 2 zstd); the ``split`` template also cuts two single-chunk tensors of step 1 in
two (support/sharded_edits.py). Each case damages one step with drawn mutations, then loads it
into plain components holding zeros (the one-process consolidation path: every global tensor
assembled from its chunks), lists and asks for the latest step. The only outcomes allowed are
those of test_fuzz_checkpoints.py: the saved state bit for bit; another state only where the
mutation vouched for itself (resealed manifest, rehashed record); or a CheckpointError from the
readers' own checks with no component touched; never another exception, a blocked call, a change
to any file, or memory growth past the same bounds.

Mutations: JSON edits anywhere in a component's ``sharded`` entry (the generic editor of
test_fuzz_checkpoints.py) or in the whole manifest; geometry edits aimed at the tiling rules
(offsets and sizes set to drawn integers, chunks dropped, duplicated, moved between tensors or
their records swapped, a global shape or dtype changed, paths swapped); and flipped or rewritten
bytes of one chunk record with its hash (and the file's) updated.

Profiles (tests/support/profile.py): ASYNC_CKPT_TESTS=ci (default: 80 + 40 cases, fixed seed) or
full (3,000 + 1,000, random seed).
"""
from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import async_ckpt as ac
from async_ckpt import CheckpointError
from async_ckpt.format.manifest import HASH_KEY
from async_ckpt.load.guard import UNEXPECTED
from async_ckpt.storage.testing.conformance import bounded
from support import sharded_state
from support.corruption import Saved, resealed
from support.sharded_edits import split
from support.fuzz_edits import SPECIAL_INTS, edit_json, flip, manifest_bytes
from test_fuzz_checkpoints import CALL_BOUND_S, FULL, RSS_BOUND, VM_BOUND, files_of, peak_rss, peak_vm

pytestmark = pytest.mark.fuzz
FIXTURE = Path(__file__).parent / "fixtures" / "sharded_v2"
EXAMPLES = {"manifest": 3000, "data": 1000} if FULL else {"manifest": 80, "data": 40}
TEMPLATES = st.sampled_from(["raw", "zstd", "split"])
DAMAGED = {"raw": 1, "zstd": 2, "split": 1}          # the step each template damages


def fuzz(target: str):
    return settings(max_examples=EXAMPLES[target], deadline=None, database=None, derandomize=not FULL,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                            HealthCheck.filter_too_much])


timeout = pytest.mark.timeout(4 * 3600 if FULL else 600)


class World:
    def __init__(self, base: Path):
        self.base = base
        self.templates = {}
        for name in ("raw", "zstd", "split"):
            root = base / f"template-{name}"
            shutil.copytree(FIXTURE, root)
            if name == "split":
                split(Saved(root, None), "extra", "repl", 2)
                split(Saved(root, None), "extra", "plain", 3)
            self.templates[name] = root
        self.work = base / "work"
        self.outcomes: collections.Counter = collections.Counter()
        self.rss_start = self.rss_peak = peak_rss()
        self.vm_start = self.vm_peak = peak_vm()
        self.growth: collections.Counter = collections.Counter()    # peak RSS growth by kind

    def fresh_copy(self, template: str) -> Path:
        if self.work.exists():
            shutil.rmtree(self.work)
        shutil.copytree(self.templates[template], self.work)
        return self.work


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("fuzz-sharded"))
    yield w
    print("\nfuzz-sharded:", json.dumps({"outcomes": dict(w.outcomes),
                                         "peak_rss_growth_mib": round((w.rss_peak - w.rss_start) / 2 ** 20, 1),
                                         "growth_by_kind_mib": {k: round(v / 2 ** 20, 1)
                                                                for k, v in w.growth.most_common(5)}}))


def _exact(model: torch.nn.Module, extra: sharded_state.Extra) -> bool:
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                    and a.shape == b.shape and a.view(torch.uint8).equal(b.view(torch.uint8)))
        return type(a) is type(b) and a == b
    want = sharded_state.expected()
    got = {"model": dict(model.state_dict()), "extra": extra.state}
    return all(list(got[k]) == list(want[k]) and all(same(got[k][n], want[k][n]) for n in want[k])
               for k in want)


def run_case(world: World, root: Path, step: int, vouched: bool, kind: str) -> str:
    """load(step) into zeroed plain components, list, latest; the outcome, every property checked."""
    before = files_of(root)
    model, extra = sharded_state.plain_targets()
    ckpt = ac.AsyncCheckpointer(root, sharded_state.components(model, extra))
    try:
        try:
            info = bounded(lambda: ckpt.load(step), CALL_BOUND_S, ())
        except CheckpointError as exc:
            assert not (type(exc) is CheckpointError and str(exc).startswith(UNEXPECTED)), \
                f"the readers' safety net caught {exc.__cause__!r}: a reader lacks a precise check"
            assert extra.loads == 0 and not any(p.any() for p in model.parameters()), \
                "a refused load changed a component"
            outcome = "refused"
        else:
            assert info.step == step and extra.loads == 1
            outcome = "exact" if _exact(model, extra) else "different"
            assert outcome == "exact" or vouched, "an unvouched mutation loaded a different state"
        other = 3 - step
        assert other in [i.step for i in bounded(ckpt.list_checkpoints, CALL_BOUND_S, ())], \
            f"damage to step {step} hid step {other}"
        assert bounded(ckpt.latest_step, CALL_BOUND_S, ()) in (1, 2)
    finally:
        ckpt.close()
    assert files_of(root) == before, "reading changed files"
    if peak_rss() > world.rss_peak:
        world.growth[kind] += peak_rss() - world.rss_peak
    world.rss_peak, world.vm_peak = max(world.rss_peak, peak_rss()), max(world.vm_peak, peak_vm())
    assert world.rss_peak - world.rss_start < RSS_BOUND, \
        f"peak RSS grew by {(world.rss_peak - world.rss_start) >> 20} MiB"
    assert world.vm_peak - world.vm_start < VM_BOUND, \
        f"peak virtual memory grew by {(world.vm_peak - world.vm_start) >> 20} MiB"
    world.outcomes[f"{kind}:{outcome}"] += 1
    return outcome


# -- geometry edits: aimed at the tiling rules ------------------------------------------------------
SMALL = st.one_of(st.integers(0, 8), st.sampled_from(SPECIAL_INTS))
BOXES = st.lists(SMALL, min_size=0, max_size=3)


def _tensors(doc: dict) -> list[dict]:
    return [t for c in doc["components"].values() if isinstance(c.get("sharded"), dict)
            for t in c["sharded"]["tensors"]]


def geometry_edit(doc: dict, data) -> None:
    tensors = _tensors(doc)
    t = data.draw(st.sampled_from(tensors), label="tensor")
    chunks = t["chunks"]
    c = data.draw(st.sampled_from(chunks), label="chunk")
    op = data.draw(st.sampled_from(["offsets", "sizes", "box", "drop", "duplicate", "move", "swap-records",
                                    "shape", "dtype", "swap-paths", "ref"]), label="geometry")
    if op in ("offsets", "sizes"):
        i = data.draw(st.integers(0, max(0, len(c[op]) - 1)), label="dim")
        if c[op]:
            c[op][i] = data.draw(SMALL, label="int")
        else:
            c[op] = data.draw(BOXES, label="box")
    elif op == "box":
        c["offsets"], c["sizes"] = data.draw(BOXES, label="offsets"), data.draw(BOXES, label="sizes")
        if data.draw(st.booleans(), label="record-follows"):
            c["shape"] = list(c["sizes"])                  # the record agrees with its new box
    elif op == "drop":
        chunks.remove(c)
    elif op == "duplicate":
        chunks.append(json.loads(json.dumps(c)))
    elif op == "move":
        other = data.draw(st.sampled_from(tensors), label="to")
        chunks.remove(c)
        other["chunks"].append(c)
    elif op == "swap-records":
        other = data.draw(st.sampled_from([x for u in tensors for x in u["chunks"]]), label="with")
        for key in ("file", "offset", "length", "nbytes", "codec", "hash", "frames", "dtype", "shape"):
            a, b = c.get(key), other.get(key)
            for node, v in ((c, b), (other, a)):
                if v is None:
                    node.pop(key, None)
                else:
                    node[key] = v
    elif op == "shape":
        t["shape"] = data.draw(BOXES, label="shape")
    elif op == "dtype":
        t["dtype"] = data.draw(st.sampled_from(["float32", "float64", "int32", "int64", "bfloat16", "uint8",
                                                "bool", "complex64", "float33"]), label="dtype")
    elif op == "swap-paths":
        other = data.draw(st.sampled_from(tensors), label="with")
        t["path"], other["path"] = other["path"], t["path"]
    else:
        comp = data.draw(st.sampled_from([c for c in doc["components"].values()
                                          if isinstance(c.get("sharded"), dict)]), label="component")
        items = comp["sharded"]["tree"]["d"]
        item = data.draw(st.sampled_from(items), label="item")
        item[1] = {"t": data.draw(st.integers(-1, 9), label="ref")}


@timeout
@fuzz("manifest")
@given(data=st.data())
def test_fuzz_sharded_manifest(world, data):
    """Geometry edits, generic JSON edits inside a `sharded` entry or anywhere, sealed again (most
    often), with the old seal, or unsealed."""
    template = data.draw(TEMPLATES, label="template")
    root, step = world.fresh_copy(template), DAMAGED[template]
    path = root / f"step-{step:010d}" / "manifest.json"
    doc = json.loads(path.read_bytes())
    old = doc.pop(HASH_KEY)
    how = data.draw(st.sampled_from(["geometry", "geometry", "entry", "anywhere"]), label="how")
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        if how == "geometry":
            try:
                geometry_edit(doc, data)
            except (KeyError, TypeError, IndexError, ValueError):
                break       # an earlier edit took the structure this one needs
        elif how == "entry":
            comp = data.draw(st.sampled_from(sorted(doc.get("components", {}))), label="component") \
                if isinstance(doc.get("components"), dict) and doc["components"] else None
            node = doc["components"][comp] if comp is not None else None
            if not isinstance(node, dict) or "sharded" not in node:
                break
            node["sharded"] = edit_json(node["sharded"], data)
        else:
            doc = edit_json(doc, data)
    mode = data.draw(st.sampled_from(["reseal", "reseal", "reseal", "stale-seal", "no-seal"]), label="seal")
    new, vouched = manifest_bytes(doc, mode, old)
    path.write_bytes(new)
    run_case(world, root, step, vouched, f"sharded-{how}-{mode}")


@timeout
@fuzz("data")
@given(data=st.data())
def test_fuzz_sharded_chunk_bytes(world, data):
    """One chunk record's bytes flipped or replaced: without updating its hash (refused), or with
    its hash and its file's size and hash updated in a resealed manifest (vouched: only the
    decoders stand between those bytes and the state)."""
    template = data.draw(TEMPLATES, label="template")
    root, step = world.fresh_copy(template), DAMAGED[template]
    folder = root / f"step-{step:010d}"
    doc = json.loads((folder / "manifest.json").read_bytes())
    c = data.draw(st.sampled_from([c for t in _tensors(doc) for c in t["chunks"] if c["length"]]), label="chunk")
    file = folder / c["file"]
    raw = file.read_bytes()
    record = raw[c["offset"]:c["offset"] + c["length"]]
    how = data.draw(st.sampled_from(["flip", "flip-rehash", "garbage-rehash"]), label="how")
    if how.startswith("flip"):
        record = flip(record, data.draw(st.integers(0, len(record) * 8 - 1), label="bit"))
    else:
        record = data.draw(st.binary(min_size=len(record), max_size=len(record)), label="bytes")
    raw = raw[:c["offset"]] + record + raw[c["offset"] + c["length"]:]
    file.write_bytes(raw)
    vouched = how.endswith("rehash")
    if vouched:
        c["hash"] = xxhash.xxh3_128_hexdigest(record)
        doc["files"][c["file"]].update(size=len(raw), hash=xxhash.xxh3_128_hexdigest(raw))
        (folder / "manifest.json").write_bytes(resealed(doc))
    outcome = run_case(world, root, step, vouched, f"sharded-data-{how}")
    if how == "flip":
        assert outcome == "refused", "a flipped bit in a chunk loaded"
