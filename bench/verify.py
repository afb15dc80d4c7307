"""`async-ckpt verify` against the raw cold read of the same bytes (target: verify runs at >= 0.8x
the raw read's speed).

One checkpoint of a synthetic state (bench/harness/state.py, ``fp32`` by default) is saved once.
Then every round runs both methods, order alternated, each cold (``sync`` + ``drop_caches``
first, where this process may):

- ``raw``: every file of the checkpoint (data files and manifest) read with ``readinto`` into one
  already faulted buffer, no hashing: the floor;
- ``verify``: what ``async-ckpt verify ROOT`` runs, called in process
  (`async_ckpt.cli.verify.verify_steps`): manifest, sizes, the whole-file and every record's
  xxh3-128, files in parallel.

Reports medians, min-max, and the speed ratio raw time / verify time (of medians, same-round
median, best against best). Writes ``<out>.json`` and ``<out>.md``.

    python -m bench.verify [--size-gib 1] [--repeats 5] [--mix fp32] [--dir PATH] [--compression zstd]
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent
from async_ckpt.cli.verify import verify_steps
from async_ckpt.storage import open_storage

from .common import GIB, PageCache, TensorState, machine_info
from .harness.state import make_state, state_bytes


def _files(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)


class VerifyBench:
    def __init__(self, root: str, cache: PageCache):
        self.root, self.cache = root, cache
        self.paths = _files(root)
        self.nbytes = sum(os.path.getsize(p) for p in self.paths)
        largest = max(os.path.getsize(p) for p in self.paths)
        self.buf = mmap.mmap(-1, max(largest, 1))
        self.buf.write(b"\0" * len(self.buf))          # faulted in: the floor is the steady state
        self.storage = open_storage(root)
        self.samples: dict[str, list[float]] = {"raw": [], "verify": []}

    def raw(self) -> None:
        self.cache.settle()
        t0 = time.perf_counter()
        for path in self.paths:
            view = memoryview(self.buf)[:os.path.getsize(path)]
            with open(path, "rb", buffering=0) as f:
                while len(view):
                    n = f.readinto(view[:1 << 30])
                    if not n:
                        raise RuntimeError(f"{path} shrank during the benchmark")
                    view = view[n:]
        self.samples["raw"].append(time.perf_counter() - t0)

    def verify(self) -> None:
        self.cache.settle()
        t0 = time.perf_counter()
        results = verify_steps(self.storage, [0])
        self.samples["verify"].append(time.perf_counter() - t0)
        if not all(r.ok for r in results):
            raise RuntimeError(f"verify found problems in an intact checkpoint: {results}")

    def run(self, repeats: int, log) -> None:
        for r in range(repeats):
            for fn in ((self.raw, self.verify) if r % 2 == 0 else (self.verify, self.raw)):
                fn()
            log(f"  round {r + 1}/{repeats}: raw {self.samples['raw'][-1]:.3f} s, "
                f"verify {self.samples['verify'][-1]:.3f} s")

    def summary(self) -> dict:
        raw, ver = self.samples["raw"], self.samples["verify"]
        rows = []
        for method, vals in self.samples.items():
            med = statistics.median(vals)
            rows.append({"method": method, "median_s": med, "min_s": min(vals), "max_s": max(vals),
                         "samples_s": vals, "gib_per_s": self.nbytes / GIB / med})
        return {"bytes": self.nbytes, "files": len(self.paths), "rows": rows,
                "speed_vs_raw": statistics.median(raw) / statistics.median(ver),
                "speed_vs_raw_paired": statistics.median(r / v for r, v in zip(raw, ver, strict=True)),
                "speed_vs_raw_best": min(raw) / min(ver)}


def markdown(result: dict) -> str:
    s, m = result["summary"], result["machine"]
    out = [f"# Verify benchmark\n\nCommand: `{result['command']}`; {result['seconds']:.0f} s; "
           f"page cache: {result['page_cache']}.\n",
           f"Machine: {m['cpu_model']}, {m['cpu_affinity']} CPUs, torch {m['torch']}, target "
           f"{m['target_fs'].get('fstype')} at {m['target_dir']}; async_ckpt at {m['git_commit'][:10]}.\n",
           f"Checkpoint: {s['bytes'] / 2**20:.0f} MiB in {s['files']} files ({result['mix']}, "
           f"compression {result['compression']}). Cells: median (min-max) seconds, both methods "
           "cold, interleaved.\n",
           "| method | cold s | GiB/s |\n|---|---|---:|"]
    for r in s["rows"]:
        out.append(f"| {r['method']} | {r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | "
                   f"{r['gib_per_s']:.2f} |")
    out.append(f"\nverify speed / raw cold read speed: {s['speed_vs_raw']:.2f} (medians), "
               f"{s['speed_vs_raw_paired']:.2f} (same round), {s['speed_vs_raw_best']:.2f} (best vs best); "
               "target >= 0.8.")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--mix", default="fp32", choices=["fp32", "bf16_adam"])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compression", default=None, choices=[None, "zstd"])
    p.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp "
                   "folder under the current directory)")
    p.add_argument("--out", default=os.path.join("bench", "results", "verify"))
    p.add_argument("--no-drop-caches", action="store_true", help="only sync (cold reads are then warm)")
    args = p.parse_args(argv)
    cache = PageCache(not args.no_drop_caches)
    if not cache.can_drop and not args.no_drop_caches:
        print(f"warning: {cache.describe()}: cold reads will be warm", file=sys.stderr)
    folder = tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir or ".")
    t0 = time.perf_counter()
    try:
        state = make_state(int(args.size_gib * GIB), args.mix, args.layers)
        root = os.path.join(folder, "ckpt")
        with AsyncCheckpointer(root, [StateComponent("model", TensorState(state), SharingPattern.GLOBAL)],
                               compression=args.compression) as ck:
            ck.save(0).wait()
        nbytes = state_bytes(state)
        del state
        bench = VerifyBench(root, cache)
        print(f"verify benchmark: {bench.nbytes / 2**20:.0f} MiB checkpoint ({nbytes / 2**20:.0f} MiB state)",
              file=sys.stderr)
        bench.run(args.repeats, lambda s: print(s, file=sys.stderr))
        result = {"command": "python -m bench.verify " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "seconds": time.perf_counter() - t0, "machine": machine_info(folder),
                  "page_cache": cache.describe().replace("timed write", "timed read"),
                  "mix": args.mix, "compression": args.compression,
                  "summary": bench.summary()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    md = markdown(result)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
