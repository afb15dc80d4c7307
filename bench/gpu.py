"""GPU benchmark (H100/H200): device-to-host staging, save() blocking time, overlap with training.

One command, no network, a stock CUDA PyTorch image; writes ``bench/results/gpu.{json,md}``
(``--out``). Every figure is a median over ``--repeats`` with min/max, methods side by side:

1. D2H staging of a bf16 state (``--sizes-gb``, default 2 and 8 GB, in ``--tensors`` tensors):
   the floor is ``copy_(non_blocking=True)`` of every tensor into preallocated pinned buffers plus
   one synchronize (raw pinned cudaMemcpy); a fresh pageable ``.to("cpu")`` is the naive
   reference. Against them: ``AsyncCheckpointer.save()`` (default: returns once staged, and with
   ``overlap_staging=True``: returns at once, staged at ``wait_staged()``), ``dcp.async_save``
   default, and with a reused ``DefaultStager`` (pinned + non-blocking copies, synchronous and
   asynchronous staging). For each: time until the call returns, until staged, until durable.
2. Overlap with training: a bf16 MLP + AdamW (``--overlap-gb`` of state) saved every ``--every``
   steps. Per method the exposed cost per save = (the save step + the step after it) minus two
   median plain steps; async_ckpt with ``overlap_staging=True`` waits only via
   ``handle.wait_staged()`` right before ``optimizer.step()``, DCP's async staging only via
   ``staging_completion`` at the same point. Waiting for the previous save to be durable happens
   before a save step and is reported apart (``backlog_s``): it measures the disk, not staging.

A deadline (``--budget-s``, default 400 s) skips what is left and still writes the results.
Without CUDA it measures nothing and exits 0; ``--dry-run`` runs every code path on CPU at tiny
sizes (what the CPU smoke test runs). async_ckpt needs xxhash (zstandard only for compression,
which this script does not use); without it the floors and DCP are still measured, the command
to install it is printed and the exit code is 2. s3fs is not needed.

    python -m bench.gpu [--sizes-gb 2,8] [--repeats 3] [--overlap-gb 2] [--dir PATH]
                        [--out bench/results/gpu.json] [--budget-s 420] [--dry-run]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch

from .common import TensorState, free_port
from .gpu_common import (GB, Control, Env, dcp_parts, reusable_stager,  # noqa: F401
                         missing_deps, stats)
from .gpu_overlap import OverlapBench


# -- 1. staging and save() blocking time ----------------------------------------------------------
class StagingBench:
    def __init__(self, env: Env, args, folder: str, deadline: Control, have_ack: bool):
        self.env, self.args, self.folder, self.deadline, self.have_ack = env, args, folder, deadline, have_ack
        self.ack_timings: dict[str, list] = {}   # async_ckpt's own per-phase timings of each save
        self.round_s_per_gb = 0.0                 # the last round's duration: estimates the next

    def estimate_round_s(self, size_gb: float) -> float:
        return self.round_s_per_gb * size_gb

    def run_size(self, size_gb: float) -> dict:
        env, args = self.env, self.args
        n = args.tensors
        numel = max(1, int(size_gb * GB) // 2 // n)
        state = {f"layer{i:03d}.weight": torch.randn(numel, dtype=torch.bfloat16, device=env.device)
                 for i in range(n)}
        nbytes = numel * 2 * n
        rows: dict[str, dict] = {}

        def add(key: str, label: str, **figures: list[float]) -> None:
            row = rows.setdefault(key, {"label": label, **{f: [] for f in figures}})
            for f, xs in figures.items():
                row.setdefault(f, []).extend(xs)

        # floor: raw pinned cudaMemcpy into preallocated, already touched buffers
        dsts = [env.pinned(t) for t in state.values()]
        for d, s in zip(dsts, state.values()):
            d.copy_(s, non_blocking=True)
        env.sync()
        methods = [("floor", self._floor(state, dsts, add)), ("pageable", self._pageable(state, add))]
        closers = []
        if self.have_ack:
            for overlap in (False, True):
                ok, made = self.deadline.attempt(f"{size_gb:g} GB async_ckpt overlap_staging={overlap} setup",
                                                 self._ack, state, size_gb, overlap, add)
                if ok:
                    methods.append((f"ack_overlap{int(overlap)}", made[0]))
                    closers.append(made[1])
        methods.append(("dcp_default", self._dcp(state, None, "dcp_default",
                                                 "DCP async_save (default)", add)))
        for async_staging in (False, True):
            key = f"dcp_stager_{'async' if async_staging else 'sync'}"
            ok, stager = self.deadline.attempt(f"{size_gb:g} GB {key} setup", reusable_stager,
                                               env.stager_options(async_staging))
            if not ok:
                continue
            closers.append(stager.release)
            label = f"DCP async_save, reused DefaultStager ({'async' if async_staging else 'sync'} staging)"
            run = self._dcp(state, stager, key, label, add)
            # the first call allocates the stager's pinned buffers: reported apart
            if self.deadline.attempt(f"{size_gb:g} GB {key} first call", run, -1, True)[0]:
                methods.append((key, run))
        try:
            for r in range(args.repeats):
                if self.deadline.over(f"{size_gb:g} GB staging round {r + 1}", self.estimate_round_s(size_gb)):
                    break
                t_round = time.perf_counter()
                shift = r % len(methods)
                failed = set()
                for name, run in methods[shift:] + methods[:shift]:   # interleaved, rotating order
                    if not self.deadline.attempt(f"{size_gb:g} GB {name} round {r + 1}", run, r)[0]:
                        failed.add(name)
                    gc.collect()
                methods = [m for m in methods if m[0] not in failed]
                round_s = time.perf_counter() - t_round
                self.round_s_per_gb = round_s / size_gb
                print(f"  {size_gb:g} GB: round {r + 1}/{args.repeats} done ({round_s:.0f} s)",
                      file=sys.stderr, flush=True)
        finally:
            for close in closers:
                self.deadline.attempt(f"{size_gb:g} GB closing a saver", close)
        del dsts, state, methods, closers
        gc.collect()
        if env.cuda:
            torch.cuda.empty_cache()
            # freed pinned blocks stay cached by torch's host allocator: give them back before the
            # next (bigger) size allocates its own
            getattr(torch._C, "_host_emptyCache", lambda: None)()
        out = {"size_gb": size_gb, "bytes": nbytes, "tensors": n, "dtype": "bfloat16", "rows": {}}
        floor = statistics.median(rows["floor"]["staged"]) if rows.get("floor", {}).get("staged") else None
        for key, row in rows.items():
            figs = {f: stats(v) for f, v in row.items() if f != "label"}
            staged = figs.get("staged", {}).get("median_s")
            out["rows"][key] = {"label": row["label"], **figs,
                                "staged_gb_per_s": nbytes / GB / staged if staged else None,
                                "staged_vs_floor": staged / floor if staged and floor else None}
        return out

    def _floor(self, state, dsts, add):
        def run(_: int) -> None:
            self.env.sync()
            t0 = time.perf_counter()
            for d, s in zip(dsts, state.values()):
                d.copy_(s, non_blocking=True)
            self.env.sync()
            dt = time.perf_counter() - t0
            add("floor", "raw pinned copy_(non_blocking) into preallocated buffers (floor)", returned=[dt], staged=[dt])
        return run

    def _pageable(self, state, add):
        def run(r: int) -> None:
            if r > 0:     # a reference, not a contender: one sample saves ~1 s per GB of budget
                return
            self.env.sync()
            t0 = time.perf_counter()
            out = [t.to("cpu") if self.env.cuda else t.clone() for t in state.values()]
            dt = time.perf_counter() - t0
            del out
            add("pageable", "fresh pageable .to('cpu') (naive reference)", returned=[dt], staged=[dt])
        return run

    def _ack(self, state, size_gb, overlap: bool, add):
        from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent
        key = f"ack_overlap{int(overlap)}"
        label = f"async_ckpt save(), overlap_staging={overlap}"
        root = os.path.join(self.folder, f"{key}-{size_gb}")
        ck = AsyncCheckpointer(root, [StateComponent("model", TensorState(state), SharingPattern.PER_RANK)],
                               keep_last=1, overlap_staging=overlap)
        step = [0]

        def once(first: bool) -> None:
            os.sync()
            self.env.sync()
            t0 = time.perf_counter()
            h = ck.save(step[0])
            t1 = time.perf_counter()
            h.wait_staged()
            t2 = time.perf_counter()
            info = h.wait()
            t3 = time.perf_counter()
            ck.wait()     # retention of the previous step stays out of the timing
            step[0] += 1
            k = f"{key}_first" if first else key
            add(k, label + (": first save (allocates pinned buffers)" if first else ""),
                returned=[t1 - t0], staged=[t2 - t0], durable=[t3 - t0])
            self.ack_timings.setdefault(f"{size_gb:g}GB/{k}", []).append(info.timings)

        once(first=True)
        return (lambda _: once(first=False)), ck.close

    def _dcp(self, state, stager, key: str, label: str, add):
        import torch.distributed.checkpoint as dcp

        def run(i: int, first: bool = False) -> None:
            path = os.path.join(self.folder, f"{key}-{i}")
            os.sync()
            self.env.sync()
            t0 = time.perf_counter()
            resp = dcp.async_save(dict(state), checkpoint_id=path, async_stager=stager)
            t1 = time.perf_counter()
            staged, durable = dcp_parts(resp)
            if staged is not None:
                staged.result()
            t2 = time.perf_counter()
            durable.result()
            t3 = time.perf_counter()
            k = f"{key}_first" if first else key
            add(k, label + (": first call (allocates buffers)" if first else ""),
                returned=[t1 - t0], staged=[t2 - t0], durable=[t3 - t0])
            shutil.rmtree(path, ignore_errors=True)
        return run


# -- report -----------------------------------------------------------------------------------------
def cell(d: dict | None, scale: float = 1e3, digits: int = 1) -> str:
    if not d or d.get("median_s") is None:
        return "-"
    return f"{d['median_s'] * scale:.{digits}f} ({d['min_s'] * scale:.{digits}f}..{d['max_s'] * scale:.{digits}f})"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"### GPU benchmark: {m.get('gpu', 'no GPU (dry run)')}, torch {m['torch']}, CUDA {m.get('cuda')}",
             "", f"{doc['note']} Cells: median (min..max) over {doc['config']['repeats']} interleaved rounds, ms.", ""]
    for sec in doc["staging"]:
        lines += [f"#### D2H staging and save(), {sec['bytes'] / GB:.3g} GB bf16 in {sec['tensors']} tensors", "",
                  "| method | returns (ms) | staged (ms) | durable (ms) | staged GB/s | staged vs floor |",
                  "|---|---:|---:|---:|---:|---:|"]
        for key, row in sec["rows"].items():
            gbs = f"{row['staged_gb_per_s']:.1f}" if row.get("staged_gb_per_s") else "-"
            ratio = f"{row['staged_vs_floor']:.2f}x" if row.get("staged_vs_floor") else "-"
            one = " [1 sample]" if key.endswith("_first") else ""
            lines.append(f"| {row['label']}{one} | {cell(row.get('returned'))} | {cell(row.get('staged'))} | "
                         f"{cell(row.get('durable'))} | {gbs} | {ratio} |")
        lines.append("")
    ov = doc.get("overlap")
    if ov:
        lines += [f"#### Overlap with training: {ov['state_bytes'] / GB:.2f} GB bf16 state (MLP {ov['layers']} x "
                  f"{ov['width']}, batch {ov['batch']}, AdamW), save every {ov['every']} of {ov['steps']} steps", "",
                  "| method | plain step (ms) | exposed per save (ms) | run overhead per save (ms) | "
                  "backlog before next save (ms) |", "|---|---:|---:|---:|---:|"]
        for key, row in ov["methods"].items():
            lines.append(f"| {row['label']} | {cell(row['plain_step'])} | {cell(row['exposed_per_save'])} | "
                         f"{cell(row['run_overhead_per_save'])} | {cell(row['backlog'])} |")
        lines.append("")
    if doc["skipped"]:
        lines.append(f"Skipped (time budget): {', '.join(doc['skipped'])}.")
    for err in doc["errors"]:
        lines.append(f"FAILED: {err}")
    if doc["missing"]:
        lines.append(f"async_ckpt not measured: missing {', '.join(doc['missing'])} "
                     f"(pip install {' '.join(doc['missing'])}).")
    return "\n".join(lines) + "\n"


def machine(env: Env) -> dict:
    info = {"host": socket.gethostname(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "dry_run": not env.cuda}
    if env.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_bytes=p.total_memory)
    return info


def write(doc: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for path, text in ((out, json.dumps(doc, indent=1)), (os.path.splitext(out)[0] + ".md", markdown(doc))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-gb", default="2,8", help="bf16 state sizes for staging/blocking (default 2,8)")
    p.add_argument("--tensors", type=int, default=32, help="tensors per state (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--overlap-gb", type=float, default=2.0, help="bf16 params + AdamW state of the "
                   "overlap model (default 2)")
    p.add_argument("--width", type=int, default=8192, help="overlap MLP width (default 8192)")
    p.add_argument("--batch", type=int, default=16384, help="overlap rows per step (default 16384)")
    p.add_argument("--steps", type=int, default=40, help="overlap steps per run (default 40)")
    p.add_argument("--every", type=int, default=10, help="overlap: save every N steps (default 10)")
    p.add_argument("--dir", default=None, help="folder for checkpoints (default: a temp folder; "
                   "needs about 2x the largest size free)")
    p.add_argument("--out", default="bench/results/gpu.json", help="JSON results (the .md beside)")
    p.add_argument("--budget-s", type=float, default=400, help="skip what would end after this many "
                   "seconds (default 400, so the command ends within 8 minutes)")
    p.add_argument("--dry-run", action="store_true", help="every code path on CPU at tiny sizes")
    args = p.parse_args(argv)
    if args.dry_run:
        args.sizes_gb, args.tensors, args.repeats, args.overlap_gb = "0.004,0.008", 4, 1, 0.0005
        args.width, args.batch, args.steps, args.every = 64, 8, 6, 2
    try:
        args.sizes = [float(s) for s in args.sizes_gb.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes-gb takes comma-separated numbers, got {args.sizes_gb!r}")
    if not args.sizes or min(args.sizes) <= 0 or args.repeats < 1 or args.tensors < 1 \
            or not 1 <= args.every < args.steps:
        p.error("need sizes > 0, --repeats/--tensors >= 1 and 1 <= --every < --steps")
    return args


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (run on a CUDA machine, or pass --dry-run to "
              "exercise the code on CPU at tiny sizes)")
        return 0
    env = Env(args.dry_run)
    missing = missing_deps()
    if missing:
        print(f"async_ckpt cannot be imported here: it needs {' and '.join(missing)} "
              f"(async_ckpt/codec.py imports them). Install with: pip install {' '.join(missing)}\n"
              "Measuring the floors and DCP only.", file=sys.stderr, flush=True)
    import torch.distributed as dist
    deadline = Control(args.budget_s)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="async_ckpt_gpu-", dir=args.dir)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)   # DCP needs a process group (CPU: gloo)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    doc = {"benchmark": "gpu", "machine": machine(env), "missing": missing, "skipped": deadline.skipped,
           "errors": deadline.errors,
           "config": {k: v for k, v in vars(args).items()}, "staging": [], "overlap": None,
           "note": ("returns: the save call; staged: safe to mutate (wait_staged / staging_completion); "
                    "durable: committed (fsync'd). Floor: raw pinned non-blocking copies + synchronize.")}
    try:
        staging = StagingBench(env, args, folder, deadline, not missing)
        sizes = sorted(args.sizes)
        # smallest size, then the overlap, then the bigger sizes: a budget that runs out still
        # leaves one figure of every kind
        plan = [("staging", sizes[0]), ("overlap", None)] + [("staging", s) for s in sizes[1:]]
        for kind, size in plan:
            if kind == "staging":
                # setup (first saves, allocations) costs about one round
                if deadline.over(f"{size:g} GB staging", 2 * staging.estimate_round_s(size)):
                    continue
                print(f"staging {size:g} GB ...", file=sys.stderr, flush=True)
                ok, sec = deadline.attempt(f"{size:g} GB staging", staging.run_size, size)
                if ok:
                    doc["staging"].append(sec)
                doc["ack_timings"] = staging.ack_timings
            elif not deadline.over("overlap with training"):
                print("overlap with training ...", file=sys.stderr, flush=True)
                doc["overlap"] = deadline.attempt(
                    "overlap with training", lambda: OverlapBench(env, args, folder, deadline, not missing).run())[1]
                gc.collect()
                if env.cuda:
                    torch.cuda.empty_cache()
            write(doc, args.out)                         # partial results survive a later failure
        doc["elapsed_s"] = time.perf_counter() - t_start
        write(doc, args.out)
        print(markdown(doc))
        print(f"wrote {args.out} ({doc['elapsed_s']:.0f} s)", file=sys.stderr)
    finally:
        dist.destroy_process_group()
        shutil.rmtree(folder, ignore_errors=True)
    if doc["errors"]:
        print(f"{len(doc['errors'])} measurement(s) FAILED, see 'errors' in {args.out}", file=sys.stderr)
        return 1
    if missing:
        print(f"async_ckpt was NOT measured: pip install {' '.join(missing)}, then run again.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
