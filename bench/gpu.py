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
sizes (what the CPU smoke test runs). async_ckpt needs zstandard and xxhash (imported by
async_ckpt/codec.py); without them the floors and DCP are still measured, the command to install
them is printed and the exit code is 2. s3fs is not needed.

    python -m bench.gpu [--sizes-gb 2,8] [--repeats 3] [--overlap-gb 2] [--dir PATH]
                        [--out bench/results/gpu.json] [--budget-s 420] [--dry-run]
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import closing

import torch

GB = 10 ** 9
HARD_DEPS = ("zstandard", "xxhash")   # imported by async_ckpt/codec.py when async_ckpt is imported


def missing_deps() -> list[str]:
    missing = []
    for name in HARD_DEPS:
        try:      # an import, not find_spec: a broken install counts as missing too
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class Env:
    """What differs between a CUDA run and the CPU dry run: device, pinning, synchronisation."""

    def __init__(self, dry_run: bool):
        self.cuda = not dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def sync_compute(self) -> None:
        """Only the compute stream: side-stream copies must stay free to overlap the next step."""
        if self.cuda:
            torch.cuda.current_stream().synchronize()

    def pinned(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=self.cuda)

    def stager_options(self, async_staging: bool):
        from torch.distributed.checkpoint.staging import StagingOptions
        # DCP's best on GPU: pinned, reused buffers and non-blocking copies (both need CUDA).
        return StagingOptions(use_pinned_memory=self.cuda, use_shared_memory=False,
                              use_async_staging=async_staging, use_non_blocking_copy=self.cuda)


class Control:
    """The time budget and the failures of one run. The script runs once, unattended, on a lent
    machine: a method that fails is recorded and dropped, and everything else still runs."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []
        self.errors: list[str] = []

    def attempt(self, what: str, fn, *args) -> tuple[bool, object]:
        try:
            return True, fn(*args)
        except Exception as exc:  # noqa: BLE001 - recorded in the results, the run goes on
            traceback.print_exc()
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            print(f"  {what} FAILED (recorded in the results; going on)", file=sys.stderr, flush=True)
            return False, None

    def over(self, what: str, needs_s: float = 0.0) -> bool:
        """True (and noted) when `what`, expected to take `needs_s`, would end past the deadline."""
        if time.monotonic() + needs_s < self.end:
            return False
        self.skipped.append(what)
        print(f"  time budget spent: skipping {what}", file=sys.stderr, flush=True)
        return True


def stats(xs: list[float]) -> dict:
    if not xs:
        return {"median_s": None, "min_s": None, "max_s": None, "n": 0, "samples_s": []}
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs), "samples_s": xs}


class TensorState:
    """A minimal Stateful over a dict of tensors (what AsyncCheckpointer and DCP both accept)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in sd.items():
            self.tensors[k].copy_(v)


def dcp_parts(resp):
    """(staged future or None, durable future) of whatever dcp.async_save returned."""
    return getattr(resp, "staging_completion", None), getattr(resp, "upload_completion", resp)


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
        from torch.distributed.checkpoint.staging import DefaultStager
        for async_staging in (False, True):
            key = f"dcp_stager_{'async' if async_staging else 'sync'}"
            ok, stager = self.deadline.attempt(f"{size_gb:g} GB {key} setup", DefaultStager,
                                               env.stager_options(async_staging))
            if not ok:
                continue
            closers.append(stager.close)
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


