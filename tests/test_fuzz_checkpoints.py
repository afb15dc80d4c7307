"""A property-based fuzzer (hypothesis) of hostile checkpoint folders (issue 14, item 7).

Each case copies a committed checkpoint (steps 1 and 2 of a rich state, raw or zstd, with a late
metrics file), damages step 2 with one drawn mutation, then calls load(2), list_checkpoints() and
latest_step() on fresh components. The only outcomes allowed:

    exact       the saved state, bit for bit
    different   another state: only where the mutation vouched for itself (a manifest edit that
                was sealed again, or a record changed together with its hash), as a hostile
                editor could; the seal and the record hashes stop damage, not editors
    refused     a CheckpointError from the readers' own checks, with no component touched

and never another exception, a CheckpointError from the readers' safety net (guard.py, "unexpected
..."), a call that blocks (every call runs under a bound; a FIFO is released if a read blocks on
it), a change to any file, or memory growth beyond a bound (the process's peak RSS, checked after
every case: a mutation claiming a terabyte must not allocate it). Listing never raises and always
shows step 1; a damaged metrics file never changes the state and never yields a value that is not
a float.

Profiles (ASYNC_CKPT_TESTS, tests/support/profile.py): ci (the default: 4 x 80 cases with a fixed
seed, so CI runs the same cases every time) or full (10,200 cases and about a hundred filesystem
combinations, random): see docs/reliability.md, "Fuzzing".
ASYNC_CKPT_FUZZ_REPORT=path writes the outcome table as JSON.
"""
from __future__ import annotations

import collections
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import async_ckpt as ac
from async_ckpt import CheckpointError
from async_ckpt.format import seal
from async_ckpt.format.manifest import HASH_KEY
from async_ckpt.format.metrics_file import HASH_KEY as METRICS_HASH_KEY
from async_ckpt.format.tree import flatten
from async_ckpt.load.guard import UNEXPECTED
from async_ckpt.storage.testing.conformance import bounded
from support.corruption import resealed
from support.fuzz_edits import SCALARS, TEMPLATES, dumps, edit_json, flip, manifest_bytes, value
from support.profile import FULL, PROFILE
from support.stateful import Box

pytestmark = pytest.mark.fuzz
G = ac.SharingPattern.GLOBAL
# Cases per target. The filesystem target's space is small: hypothesis stops once it has tried
# every combination (about a hundred), so the others make up the 10,000 of a full run.
EXAMPLES = {"manifest": 3600, "data": 3600, "metrics": 3000, "fs": 1000} if FULL else \
    {"manifest": 80, "data": 80, "metrics": 80, "fs": 80}
RSS_BOUND = 512 << 20                    # peak RSS growth allowed over the whole run
VM_BOUND = 4 << 30                       # peak virtual memory growth: untouched allocations too
CALL_BOUND_S = 60.0


def fuzz(target: str):
    return settings(max_examples=EXAMPLES[target], deadline=None, database=None, derandomize=not FULL,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                            HealthCheck.filter_too_much])
timeout = pytest.mark.timeout(4 * 3600 if FULL else 900)


# -- the checkpoints --------------------------------------------------------------------------------
def rich_state(step: int) -> dict:
    t = torch.arange(6, dtype=torch.float64) / 7
    return {
        "w": torch.arange(4096, dtype=torch.float32) * 0.25 + step,
        "ids": torch.arange(1000, dtype=torch.int64) * 3 + step,
        "half": torch.linspace(-1, 1, 333).to(torch.bfloat16),
        "c64": torch.complex(torch.arange(8.0), -torch.arange(8.0)).to(torch.complex64),
        "bool": torch.arange(7) % 2 == 0,
        "empty": torch.zeros(3, 0),
        "scalar": torch.tensor(2.5),
        "np": numpy.arange(12, dtype=numpy.int16).reshape(3, 4) * step,
        "tied": (t, t),
        "meta": {"lr": 0.1, "name": "b", "step": step, "betas": (0.9, 0.999), "inf": float("inf"),
                 "nan": float("nan"), "dt": torch.float16, 3: None,
                 "od": collections.OrderedDict([("z", 1), ("a", [1, 2.5, "x"])])},
    }


