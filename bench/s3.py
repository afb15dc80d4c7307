"""S3 benchmark: async_ckpt against raw s3fs on a loopback SeaweedFS, in the same run.

One synthetic fp32 state (default ~1 GiB of normal noise in 16 tensors) and a SeaweedFS `weed
mini` started on 127.0.0.1 by this script (async_ckpt.storage.testing.servers, the launcher the
tests and storage/seaweedfs.sh use; stopped by PID at the end). With ASYNC_CKPT_S3_ENDPOINT set
(e.g. by storage/ceph_rgw.sh for Ceph RGW) it uses that server instead, and removes what it wrote
there at the end. Each run writes under a fresh prefix of the bucket "bench".

Measured, each as the median over ``--repeats`` with min/max, methods interleaved per round with
the order rotated so background load hits all of them alike:

- raw ``s3fs.pipe_file`` of the same bytes as one object (the floor a checkpoint write is judged
  against; target: async_ckpt's durable commit <= 1.15x of it);
- ``AsyncCheckpointer.save(step)`` until ``handle.wait()`` returns (manifest committed), with
  compression None and "zstd" (each after one unmeasured warm-up save);
- ``AsyncCheckpointer.load(step)`` (ranged concurrent GETs, every hash verified, zstd decoded)
  against raw ``s3fs.cat_file`` of the one object.

    python -m bench.s3 [--size-gib 1.0] [--tensors 16] [--repeats 5] [--out bench/results/s3.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent
from async_ckpt.storage.testing import servers

from .common import GIB, machine_info

TARGET_COMMIT = 1.15   # x raw s3fs pipe of the same bytes


class TensorState:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.loaded = None

    def state_dict(self) -> dict:
        return dict(self.tensors)

    def load_state_dict(self, sd: dict) -> None:
        self.loaded = sd


def make_state(nbytes: int, count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    per = max(1, nbytes // 4 // count)
    return {f"t{i:02d}": torch.randn(per, generator=g) for i in range(count)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=args.dir))
    external = servers.from_environment()
    server = external or servers.start_seaweed(workdir)
    label = (f"the S3 server at {server.endpoint} (ASYNC_CKPT_S3_ENDPOINT)" if external
             else "SeaweedFS 4.48 weed mini on 127.0.0.1 (GOMEMLIMIT=768MiB)")
    run_id = uuid.uuid4().hex[:8]
    fs = None
    try:
        base = f"{server.make_bucket('bench')}/{run_id}"   # bucket/prefix of this run
        options = server.storage_options()
        import s3fs
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        tensors = make_state(int(args.size_gib * GIB), args.tensors)
        blob = b"".join(t.numpy().tobytes() for t in tensors.values())
        nbytes = len(blob)
        ckpts = {c: AsyncCheckpointer(f"s3://{base}/ckpt-{c or 'raw'}",
                                      [StateComponent("m", TensorState(tensors), SharingPattern.GLOBAL)],
                                      storage_options=options, compression=c, keep_last=1)
                 for c in (None, "zstd")}
        stored: dict[str, list[int]] = {"none": [], "zstd": []}
        step = {c: 0 for c in ckpts}

        def save(c):
            def go():
                info = ckpts[c].save(step[c]).wait()
                stored["zstd" if c else "none"].append(info.stored_nbytes)
            return go

        def load(c):
            reader = AsyncCheckpointer(f"s3://{base}/ckpt-{c or 'raw'}",
                                       [StateComponent("m", TensorState({}), SharingPattern.GLOBAL)],
                                       storage_options=options)
            return lambda: reader.load(step[c] - 1)

        raw_key = f"{base}/raw/blob.bin"
        methods = {
            "raw_pipe": lambda: fs.pipe_file(raw_key, blob),
            "commit_none": save(None),
            "commit_zstd": save("zstd"),
        }
        for c in ckpts:        # warm-up: buffers allocated, connections open; not measured
            save(c)()
            ckpts[c].wait()
            step[c] += 1
        fs.pipe_file(raw_key, blob)
        samples: dict[str, list[float]] = {k: [] for k in (*methods, "raw_cat", "load_none", "load_zstd")}
        names = list(methods)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name].append(timed(methods[name]))
                for c in ckpts:
                    ckpts[c].wait()   # retention of the previous step runs outside the timing
                if name.startswith("commit"):
                    step[None if name == "commit_none" else "zstd"] += 1
            reads = {"raw_cat": lambda: fs.cat_file(raw_key), "load_none": load(None),
                     "load_zstd": load("zstd")}
            order = list(reads)
            for name in order[r % 3:] + order[:r % 3]:
                samples[name].append(timed(reads[name]))
            print(f"round {r + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]:.2f}s" for k, v in samples.items()), flush=True)
        for ck in ckpts.values():
            ck.close()
        return {"nbytes": nbytes, "samples": samples, "stored": stored,
                "server": label, "machine": machine_info(str(workdir))}
    finally:
        if external and fs is not None:     # someone else's server: leave nothing behind
            try:
                fs.rm(base, recursive=True)
            except Exception as exc:  # noqa: BLE001 - cleanup only
                print(f"could not remove s3://{base}: {exc}", file=sys.stderr)
        server.stop()                        # by PID; a no-op for an external server


def summarise(doc: dict) -> tuple[list[dict], list[str]]:
    s, n = doc["samples"], doc["nbytes"]
    labels = {"raw_pipe": ("raw s3fs pipe_file (floor)", "raw_pipe"),
              "commit_none": ("async_ckpt save() -> committed, compression=None", "raw_pipe"),
              "commit_zstd": ("async_ckpt save() -> committed, compression=zstd", "raw_pipe"),
              "raw_cat": ("raw s3fs cat_file (floor)", "raw_cat"),
              "load_none": ("async_ckpt load(), compression=None (hashes verified)", "raw_cat"),
              "load_zstd": ("async_ckpt load(), compression=zstd (hashes verified)", "raw_cat")}
    rows = []
    for key, (label, base) in labels.items():
        med, base_med = statistics.median(s[key]), statistics.median(s[base])
        rows.append({"key": key, "label": label, "samples_s": s[key], "median_s": med,
                     "min_s": min(s[key]), "max_s": max(s[key]), "gib_per_s": n / GIB / med,
                     "ratio": med / base_med, "ratio_vs": base,
                     "ratio_of_mins": min(s[key]) / min(s[base])})
    verdicts = []
    for row in rows:
        if row["key"].startswith("commit"):
            ok = row["ratio"] <= TARGET_COMMIT
            verdicts.append(f"- {row['label']}: {row['ratio']:.2f}x raw pipe "
                            f"(target <= {TARGET_COMMIT:.2f}x): {'MET' if ok else 'MISSED'}")
    return rows, verdicts


def markdown(rows: list[dict], verdicts: list[str], doc: dict, repeats: int) -> str:
    m = doc["machine"]
    zstd = statistics.median(doc["stored"]["zstd"]) / doc["nbytes"] if doc["stored"]["zstd"] else 0
    lines = [f"### async_ckpt on S3: {doc['nbytes'] / GIB:.3f} GiB fp32 noise, {repeats} repeats "
             f"({m['cpu_count']} CPUs, torch {m['torch']}, {doc['server']})", "",
             "Client and server share the machine's cores. Ratios divide medians of this run; "
             "'ratio (mins)' divides the fastest samples, less sensitive to other load. "
             f"zstd stored/raw: {zstd:.3f}.", "",
             "| method | median s | min s | max s | GiB/s | ratio (medians) | ratio (mins) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} [n={len(r['samples_s'])}] | {r['median_s']:.3f} | {r['min_s']:.3f} "
                     f"| {r['max_s']:.3f} | {r['gib_per_s']:.2f} | {r['ratio']:.2f}x {r['ratio_vs']} "
                     f"| {r['ratio_of_mins']:.2f}x |")
    return "\n".join(lines + [""] + verdicts) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench/results/s3.json")
    p.add_argument("--dir", default=None, help="where SeaweedFS keeps its data (default: a temp dir)")
    args = p.parse_args()
    doc = run(args)
    rows, verdicts = summarise(doc)
    text = markdown(rows, verdicts, doc, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**doc, "rows": rows, "verdicts": verdicts}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