# -- 2. overlap of staging with forward/backward --------------------------------------------------
class Mlp(torch.nn.Module):
    def __init__(self, width: int, layers: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.relu(b(x))
        return x


class OverlapBench:
    METHODS = ("none", "ack_blocking", "ack_overlap", "dcp_stager_sync", "dcp_stager_async")
    LABELS = {"none": "no checkpointing (baseline)",
              "ack_blocking": "async_ckpt save(), overlap_staging=False",
              "ack_overlap": "async_ckpt save(), overlap_staging=True, wait_staged() before optimizer.step()",
              "dcp_stager_sync": "DCP async_save, reused DefaultStager (sync staging)",
              "dcp_stager_async": "DCP async_save, reused DefaultStager (async staging, "
                                  "staging_completion before optimizer.step())"}

    def __init__(self, env: Env, args, folder: str, deadline: Control, have_ack: bool):
        self.env, self.args, self.folder, self.deadline, self.have_ack = env, args, folder, deadline, have_ack
        width = args.width
        layers = max(1, round(args.overlap_gb * GB / (6 * width * width)))   # bf16 weight + 2 bf16 moments
        torch.manual_seed(0)
        self.model = Mlp(width, layers).to(env.device, torch.bfloat16)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-5, fused=env.cuda or None)
        self.x = torch.randn(args.batch, width, device=env.device, dtype=torch.bfloat16)
        self.layers = layers
        for _ in range(3):
            self.fwd_bwd()
            self.optim.step()
        env.sync()
        self.nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters()) + sum(
            v.numel() * v.element_size() for st in self.optim.state.values() for v in st.values() if torch.is_tensor(v))

    def fwd_bwd(self) -> None:
        self.optim.zero_grad(set_to_none=False)
        self.model(self.x).float().pow(2).mean().backward()

    def components(self):
        from async_ckpt import SharingPattern, StateComponent
        return [StateComponent("model", self.model, SharingPattern.PER_RANK),
                StateComponent("optim", self.optim, SharingPattern.PER_RANK)]

    def saver(self, method: str):
        """(save(step) -> pending, wait_staged(pending), wait_durable(pending), close)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager
        if method.startswith("ack"):
            from async_ckpt import AsyncCheckpointer
            ck = AsyncCheckpointer(os.path.join(self.folder, f"loop-{method}"), self.components(),
                                   keep_last=1, overlap_staging=(method == "ack_overlap"))
            return ck.save, (lambda h: h.wait_staged()), (lambda h: (h.wait(), ck.wait())), ck.close
        stager = DefaultStager(self.env.stager_options(method == "dcp_stager_async"))

        def save(step: int):
            sd = {"model": self.model.state_dict(), "optim": self.optim.state_dict()}
            path = os.path.join(self.folder, f"loop-{method}-{step}")
            return path, dcp.async_save(sd, checkpoint_id=path, async_stager=stager)

        def staged(p) -> None:
            fut = dcp_parts(p[1])[0]
            if fut is not None:
                fut.result()

        def durable(p) -> None:
            dcp_parts(p[1])[1].result()
            shutil.rmtree(p[0], ignore_errors=True)
        return save, staged, durable, stager.close

    def run_method(self, method: str, saver, step0: int) -> dict:
        args, env = self.args, self.env
        due = set(range(args.every, args.steps, args.every)) if method != "none" else set()
        save, wait_staged, wait_durable, _ = saver if saver else (None, None, None, None)
        times, backlog, pending, to_stage = [], [], None, None
        for i in range(args.steps):
            if i in due and pending is not None:      # the previous save must be durable: untimed
                t = time.perf_counter()
                wait_durable(pending)
                backlog.append(time.perf_counter() - t)
                pending = None
            t0 = time.perf_counter()
            self.fwd_bwd()
            if to_stage is not None:                  # only now must the parameters stay unchanged
                wait_staged(to_stage)
                to_stage = None
            self.optim.step()
            # The update must have landed before any saver reads the parameters: async_ckpt's side
            # stream waits for the compute stream itself, DCP's async staging thread does not.
            env.sync_compute()
            if i in due:
                pending = to_stage = save(step0 + i)
            times.append(time.perf_counter() - t0)
        if to_stage is not None:
            wait_staged(to_stage)
        if pending is not None:
            wait_durable(pending)
        plain = [t for i, t in enumerate(times) if i not in due and i - 1 not in due]
        base = statistics.median(plain) if plain else 0.0
        exposed = [times[i] + (times[i + 1] if i + 1 < len(times) else base) - 2 * base for i in sorted(due)]
        return {"run_s": sum(times), "plain_step_s": base, "exposed_per_save_s": exposed, "backlog_s": backlog}

    def run(self) -> dict:
        methods = [m for m in self.METHODS if self.have_ack or not m.startswith("ack")]
        savers = {"none": None}

        def warm_up(m: str):                          # first save: buffers, threads (untimed)
            saver = self.saver(m)
            p = saver[0](10 ** 6)
            saver[1](p)
            saver[2](p)
            return saver
        for m in methods[1:]:
            ok, saver = self.deadline.attempt(f"overlap {m} setup", warm_up, m)
            if ok:
                savers[m] = saver
        methods = [m for m in methods if m in savers]
        results = {m: [] for m in methods}
        step0 = {m: 2 * 10 ** 6 for m in methods}
        round_s = 0.0
        try:
            for r in range(self.args.repeats):
                if self.deadline.over(f"overlap round {r + 1}", round_s):
                    break
                t_round = time.perf_counter()
                shift = r % len(methods)
                for m in methods[shift:] + methods[:shift]:
                    ok, res = self.deadline.attempt(f"overlap {m} round {r + 1}", self.run_method,
                                                    m, savers[m], step0[m])
                    step0[m] += self.args.steps
                    if ok:
                        results[m].append(res)
                    elif m == "none":
                        raise RuntimeError("the baseline training run failed: nothing to compare against")
                    else:
                        methods = [x for x in methods if x != m]
                round_s = time.perf_counter() - t_round
                print(f"  overlap: round {r + 1}/{self.args.repeats} done ({round_s:.0f} s)",
                      file=sys.stderr, flush=True)
        finally:
            for m, saver in savers.items():
                if saver is not None:
                    self.deadline.attempt(f"overlap closing {m}", saver[3])
        base = [x["run_s"] for x in results.get("none", [])]
        n_saves = len(range(self.args.every, self.args.steps, self.args.every))
        out = {"state_bytes": self.nbytes, "width": self.args.width, "layers": self.layers,
               "batch": self.args.batch, "steps": self.args.steps, "every": self.args.every,
               "saves_per_run": n_saves, "methods": {}}
        for m, runs in results.items():
            if not runs:
                continue
            per_save = [(x["run_s"] - b) / n_saves for x, b in zip(runs, base)] if m != "none" else []
            out["methods"][m] = {
                "label": self.LABELS[m],
                "plain_step": stats([x["plain_step_s"] for x in runs]),
                "exposed_per_save": stats([statistics.median(x["exposed_per_save_s"]) for x in runs
                                           if x["exposed_per_save_s"]]),
                "run_overhead_per_save": stats(per_save),
                "backlog": stats([statistics.median(x["backlog_s"]) for x in runs if x["backlog_s"]]),
                "run": stats([x["run_s"] for x in runs])}
        return out


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


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