def a_state(step: int) -> dict:
    torch.manual_seed(step)
    return dict(torch.nn.Linear(16, 8).state_dict())


def canon(state: Any) -> tuple:
    """An exact, comparable form of a state: its JSON skeleton and each tensor's dtype, shape and
    bytes (NaN payloads, -0.0, NumPy arrays, tuples and tied tensors all count)."""
    skel, tensors = flatten(state, "")
    return (json.dumps(skel), [(str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8)
                                .numpy().tobytes() if t.numel() else b"") for t in tensors])


EXPECTED = {"a": canon(a_state(2)), "b": canon(rich_state(2))}


def make_template(root: Path, compression: str | None) -> Path:
    for step in (1, 2):
        comps = [ac.StateComponent("a", Box(a_state(step)), G), ac.StateComponent("b", Box(rich_state(step)), G)]
        with ac.AsyncCheckpointer(root, comps, compression=compression) as ckpt:
            ckpt.save(step, metrics={"loss": 1.0 / step}).wait()
            ckpt.report_metrics(step, {"acc": 0.25 * step})
    return root


class World:
    """The templates, the folder each case works in, and the tally."""

    def __init__(self, base: Path):
        self.base = base
        self.templates = {c or "raw": make_template(base / f"template-{c or 'raw'}", c) for c in (None, "zstd")}
        self.work = base / "work"
        self.outside = base / "outside"
        self.outcomes: collections.Counter = collections.Counter()
        self.cases = 0
        self.started = time.monotonic()
        self.rss_start = peak_rss()
        self.rss_peak = self.rss_start
        self.vm_start = self.vm_peak = peak_vm()
        self.growth: collections.Counter = collections.Counter()    # peak RSS growth by kind

    def fresh_copy(self, template: str) -> Path:
        for path in (self.work, self.outside):
            if path.is_symlink():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
        shutil.copytree(self.templates[template], self.work, symlinks=True)
        self.outside.mkdir()
        return self.work


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_vm() -> int:
    """The process's peak virtual size (VmPeak): an allocation counts even if never touched."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmPeak:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("fuzz"))
    yield w
    report = {"profile": PROFILE, "cases": w.cases, "outcomes": dict(w.outcomes),
              "seconds": round(time.monotonic() - w.started, 1),
              "peak_rss_mib": round(w.rss_peak / 2 ** 20, 1),
              "peak_rss_growth_mib": round((w.rss_peak - w.rss_start) / 2 ** 20, 1),
              "peak_vm_growth_mib": round((w.vm_peak - w.vm_start) / 2 ** 20, 1),
              "growth_by_kind_mib": {k: round(v / 2 ** 20, 1) for k, v in w.growth.most_common(5)}}
    print("\nfuzz:", json.dumps(report))
    if os.environ.get("ASYNC_CKPT_FUZZ_REPORT"):
        Path(os.environ["ASYNC_CKPT_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")


# -- running one case ---------------------------------------------------------------------------------
def step_folder(root: Path, step: int = 2) -> Path:
    return root / f"step-{step:010d}"


def files_of(root: Path) -> dict:
    """Everything under the root without following symlinks or opening FIFOs (big files by size:
    a case may make a sparse giant)."""
    seen = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            p = Path(folder) / name
            if p.is_symlink():
                seen[str(p)] = ("link", os.readlink(p))
            elif p.is_fifo() or not p.exists():
                seen[str(p)] = ("special",)
            elif p.is_file():
                st_ = p.stat()
                seen[str(p)] = ("file", st_.st_size, xxhash.xxh3_64_hexdigest(p.read_bytes())
                                if st_.st_size < 1 << 24 else st_.st_mtime_ns)
    return seen


def fifos(root: Path) -> tuple[str, ...]:
    return tuple(str(Path(f) / n) for f, _, names in os.walk(root) for n in names if (Path(f) / n).is_fifo())


def run_case(world: World, root: Path, vouched: bool, metrics_check: Callable[[dict], None] | None = None,
             kind: str = "") -> str:
    """load(2), list, latest on fresh components; the outcome, after checking every property."""
    world.cases += 1
    before = files_of(root) | files_of(world.outside)
    a, b = Box(), Box()
    ckpt = ac.AsyncCheckpointer(root, [ac.StateComponent("a", a, G), ac.StateComponent("b", b, G)])
    blocking = fifos(root)
    try:
        try:
            info = bounded(lambda: ckpt.load(2), CALL_BOUND_S, blocking)
        except CheckpointError as exc:
            assert not (type(exc) is CheckpointError and str(exc).startswith(UNEXPECTED)), \
                f"the readers' safety net caught {exc.__cause__!r}: a reader lacks a precise check"
            assert a.loads == 0 and b.loads == 0, "a refused load changed a component"
            outcome = "refused"
        else:
            assert info.step == 2 and a.loads == 1 and b.loads == 1
            exact = canon(a.loaded) == EXPECTED["a"] and canon(b.loaded) == EXPECTED["b"]
            outcome = "exact" if exact else "different"
            assert exact or vouched, "an unvouched mutation loaded a different state"
            assert all(isinstance(v, float) for v in info.metrics.values()), info.metrics
            if metrics_check is not None:
                metrics_check(info.metrics)
        infos = bounded(ckpt.list_checkpoints, CALL_BOUND_S, blocking)
        assert 1 in [i.step for i in infos], "damage to step 2 hid step 1"
        assert all(isinstance(v, float) for i in infos for v in i.metrics.values())
        assert bounded(ckpt.latest_step, CALL_BOUND_S, blocking) in (1, 2)
    finally:
        ckpt.close()
    assert files_of(root) | files_of(world.outside) == before, "reading changed files"
    if peak_rss() > world.rss_peak:
        world.growth[kind] += peak_rss() - world.rss_peak
    world.rss_peak, world.vm_peak = max(world.rss_peak, peak_rss()), max(world.vm_peak, peak_vm())
    assert world.rss_peak - world.rss_start < RSS_BOUND, \
        f"peak RSS grew by {(world.rss_peak - world.rss_start) >> 20} MiB"
    assert world.vm_peak - world.vm_start < VM_BOUND, \
        f"peak virtual memory grew by {(world.vm_peak - world.vm_start) >> 20} MiB"
    world.outcomes[f"{kind}:{outcome}"] += 1
    return outcome


# -- the targets ------------------------------------------------------------------------------------------
@timeout
@fuzz("manifest")
@given(data=st.data())
def test_fuzz_manifest(world, data):
    """JSON-level edits of any field (sealed again, with the old seal, or unsealed) and byte-level
    damage (bit flips, truncation, a byte inserted or removed)."""
    root = world.fresh_copy(data.draw(TEMPLATES, label="template"))
    path = step_folder(root) / "manifest.json"
    raw = path.read_bytes()
    if data.draw(st.booleans(), label="json-level"):
        doc = json.loads(raw)
        old = doc.pop(HASH_KEY)
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            doc = edit_json(doc, data)
        mode = data.draw(st.sampled_from(["reseal", "reseal", "reseal", "stale-seal", "no-seal"]), label="seal")
        new, vouched = manifest_bytes(doc, mode, old)
        kind = f"manifest-json-{mode}"
    else:
        how = data.draw(st.sampled_from(["flip", "flip", "truncate", "insert", "remove"]), label="how")
        at = data.draw(st.integers(0, len(raw) * 8 - 1), label="at")
        new = {"flip": lambda: flip(raw, at), "truncate": lambda: raw[:at // 8],
               "insert": lambda: raw[:at // 8] + bytes([at % 256]) + raw[at // 8:],
               "remove": lambda: raw[:at // 8] + raw[at // 8 + 1:]}[how]()
        vouched, kind = False, f"manifest-bytes-{how}"
    path.write_bytes(new)
    run_case(world, root, vouched, kind=kind)


def _records(root: Path) -> list[dict]:
    doc = json.loads((step_folder(root) / "manifest.json").read_bytes())
    return [t for c in doc["components"].values() for s in c["shards"].values() for t in s["tensors"]]


@timeout
@fuzz("data")
@given(data=st.data())
def test_fuzz_data_files(world, data):
    """Bit flips, truncation, extension and zeroed ranges of a data file; and the same inside one
    record with its hash (and the file's size) updated in a resealed manifest, so that only the
    decoders stand between the bytes and the state (zstd frames, plane lengths)."""
    root = world.fresh_copy(data.draw(TEMPLATES, label="template"))
    folder = step_folder(root)
    (data_file,) = folder.glob("data-*.bin")
    raw = data_file.read_bytes()
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "zero", "record-rehash",
                                     "record-rehash", "record-garbage-rehash", "truncate-resized"]), label="how")
    vouched = how.endswith(("rehash", "resized"))
    manifest = json.loads((folder / "manifest.json").read_bytes())
    if how == "flip":
        new = flip(raw, data.draw(st.integers(0, len(raw) * 8 - 1)))
    elif how in ("truncate", "truncate-resized"):
        new = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif how == "extend":
        new = raw + data.draw(st.binary(min_size=1, max_size=4096))
    elif how == "zero":
        start = data.draw(st.integers(0, len(raw) - 1))
        end = min(len(raw), start + data.draw(st.integers(1, 8192)))
        new = raw[:start] + bytes(end - start) + raw[end:]
    else:
        tensors = [t for c in manifest["components"].values() for s in c["shards"].values()
                   for t in s["tensors"] if t["length"]]
        t = data.draw(st.sampled_from(tensors), label="record")
        record = raw[t["offset"]:t["offset"] + t["length"]]
        if how == "record-rehash":
            record = flip(record, data.draw(st.integers(0, len(record) * 8 - 1)))
        else:
            record = data.draw(st.binary(min_size=len(record), max_size=len(record)))
        new = raw[:t["offset"]] + record + raw[t["offset"] + t["length"]:]
        t["hash"] = xxhash.xxh3_128_hexdigest(record)
    if how.endswith(("rehash", "resized")):
        for f in manifest["files"].values():
            f["size"], f["hash"] = len(new), xxhash.xxh3_128_hexdigest(new)
        (folder / "manifest.json").write_bytes(resealed(manifest))
    data_file.write_bytes(new)
    run_case(world, root, vouched, kind=f"data-{how}")


def number(value: Any) -> float | None:
    """What a metric value is worth, judged without the reader's code: numbers and numeric
    strings a float can hold; nothing else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def same_metrics(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(
        (g != g and w != w) or (g == w and math.copysign(1, g) == math.copysign(1, w))
        for g, w in zip(got.values(), want.values()))


@timeout
@fuzz("metrics")
@given(data=st.data())
def test_fuzz_metrics_files(world, data):
    """Late metrics files with odd values (sealed or not), damaged seals, random bytes, odd JSON
    documents: the state always loads exactly, and metrics are floats from intact files only."""
    root = world.fresh_copy(data.draw(TEMPLATES, label="template"))
    folder = step_folder(root)
    (late,) = folder.glob("metrics-*.json")
    how = data.draw(st.sampled_from(["odd-values", "odd-values", "flip", "random-bytes", "odd-document"]))
    base = {"loss": 0.5}          # from the manifest; the late file adds "acc": 0.5
    if how == "odd-values":       # a new file, merged before the real one (name order)
        doc = data.draw(st.dictionaries(st.sampled_from(["loss", "acc", "x", "", METRICS_HASH_KEY, "ü"]),
                                        SCALARS, max_size=5), label="metrics")
        body = dumps(doc)
        sealed = data.draw(st.booleans()) and METRICS_HASH_KEY not in doc
        (folder / "metrics-00000000000000000001-0dd0dd00.json").write_bytes(
            seal.seal(body, METRICS_HASH_KEY) if sealed else body)
        used = {} if METRICS_HASH_KEY in doc else {k: number(v) for k, v in doc.items() if number(v) is not None}
        allowed = [{**base, **used, "acc": 0.5}]
    else:
        raw = late.read_bytes()
        if how == "flip":
            late.write_bytes(flip(raw, data.draw(st.integers(0, len(raw) * 8 - 1))))
            allowed = [{**base, "acc": 0.5}, base]     # the file's metrics, or none of them
        else:
            new = data.draw(st.binary(max_size=200)) if how == "random-bytes" else dumps(value(data))
            late.write_bytes(new)
            try:
                doc = json.loads(new)
            except (ValueError, RecursionError):
                doc = None
            used = {k: number(v) for k, v in doc.items() if number(v) is not None} \
                if isinstance(doc, dict) and METRICS_HASH_KEY not in doc else {}
            allowed = [{**base, **used}]

    def check(metrics: dict) -> None:
        assert any(same_metrics(metrics, want) for want in allowed), (metrics, allowed)
    run_case(world, root, vouched=False, metrics_check=check, kind=f"metrics-{how}")


FS_KINDS = ["symlink-dev-zero", "symlink-outside", "symlink-inside", "fifo", "folder", "sparse-giant"]


@timeout
@fuzz("fs")
@given(data=st.data())
def test_fuzz_filesystem(world, data):
    """What a checkpoint file can be instead of a regular file inside the root: symlinks (to
    /dev/zero, out of the root, to a sibling), FIFOs, folders, a sparse file of 1 TiB; for the
    manifest, a metrics file, a data file or the whole step folder, combined with a drawn size
    claim for the data file."""
    root = world.fresh_copy(data.draw(TEMPLATES, label="template"))
    folder = step_folder(root)
    target = data.draw(st.sampled_from(["manifest", "metrics", "data", "step-folder"]), label="target")
    kind = data.draw(st.sampled_from(FS_KINDS), label="kind")
    path = {"manifest": folder / "manifest.json", "metrics": next(folder.glob("metrics-*.json")),
            "data": next(folder.glob("data-*.bin")), "step-folder": folder}[target]
    vouched = False
    if kind == "sparse-giant":
        if target == "step-folder":
            kind, target = "sparse-giant", "data"
            path = next(folder.glob("data-*.bin"))
        with open(path, "r+b") as f:
            f.truncate(1 << 40)
        if target == "data" and data.draw(st.booleans(), label="claim"):
            manifest = json.loads((folder / "manifest.json").read_bytes())
            for f in manifest["files"].values():
                f["size"] = 1 << 40
            t = data.draw(st.sampled_from(_records(root)), label="record")
            for c in manifest["components"].values():
                for s in c["shards"].values():
                    for entry in s["tensors"]:
                        if entry == t:
                            entry.update(dtype="uint8", shape=[(1 << 40) - entry["offset"]], codec="raw",
                                         nbytes=(1 << 40) - entry["offset"], length=(1 << 40) - entry["offset"])
                            entry.pop("frames", None)
            (folder / "manifest.json").write_bytes(resealed(manifest))
            vouched = True
    else:
        moved = world.outside / path.name
        if path.is_dir():
            shutil.move(path, moved)
        else:
            shutil.copyfile(path, moved)
            path.unlink()
        if kind == "symlink-dev-zero":
            path.symlink_to("/dev/zero")
        elif kind == "symlink-outside":
            path.symlink_to(moved)
        elif kind == "symlink-inside":
            sibling = step_folder(root, 1) if target == "step-folder" else \
                path.with_name(path.name + ".real")
            if target != "step-folder":
                shutil.copyfile(moved, sibling)
            path.symlink_to(sibling.name)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.mkdir()
    check = None
    if target == "metrics":
        def check(metrics: dict) -> None:
            assert metrics in ({"loss": 0.5, "acc": 0.5}, {"loss": 0.5}), metrics
    outcome = run_case(world, root, vouched, metrics_check=check, kind=f"fs-{target}-{kind}")
    if target in ("manifest", "data", "step-folder") and kind != "sparse-giant":
        assert outcome == "refused", f"{kind} as {target} was read"


def test_fuzz_profile_is_known():
    """The marker selects these tests; the profile decides how many cases they run."""
    assert sum(EXAMPLES.values()) - EXAMPLES["fs"] + 100 >= (10_000 if FULL else 300)
