"""Training-loop benchmark: what checkpointing every k steps costs a CPU training run.

A residual MLP (sized by ``--size-mb``: fp32 parameters + AdamW's two moments, the bytes every
checkpoint holds) is trained on CPU with AdamW. The methods:

- ``none``: no checkpointing (the baseline);
- ``async_ckpt``: ``AsyncCheckpointer.save(step)`` (``max_pending=1``);
- ``dcp_default``: ``dcp.async_save`` with DCP's default (a fresh staging copy per call);
- ``dcp_stager``: ``dcp.async_save`` with one reused ``DefaultStager`` (synchronous staging into
  reused buffers: DCP's fastest setting on CPU, see bench/single_process.py).

The unit of measurement is a *save window*: ``--every`` training steps, the save called right
after the first one, then waiting for that save to be durable (``drain``, timed). Its cost is the
window's wall time including the drain, which is what a periodic run with one save in flight pays
per save: a save that has not finished by the next one holds that one up. Windows are interleaved
finely: a *cycle* runs one window of every method back to back (rotating the order), so the
baseline it is compared with ran seconds earlier or later, on a machine whose load changes by the
minute. A round is ``--steps / --every`` cycles; figures are per-round medians, reported as the
median over ``--repeats`` rounds with min..max:

- median step time of steps without a save and of steps with a save (the save call included);
- slowdown per save: window cost minus the same cycle's baseline window;
- overhead in %: that slowdown over the baseline window, i.e. the run-time overhead of a run that
  saves every ``--every`` steps;
- drain: how long the save still ran after the window's last step (0: it finished in time).

Every method's first (buffer-allocating) save happens in an untimed warm-up; nobody deletes old
checkpoints inside a timed window (async_ckpt runs with ``keep_last=None``; folders are cleared
between windows, untimed). One ``torch.set_num_threads`` for all methods (``--threads``, default
every CPU this process may use), so background saving competes with training for the same cores.

    python -m bench.training_loop [--steps 30] [--every 6] [--repeats 3] [--size-mb 256]
                                  [--threads N] [--dir PATH] [--quick]

``--trainer-overhead`` measures instead what the trainer layer (async_ckpt.trainers) adds per step
that does not save, against a bare loop with the same checkpointer (bench/trainer_overhead.py;
``--steps``/``--repeats`` as given, defaults 300/5).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent

from .common import free_port, machine_info

MIB = 1 << 20
METHODS = ("none", "async_ckpt", "dcp_default", "dcp_stager")
LABELS = {"none": "no checkpointing (baseline)",
          "async_ckpt": "async_ckpt AsyncCheckpointer.save()",
          "dcp_default": "DCP async_save (default: fresh staging copy)",
          "dcp_stager": "DCP async_save (reused DefaultStager)"}


# -- the model ----------------------------------------------------------------------------------
class Model(torch.nn.Module):
    """Residual MLP: wide enough that matmuls (not Python) set the step time."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return x


