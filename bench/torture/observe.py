"""What a checkpoint root holds, seen behind async_ckpt's back (plain file system calls, or a raw
S3 client): every file and folder, the manifests, unfinished multipart uploads. From one
`Snapshot` the torture tells garbage (what a later commit must remove) and where a kill landed.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from async_ckpt.format.names import step_dir
from async_ckpt.storage import SCRATCH_PREFIXES

MANIFEST = "manifest.json"
METRICS_PREFIX = "metrics-"
_STEP = re.compile(r"^step-(\d+)$")
_SCRATCH_TIME = re.compile(r"^\.(?:tmp|write-probe)-(\d{20})-")


def scratch_time(name: str) -> float | None:
    """Creation time (s since the epoch) in a scratch object's name, None if it has none."""
    match = _SCRATCH_TIME.match(name)
    return int(match.group(1)) / 1e9 if match else None


@dataclass
class Snapshot:
    files: dict[str, int]                               # relative path -> size
    dirs: set[str] = field(default_factory=set)         # step folders (local: even empty ones)
    uploads: dict[str, str] = field(default_factory=dict)  # upload id -> relative key (S3)
    manifests: dict[int, dict] = field(default_factory=dict)  # committed step -> its JSON
    shm: set[str] = field(default_factory=set)          # /dev/shm buffers of dead savers

    def step_folders(self) -> dict[int, str]:
        found = {}
        for name in self.dirs | {p.split("/", 1)[0] for p in self.files if "/" in p} | \
                {k.split("/", 1)[0] for k in self.uploads.values() if "/" in k}:
            match = _STEP.match(name)
            if match:
                found[int(match.group(1))] = name
        return found

    def committed(self) -> set[int]:
        return {s for s, d in self.step_folders().items() if f"{d}/{MANIFEST}" in self.files}

    def in_folder(self, step: int) -> dict[str, int]:
        prefix = step_dir(step) + "/"
        return {p[len(prefix):]: n for p, n in self.files.items() if p.startswith(prefix)}

    def garbage(self) -> dict[tuple[str, str], float | None]:
        """Every leftover a later commit must remove: item -> scratch time (scratch objects:
        the engine's sweep leaves those younger than its grace period) or None."""
        items: dict[tuple[str, str], float | None] = {}
        committed = self.committed()
        for step, folder in self.step_folders().items():
            names = self.in_folder(step)
            if step not in committed:
                for name in names:
                    items[("uncommitted", f"{folder}/{name}")] = None
                if not names and folder in self.dirs:
                    items[("empty folder", folder)] = None
                continue
            doc = self.manifests.get(step, {})
            listed = set(doc.get("files", {})) | set(doc.get("fragments", {})) | {MANIFEST}
            for name in names:
                if name.startswith(SCRATCH_PREFIXES):
                    items[("scratch", f"{folder}/{name}")] = scratch_time(name)
                elif name not in listed and not name.startswith(METRICS_PREFIX):
                    items[("unlisted", f"{folder}/{name}")] = None
        for path in self.files:
            # A writer lease is the CLI's business: a live writer's is no garbage, a dead one's is
            # swept by the next commit (tests/test_nothing_dropped.py checks that).
            if "/" not in path and not path.startswith(".writer-lease-"):
                kind = "scratch" if path.startswith(SCRATCH_PREFIXES) else "stray"
                items[(kind, path)] = scratch_time(path) if kind == "scratch" else None
        for upload, key in self.uploads.items():
            items[("upload", f"{key}#{upload[:16]}")] = None
        for name in self.shm:
            items[("shm", name)] = None
        return items


def local_snapshot(root: str) -> Snapshot:
    files, dirs = {}, set()
    if os.path.isdir(root):
        for dirpath, _dirs, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            if rel != "." and "/" not in rel:
                dirs.add(rel)
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    files[os.path.relpath(path, root)] = os.lstat(path).st_size
                except FileNotFoundError:
                    pass
    snap = Snapshot(files, dirs)
    for step, folder in snap.step_folders().items():
        path = os.path.join(root, folder, MANIFEST)
        if os.path.exists(path):
            snap.manifests[step] = _parse(open(path, "rb").read())
    return snap


def s3_snapshot(client, url: str) -> Snapshot:
    bucket, prefix = url[len("s3://"):].split("/", 1)
    prefix = prefix.rstrip("/") + "/"
    files = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            files[obj["Key"][len(prefix):]] = obj["Size"]
    uploads = {}
    found = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    for up in found.get("Uploads", []):
        uploads[up["UploadId"]] = up["Key"][len(prefix):]
    snap = Snapshot(files, set(), uploads)
    for step in snap.committed():
        body = client.get_object(Bucket=bucket, Key=f"{prefix}{step_dir(step)}/{MANIFEST}")["Body"].read()
        snap.manifests[step] = _parse(body)
    return snap


def _parse(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}


def landing(snap: Snapshot, inflight: int | None, known: set, last_line: str) -> str:
    """Where the kill landed, as far as the root tells: `inflight` is the step whose save was
    running (None: no save was), `known` the garbage items seen before this run started."""
    if last_line in ("", "loaded") or last_line.startswith("ready"):
        return "opening"
    if inflight is None:
        return "retention" if last_line.startswith("committed") else "idle"
    if inflight in snap.committed():
        return "after commit"        # sweep, retention, or reporting the commit
    folder = step_dir(inflight)
    new = {n: size for n, size in snap.in_folder(inflight).items()
           if ("uncommitted", f"{folder}/{n}") not in known}
    if any(n.startswith(".tmp-") and n.endswith(MANIFEST) for n in new):
        return "mid-commit"
    uploads = [k for u, k in snap.uploads.items() if k.startswith(folder + "/")
               and ("upload", f"{k}#{u[:16]}") not in known]
    data = {n: s for n, s in new.items() if n.startswith("data-")}
    if uploads:
        return "mid-upload"
    if not data:
        return "staging"
    if _complete(snap, data):
        return "written"
    return "mid-write"


def _complete(snap: Snapshot, data: dict[str, int]) -> bool:
    """Whether these data files have the sizes the newest committed step's have (same layout;
    compressed files within 0.5%)."""
    if not snap.manifests:
        return False
    newest = snap.manifests[max(snap.manifests)]
    sizes = sorted(f.get("size", 0) for f in newest.get("files", {}).values())
    have = sorted(data.values())
    return len(sizes) == len(have) and all(abs(a - b) <= 0.005 * b for a, b in zip(have, sizes, strict=True))
