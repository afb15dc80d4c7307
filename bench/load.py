"""Load benchmark: async_ckpt's load next to the raw cold read floor and dcp.load, cold and warm.

One process, one synthetic state per dtype mix (bench/harness/state.py: ``fp32`` and
``bf16_adam``), saved once by every method. Then every round runs each method once, order
rotated, each cold (``sync`` + ``drop_caches`` first) and right after that warm (the file now in
the page cache):

- ``raw``: the floor of bench/harness/floors.py, ``readinto`` of one file holding the state into
  an already faulted buffer;
- ``async_ckpt``: ``AsyncCheckpointer.load()`` into preallocated tensors (a Stateful that copies,
  like ``nn.Module``), hashes verified; the default path (local files mapped, readbuf.py);
- ``async_ckpt_fresh``: the same with mapping switched off (reads into fresh buffers, the path of
  other backends) — what the mapping buys;
- ``async_ckpt_kept``: a Stateful that keeps the tensors it is given (as ``Optimizer`` does), so
  the load also moves them off the checkpoint file (readbuf.ReadSession);
- ``dcp``: ``dcp.load`` into the same preallocated tensors.

Ratios divide medians of this run. Writes ``<out>.json`` and ``<out>.md``.

    python -m bench.load [--size-gib 1] [--mixes fp32,bf16_adam] [--repeats 5] [--dir PATH]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent
from async_ckpt.load import readbuf

from .common import GIB, PageCache, TensorState, machine_info
from .harness.floors import Floors
from .harness.state import make_state, state_bytes


class KeepState(TensorState):
    """Keeps the tensors load_state_dict gets, as torch.optim.Optimizer does."""

    def load_state_dict(self, sd) -> None:
        self.kept = dict(sd)


def _ck(root: str, stateful) -> AsyncCheckpointer:
    return AsyncCheckpointer(root, [StateComponent("model", stateful, SharingPattern.PER_RANK)])


class MixBench:
    def __init__(self, mix: str, nbytes: int, layers: int, folder: str, cache: PageCache):
        self.mix, self.cache = mix, cache
        self.folder = os.path.join(folder, mix)
        os.makedirs(self.folder, exist_ok=True)
        self.state = make_state(nbytes, mix, layers)
        self.nbytes = state_bytes(self.state)
        self.floors = Floors(self.state, self.folder, cache)
        self.floors.raw_write()
        self.target = {k: torch.empty_like(v) for k, v in self.state.items()}
        for t in self.target.values():
            t.zero_()            # faulted in, as a model's parameters are
        self.root = os.path.join(self.folder, "async_ckpt")
        with _ck(self.root, TensorState(self.state)) as ck:
            ck.save(0).wait()
        self.dcp_path = os.path.join(self.folder, "dcp")
        dcp.save(self.state, checkpoint_id=self.dcp_path)
        self.samples: dict[str, list[float]] = {}

    def check(self, tensors: dict[str, torch.Tensor]) -> None:
        for k in (next(iter(self.state)), next(reversed(self.state))):
            if not torch.equal(tensors[k], self.state[k]):
                raise RuntimeError(f"{self.mix}: loaded {k} differs from the saved tensor")

    def raw(self) -> None:
        self.samples.setdefault("raw/cold", []).append(self.floors.cold_read())
        view = memoryview(self.floors.buf)[:self.nbytes]
        t0 = time.perf_counter()
        with open(self.floors.raw_path, "rb", buffering=0) as f:
            while len(view):
                view = view[f.readinto(view[:1 << 30]):]
        self.samples.setdefault("raw/warm", []).append(time.perf_counter() - t0)

    def _cold_and_warm(self, key: str, load, loaded, after=lambda: None) -> None:
        """Time `load()` into zeroed targets with the page cache dropped, then again warm;
        `loaded()` returns what the load filled, for the check; `after()` runs untimed."""
        for temp in ("cold", "warm"):
            for t in self.target.values():
                t.zero_()
            if temp == "cold":
                self.cache.settle()
            gc.collect()
            t0 = time.perf_counter()
            load()
            self.samples.setdefault(f"{key}/{temp}", []).append(time.perf_counter() - t0)
            self.check(loaded())
            after()

    def _async(self, key: str, stateful, result) -> None:
        ck = _ck(self.root, stateful)
        try:
            def drop_kept() -> None:
                stateful.kept = None     # a KeepState lets go of what it kept, untimed
            self._cold_and_warm(key, lambda: ck.load(0), lambda: result(stateful), drop_kept)
        finally:
            ck.close()

    def async_ckpt(self) -> None:
        self._async("async_ckpt", TensorState(self.target), lambda s: self.target)

    def async_ckpt_fresh(self) -> None:
        saved, readbuf._populate_ok = readbuf._populate_ok, False
        try:
            self._async("async_ckpt_fresh", TensorState(self.target), lambda s: self.target)
        finally:
            readbuf._populate_ok = saved

    def async_ckpt_kept(self) -> None:
        self._async("async_ckpt_kept", KeepState({}), lambda s: s.kept)

    def dcp(self) -> None:
        self._cold_and_warm("dcp", lambda: dcp.load(self.target, checkpoint_id=self.dcp_path),
                            lambda: self.target)

    def run(self, repeats: int, methods: list[str], log) -> None:
        fns = [getattr(self, m) for m in methods]
        for r in range(repeats):
            shift = r % len(fns)
            for fn in fns[shift:] + fns[:shift]:
                fn()
            log(f"  {self.mix}: round {r + 1}/{repeats}")

    def summary(self) -> dict:
        med = {k: statistics.median(v) for k, v in self.samples.items()}
        raw = self.samples.get("raw/cold")
        rows = []
        for key, vals in self.samples.items():
            method, temp = key.split("/")
            dcp_vals = self.samples.get(f"dcp/{temp}")
            rows.append({"method": method, "cache": temp, "median_s": med[key], "min_s": min(vals),
                         "max_s": max(vals), "samples_s": vals,
                         "vs_raw_cold_read": med[key] / statistics.median(raw) if raw else None,
                         "vs_dcp_load": med[key] / statistics.median(dcp_vals) if dcp_vals else None,
                         # on a shared machine the floor's samples came out bimodal, so also the
                         # same-round ratio and best against best
                         "vs_raw_paired": _paired(vals, raw),
                         "vs_raw_best": min(vals) / min(raw) if raw else None,
                         "vs_dcp_paired": _paired(vals, dcp_vals)})
        return {"mix": self.mix, "state_bytes": self.nbytes, "tensors": len(self.state), "rows": rows}


def _paired(vals: list[float], base: list[float] | None) -> float | None:
    """Median over rounds of this round's time / the base's time in the same round."""
    return statistics.median(v / b for v, b in zip(vals, base)) if base else None


def markdown(result: dict) -> str:
    out = [f"# Load benchmark\n\nCommand: `{result['command']}`; {result['seconds']:.0f} s.\n",
           f"Machine: {result['machine']['cpu_model']}, {result['machine']['cpu_affinity']} CPUs, "
           f"torch {result['machine']['torch']}, target {result['machine']['target_fs'].get('fstype')} "
           f"at {result['machine']['target_dir']}; async_ckpt at {result['machine']['git_commit'][:10]}.\n",
           "Cells: median (min-max) seconds over the repeats. Ratios against the raw cold read (the "
           "floor) and against dcp.load with the same cache state: of the medians; the median of "
           "same-round ratios; and best against best (on a shared machine the floor's samples "
           "can be bimodal; its minimum is its undisturbed speed).\n"]
    for mix in result["mixes"]:
        out.append(f"## {mix['mix']}, {mix['state_bytes'] / 2**20:.0f} MiB in {mix['tensors']} tensors\n")
        out.append("| method | cache | load s | / raw cold read | same round | best / best | / dcp.load "
                   "| same round |\n|---|---|---|---:|---:|---:|---:|---:|")
        for r in sorted(mix["rows"], key=lambda r: (r["cache"], r["method"])):
            ratio = lambda x: f"{x:.2f}" if x else "-"  # noqa: E731
            out.append(f"| {r['method']} | {r['cache']} | {r['median_s']:.3f} ({r['min_s']:.3f}-"
                       f"{r['max_s']:.3f}) | {ratio(r['vs_raw_cold_read'])} | {ratio(r['vs_raw_paired'])} "
                       f"| {ratio(r['vs_raw_best'])} | {ratio(r['vs_dcp_load'])} | {ratio(r['vs_dcp_paired'])} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--mixes", default="fp32,bf16_adam")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", default="raw,async_ckpt,async_ckpt_fresh,async_ckpt_kept,dcp")
    p.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a "
                   "temp folder under the current directory)")
    p.add_argument("--out", default=os.path.join("bench", "results", "load"))
    p.add_argument("--no-drop-caches", action="store_true", help="only sync (cold loads are then warm)")
    args = p.parse_args(argv)
    cache = PageCache(not args.no_drop_caches)
    if not cache.can_drop and not args.no_drop_caches:
        print(f"warning: {cache.describe()}: cold loads will be warm", file=sys.stderr)
    folder = tempfile.mkdtemp(prefix="bench-load-", dir=args.dir or ".")
    t0 = time.perf_counter()
    try:
        mixes = []
        for mix in args.mixes.split(","):
            bench = MixBench(mix, int(args.size_gib * GIB), args.layers, folder, cache)
            bench.run(args.repeats, args.methods.split(","), lambda s: print(s, file=sys.stderr))
            mixes.append(bench.summary())
            bench.floors.close()
            del bench
            gc.collect()
        result = {"command": "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "seconds": time.perf_counter() - t0, "machine": machine_info(folder),
                  "page_cache": cache.describe(), "mixes": mixes}
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