def build(size_mb: float, width: int, batch: int) -> tuple[Model, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    # 12 bytes per parameter are checkpointed: the fp32 weight and AdamW's exp_avg, exp_avg_sq.
    per_layer = 12 * (width * width + width)
    layers = max(1, round(size_mb * MIB / per_layer))
    torch.manual_seed(0)
    model = Model(width, layers)
    # foreach=False: the default foreach path keeps a second copy of every moment alive during the
    # step, which on this small machine is memory we would rather leave to the savers.
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    x = torch.randn(batch, width)
    y = torch.randn(batch, width)
    return model, optim, x, y


def train_step(model: Model, optim: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optim.zero_grad(set_to_none=False)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optim.step()


def state_nbytes(model: Model, optim: torch.optim.Optimizer) -> int:
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in optim.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


# -- the savers -----------------------------------------------------------------------------------
class Saver:
    """One checkpointing method: save(step) is called on the training thread at a save step;
    drain() waits for everything in flight; clear() removes what was written (untimed)."""

    def __init__(self, name: str, root: str):
        self.name, self.root = name, root
        os.makedirs(root, exist_ok=True)

    def save(self, step: int) -> None:
        pass

    def drain(self) -> None:
        pass

    def clear(self) -> None:
        for entry in os.listdir(self.root):
            shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)

    def close(self) -> None:
        pass


class AsyncCkptSaver(Saver):
    def __init__(self, root: str, model: Model, optim: torch.optim.Optimizer):
        super().__init__("async_ckpt", root)
        # keep_last=None: no retention deletes in the background, like DCP (clear() is untimed).
        self.ck = AsyncCheckpointer(root, [StateComponent("model", model, SharingPattern.PER_RANK),
                                           StateComponent("optim", optim, SharingPattern.PER_RANK)],
                                    keep_last=None, max_pending=1)

    def save(self, step: int) -> None:
        self.ck.save(step)

    def drain(self) -> None:
        self.ck.wait()

    def close(self) -> None:
        self.ck.close()


class DcpSaver(Saver):
    def __init__(self, name: str, root: str, model: Model, optim: torch.optim.Optimizer, stager):
        super().__init__(name, root)
        self.model, self.optim, self.stager = model, optim, stager
        self.pending = None

    def _wait_pending(self) -> None:
        fut, self.pending = self.pending, None
        if fut is None:
            return
        # AsyncSaveResponse (an explicit stager) or a plain Future (the default path)
        (fut.upload_completion if hasattr(fut, "upload_completion") else fut).result()

    def save(self, step: int) -> None:
        self._wait_pending()   # one save in flight, as DCP's docs recommend and max_pending=1 does
        sd = {"model": self.model.state_dict(), "optim": self.optim.state_dict()}
        self.pending = dcp.async_save(sd, checkpoint_id=os.path.join(self.root, f"step-{step:08d}"),
                                      async_stager=self.stager)

    def drain(self) -> None:
        self._wait_pending()

    def close(self) -> None:
        self._wait_pending()
        if self.stager is not None:
            self.stager.close()


# -- measurement ----------------------------------------------------------------------------------
@dataclass
class Window:
    method: str
    round: int
    cycle: int
    steps_s: list[float]
    drain_s: float
    saved: bool
    save_call_s: float      # the save() / async_save() call alone: what the training thread waits
    cpu_s: float            # CPU seconds of the whole process (every thread) over the window

    @property
    def cost_s(self) -> float:
        return sum(self.steps_s) + self.drain_s


def timed_window(method: str, r: int, c: int, saver: Saver, step: int, args, model, optim, x, y) -> Window:
    """`every` steps with one save after the first; then wait until the save is durable."""
    os.sync()   # untimed: no dirty pages left over from the previous window
    gc.collect()
    steps, call = [], 0.0
    cpu0 = cpu_seconds()
    for j in range(args.every):
        t0 = time.perf_counter()
        train_step(model, optim, x, y)
        if j == 0:
            t1 = time.perf_counter()
            saver.save(step)
            call = time.perf_counter() - t1
        steps.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    saver.drain()
    drain = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    saver.clear()
    return Window(method, r, c, steps, drain, method != "none", call, cpu)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads. Unlike wall time it barely moves with
    other processes' load, so the extra CPU a save costs stays measurable on a busy machine."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def spread(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    return {"median": med(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None,
            "samples": xs}


def summarise(windows: list[Window], rounds: int) -> dict:
    base = {(w.round, w.cycle): w.cost_s for w in windows if w.method == "none"}
    base_cpu = {(w.round, w.cycle): w.cpu_s for w in windows if w.method == "none"}
    out = {}
    for m in METHODS:
        per_round = {k: [] for k in ("plain", "save", "slow", "pct", "drain", "cost", "call", "cpu")}
        for r in range(rounds):
            mine = [w for w in windows if w.method == m and w.round == r]
            if not mine:
                continue
            per_round["plain"].append(med([s for w in mine for s in (w.steps_s[1:] if w.saved else w.steps_s)]))
            per_round["save"].append(med([w.steps_s[0] for w in mine if w.saved]))
            per_round["cost"].append(med([w.cost_s for w in mine]))
            per_round["drain"].append(med([w.drain_s for w in mine]))
            if m != "none":
                per_round["call"].append(med([w.save_call_s for w in mine]))
                per_round["cpu"].append(med([w.cpu_s - base_cpu[(w.round, w.cycle)] for w in mine]))
                slow = [w.cost_s - base[(w.round, w.cycle)] for w in mine]
                per_round["slow"].append(med(slow))
                per_round["pct"].append(med([100.0 * (w.cost_s - base[(w.round, w.cycle)]) / base[(w.round, w.cycle)]
                                             for w in mine]))
        out[m] = {"label": LABELS[m], "plain_step_s": spread(per_round["plain"]),
                  "save_step_s": spread(per_round["save"]), "slowdown_per_save_s": spread(per_round["slow"]),
                  "overhead_pct": spread(per_round["pct"]), "drain_s": spread(per_round["drain"]),
                  "window_s": spread(per_round["cost"]), "save_call_s": spread(per_round["call"]),
                  "extra_cpu_per_save_s": spread(per_round["cpu"]),
                  # every window of every round pooled: the paired differences themselves
                  "slowdown_per_save_pooled": quartiles([w.cost_s - base[(w.round, w.cycle)]
                                                         for w in windows if w.method == m] if m != "none" else [])}
    return out


def quartiles(xs: list[float]) -> dict:
    if len(xs) < 2:
        return {"median": med(xs), "q1": None, "q3": None, "n": len(xs)}
    q1, q2, q3 = statistics.quantiles(xs, n=4)
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "n": len(xs)}


def fmt(x: float | None, unit: str = "", digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def markdown(summary: dict) -> str:
    def cell(d: dict, scale: float = 1.0, digits: int = 3) -> str:
        if d["median"] is None:
            return "-"
        return (f"{d['median'] * scale:.{digits}f} ({d['min'] * scale:.{digits}f}..{d['max'] * scale:.{digits}f})")
    lines = ["| method | save() call (ms) | extra CPU per save (s) | median step, no save (ms) | median step with "
             "save (ms) | slowdown per save (s) | run-time overhead (%) | window incl. drain (s) | drain (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, s in summary.items():
        lines.append(f"| {s['label']} | {cell(s['save_call_s'], 1e3, 1)} | {cell(s['extra_cpu_per_save_s'])} | "
                     f"{cell(s['plain_step_s'], 1e3, 1)} | {cell(s['save_step_s'], 1e3, 1)} | "
                     f"{cell(s['slowdown_per_save_s'])} | {cell(s['overhead_pct'], 1.0, 1)} | "
                     f"{cell(s['window_s'], 1.0, 2)} | {cell(s['drain_s'], 1.0, 2)} |")
    return "\n".join(lines)


def ratios(summary: dict) -> list[str]:
    ours = summary.get("async_ckpt")
    out = []
    if not ours or ours["slowdown_per_save_s"]["median"] is None:
        return out
    for key, what in (("save_call_s", "save() call"), ("extra_cpu_per_save_s", "extra CPU per save")):
        a = ours[key]["median"]
        for m in ("dcp_default", "dcp_stager"):
            b = summary.get(m, {}).get(key, {}).get("median")
            if a is None or b is None:
                continue
            if a > 0:
                out.append(f"- {what}: async_ckpt {a:.3f} s vs {summary[m]['label']} {b:.3f} s: "
                           f"{'ahead' if a < b else 'BEHIND'} ({b / a:.2f}x)")
            else:      # a paired difference: on a loaded machine it can come out at or below 0
                out.append(f"- {what}: async_ckpt {a:.3f} s (within noise of the baseline) vs "
                           f"{summary[m]['label']} {b:.3f} s")
    a = ours["slowdown_per_save_s"]["median"]
    for m in ("dcp_default", "dcp_stager"):
        if m in summary and summary[m]["slowdown_per_save_s"]["median"] is not None:
            b = summary[m]["slowdown_per_save_s"]["median"]
            if a > 0:
                out.append(f"- slowdown per save: async_ckpt {a:.3f} s vs {summary[m]['label']} {b:.3f} s: "
                           f"{'ahead' if a < b else 'BEHIND'} ({b / a:.2f}x)")
            else:
                out.append(f"- slowdown per save: async_ckpt {a:.3f} s (within noise of the baseline) vs "
                           f"{summary[m]['label']} {b:.3f} s")
    return out


# -- driver -----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.training_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per method and round, a "
                   "multiple of --every (default 30)")
    p.add_argument("--every", type=int, default=6, help="save every N steps: the window (default 6)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--size-mb", type=float, default=256, help="checkpointed bytes: fp32 params + AdamW "
                   "moments, in MiB (default 256)")
    p.add_argument("--width", type=int, default=1024, help="MLP width (default 1024)")
    p.add_argument("--batch", type=int, default=32, help="rows per step (default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every method "
                   "(default: the CPUs this process may use)")
    p.add_argument("--dir", default=None, help="folder to write into (default: a new temp folder); a "
                   "fresh subfolder is created inside and removed afterwards")
    p.add_argument("--out", default="bench/results/training_loop.json", help="JSON results (the .md beside)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a sanity run in < 30 s")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.repeats, args.size_mb, args.width, args.batch = 6, 3, 1, 24, 256, 32
    if args.every < 2 or args.steps < args.every or args.steps % args.every or args.repeats < 1 \
            or args.size_mb <= 0:
        p.error("need --every >= 2, --steps a positive multiple of --every, --repeats >= 1 and --size-mb > 0")
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))
    return args


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    t_all = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--trainer-overhead" in argv:
        from .trainer_overhead import run
        p = argparse.ArgumentParser(prog="python -m bench.training_loop --trainer-overhead")
        p.add_argument("--trainer-overhead", action="store_true")
        p.add_argument("--steps", type=int, default=300)
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--out", default=None, help="also write the table to this file")
        opts = p.parse_args(argv)
        md = run(opts.steps, opts.repeats)
        print(md)
        if opts.out:
            write(opts.out, md + "\n")
        return 0
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="async_ckpt_loop-", dir=args.dir)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)   # DCP needs a process group
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    savers: dict[str, Saver] = {}
    try:
        model, optim, x, y = build(args.size_mb, args.width, args.batch)
        for _ in range(3):              # AdamW allocates its moments on the first step
            train_step(model, optim, x, y)
        nbytes = state_nbytes(model, optim)
        savers = {"none": Saver("none", os.path.join(folder, "none")),
                  "async_ckpt": AsyncCkptSaver(os.path.join(folder, "async_ckpt"), model, optim),
                  "dcp_default": DcpSaver("dcp_default", os.path.join(folder, "dcp_default"), model, optim, None),
                  "dcp_stager": DcpSaver("dcp_stager", os.path.join(folder, "dcp_stager"), model, optim,
                                         DefaultStager(StagingOptions(False, False, False, False)))}
        next_step = {m: 1_000_000 for m in METHODS}
        for m, saver in savers.items():   # untimed: first saves allocate buffers, start threads
            saver.save(next_step[m])
            saver.drain()
            saver.clear()
            next_step[m] += 1
        print(f"model: {len(model.blocks)} x Linear({args.width}, {args.width}), state {nbytes / MIB:.0f} MiB "
              f"(fp32 params + AdamW moments), batch {args.batch}, torch threads {args.threads}; "
              f"{args.steps} steps, save every {args.every}; dir {folder}", file=sys.stderr, flush=True)
        windows: list[Window] = []
        order = list(METHODS)
        cycles = args.steps // args.every
        for r in range(args.repeats):
            for c in range(cycles):
                shift = (r * cycles + c) % len(order)
                for m in order[shift:] + order[:shift]:
                    windows.append(timed_window(m, r, c, savers[m], next_step[m], args, model, optim, x, y))
                    next_step[m] += args.every
            print(f"  round {r + 1}/{args.repeats} done ({time.perf_counter() - t_all:.0f} s)",
                  file=sys.stderr, flush=True)
        summary = summarise(windows, args.repeats)
        info = machine_info(folder)
        info["loadavg_start"], info["loadavg_end"] = load_start, os.getloadavg()
        table = markdown(summary)
        verdicts = ratios(summary)
        elapsed = time.perf_counter() - t_all
        head = (f"### Training loop on CPU: {nbytes / MIB:.0f} MiB checkpointed state, save every {args.every} "
                f"steps, {cycles} cycles x {args.repeats} rounds\n\n"
                f"Model: residual MLP, {len(model.blocks)} x Linear({args.width}, {args.width}), batch {args.batch}, "
                f"AdamW; torch.set_num_threads({args.threads}) for every method. "
                f"Machine: {info['cpu_count']} CPUs ({info['cpu_model']}), torch {torch.__version__}, "
                f"{info['target_fs'].get('fstype', '?')} at {info['target_fs'].get('mount_point', '?')}; "
                f"load average start/end {load_start[0]:.2f}/{info['loadavg_end'][0]:.2f}. A window is {args.every} "
                f"steps with one save after the first, until that save is durable; a cycle runs one window "
                f"per method back to back (rotating order). Slowdown per save and overhead: window minus the "
                f"same cycle's baseline window. Cells: median over rounds of each round's median (min..max).\n")
        md = "\n".join([head, table, "", *verdicts, f"\n(total {elapsed:.0f} s)\n"])
        print("\n" + md)
        result = {"benchmark": "training_loop", "machine": info,
                  "config": {"steps": args.steps, "every": args.every, "repeats": args.repeats,
                             "size_mb": args.size_mb, "width": args.width, "layers": len(model.blocks),
                             "batch": args.batch, "threads": args.threads, "quick": args.quick,
                             "state_bytes": nbytes, "cycles_per_round": cycles, "saves_per_window": 1,
                             "dcp_stager_options": "StagingOptions(pinned=False, shared=False, "
                                                   "async_staging=False, non_blocking=False)"},
                  "methods": summary, "verdicts": verdicts,
                  "windows": [{**w.__dict__, "cost_s": w.cost_s} for w in windows], "markdown": md,
                  "elapsed_s": elapsed}
        if args.out:
            write(args.out, json.dumps(result, indent=1))
            write(os.path.splitext(args.out)[0] + ".md", md)
            print(f"wrote {args.out}", file=sys.stderr)
    finally:
        for saver in savers.values():
            try:
                saver.close()
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                print(f"warning: closing {saver.name} failed: {exc!r}", file=sys.stderr)
        dist.destroy_process_group()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
