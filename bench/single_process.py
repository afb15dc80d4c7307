"""Single-process save benchmark: async_ckpt next to the memcpy and fsync'd-write floors and DCP.

One process, one synthetic fp32 state (default ~1 GiB in 20 tensors). Measured, each as the
median over ``--repeats`` with min/max:

- memcpy floor: ``copy_`` of every tensor into preallocated, already touched buffers;
- raw write floor: sequential ``os.write`` of the same bytes to a new file, ``fsync`` of the file
  and of its folder;
- ``AsyncCheckpointer.save()``: steady-state blocking time (the first, buffer-allocating save is
  reported apart) and time to the durable commit (``save()`` start until ``handle.wait()``), with
  compression None and "zstd";
- ``torch.distributed.checkpoint``: ``async_save`` (a fresh stager per call, DCP's default, and a
  reused ``DefaultStager``, whose first call is reported apart) until it returns and until its
  future resolves; ``dcp.save`` with ``FileSystemWriter(thread_count=1|2)``.

Methods are interleaved: every round runs each method once (rotating the order), so background
load hits all of them alike. Before every timed write the page cache is flushed (``sync``) and,
where permitted, dropped (``echo 1 > /proc/sys/vm/drop_caches``). Ratios use medians of this run.

    python -m bench.single_process [--size-gib 1.0] [--tensors 20] [--repeats 5]
                                   [--out bench/results/single_process.json] [--dir PATH]
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
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from async_ckpt.storage.local import fsync_dir

from .common import GIB, PageCache, TensorState, free_port, machine_info, tree_bytes
from .report import markdown, summarise
from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent


# -- the state --------------------------------------------------------------------------------
def make_state(size_gib: float, n: int) -> dict[str, torch.Tensor]:
    numel = max(1, int(size_gib * GIB) // 4 // n)
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i:02d}.weight": torch.randn(numel, generator=gen) for i in range(n)}


# -- rows -------------------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    label: str
    figure: str              # "blocking" | "durable"
    samples: list[float] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    one_off: bool = False    # a single warm-up sample, not a steady-state figure

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


class Bench:
    def __init__(self, args, folder: str):
        self.args, self.folder = args, folder
        self.state = make_state(args.size_gib, args.tensors)
        self.tensors = list(self.state.values())
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        self.cache = PageCache(not args.no_drop_caches)
        self.rows: dict[str, Row] = {}
        self.extras: dict[str, list] = {}
        self._closers: list[Callable[[], None]] = []

    def row(self, key: str, label: str, figure: str, one_off: bool = False) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, label, figure, one_off=one_off)
        return self.rows[key]

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    # -- floors -------------------------------------------------------------------------------
    def setup_memcpy(self) -> Callable[[int], None]:
        dst = [torch.empty_like(t) for t in self.tensors]
        for d, s in zip(dst, self.tensors):   # touch every page once: steady state
            d.copy_(s)

        def run(_: int) -> None:
            t0 = time.perf_counter()
            for d, s in zip(dst, self.tensors):
                d.copy_(s)
            self.row("memcpy", "memcpy into preallocated buffers (floor)", "blocking").samples.append(
                time.perf_counter() - t0)
        return run

    def run_memcpy_fresh(self, _: int) -> None:
        t0 = time.perf_counter()
        out = [torch.empty_like(t).copy_(t) for t in self.tensors]
        dt = time.perf_counter() - t0
        del out
        self.row("memcpy_fresh", "memcpy into fresh allocations (reference)", "blocking").samples.append(dt)

    def run_raw_write_early(self, i: int) -> None:
        self.run_raw_write(i, early=True)

    def run_raw_write(self, i: int, early: bool = False) -> None:
        """The fsync'd sequential write floor. `early`: also start writeback every 8 MiB with
        sync_file_range, the trick async_ckpt's local writer uses (a stricter floor)."""
        from async_ckpt.storage.libc import sync_file_range as _sync_file_range
        folder = self.path("raw")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"raw-{i}.bin")
        views = [memoryview(t.numpy()).cast("B") for t in self.tensors]
        self.cache.settle()
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            done = 0
            for view in views:
                while len(view):
                    n = os.write(fd, view[:8 << 20 if early else 1 << 30])
                    if early and _sync_file_range is not None:
                        _sync_file_range(fd, done, n, 2)
                    done += n
                    view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(folder)
        dt = time.perf_counter() - t0
        row = (self.row("raw_early", "raw os.write + early writeback + fsync (stricter floor)", "durable")
               if early else self.row("raw", "raw os.write + fsync file + fsync dir (floor)", "durable"))
        row.samples.append(dt)
        row.stored.append(os.path.getsize(path))
        os.unlink(path)

    # -- async_ckpt ---------------------------------------------------------------------------
    def setup_async_ckpt(self, compression: str | None) -> Callable[[int], None]:
        name = compression or "none"
        root = self.path(f"async_ckpt-{name}")
        ck = AsyncCheckpointer(root, [StateComponent("model", TensorState(self.state), SharingPattern.PER_RANK)],
                               compression=compression, keep_last=1)
        self._closers.append(ck.close)
        label = f"async_ckpt save(), compression={compression}"
        step = [0]

        def once(first: bool) -> None:
            self.cache.settle()
            t0 = time.perf_counter()
            h = ck.save(step[0])
            t1 = time.perf_counter()
            info = h.wait()
            t2 = time.perf_counter()
            ck.wait()      # retention (keep_last=1 deletes the previous step) stays out of the timing
            step[0] += 1
            if first:
                self.row(f"ack_{name}_first", f"{label}: first save (allocates buffers)", "blocking",
                         one_off=True).samples.append(t1 - t0)
                self.row(f"ack_{name}_first_durable", f"{label}: first save", "durable",
                         one_off=True).samples.append(t2 - t0)
                return
            self.row(f"ack_{name}", label, "blocking").samples.append(t1 - t0)
            row = self.row(f"ack_{name}_durable", label, "durable")
            row.samples.append(t2 - t0)
            row.stored.append(info.stored_nbytes)
            self.extras.setdefault(f"async_ckpt_{name}_timings", []).append(
                {"bench_blocking_s": t1 - t0, "bench_durable_s": t2 - t0, **info.timings})

        once(first=True)
        return lambda _: once(first=False)

    # -- DCP ----------------------------------------------------------------------------------
    def _dcp_async(self, key: str, label: str, i: int, stager, one_off: bool = False) -> None:
        path = self.path(f"dcp-{key}-{i}")
        sd = self.state
        self.cache.settle()
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=path, async_stager=stager)
        t1 = time.perf_counter()
        if hasattr(fut, "upload_completion"):   # AsyncSaveResponse (async staging)
            fut.upload_completion.result()
        else:
            fut.result()
        t2 = time.perf_counter()
        self.row(key, label, "blocking", one_off).samples.append(t1 - t0)
        row = self.row(f"{key}_durable", label, "durable", one_off)
        row.samples.append(t2 - t0)
        row.stored.append(tree_bytes(path))
        shutil.rmtree(path, ignore_errors=True)

    def setup_dcp(self) -> tuple[Callable[[int], None], Callable[[int], None]]:
        # one-off import/thread/gloo costs on a tiny state, outside every timing
        tiny = {"x": torch.zeros(16)}
        dcp.async_save(tiny, checkpoint_id=self.path("dcp-warmup-a")).result()
        dcp.save(tiny, checkpoint_id=self.path("dcp-warmup-s"))
        shutil.rmtree(self.path("dcp-warmup-a"), ignore_errors=True)
        shutil.rmtree(self.path("dcp-warmup-s"), ignore_errors=True)

        def fresh(i: int) -> None:
            self._dcp_async("dcp_async", "DCP async_save (default: fresh staging copy)", i, None)

        stager = DefaultStager(StagingOptions(False, False, False, False))
        self._closers.append(stager.close)
        label = "DCP async_save (reused DefaultStager)"
        self._dcp_async("dcp_async_reuse_first", f"{label}: first call", -1, stager, one_off=True)

        def reused(i: int) -> None:
            self._dcp_async("dcp_async_reuse", label, i, stager)
        return fresh, reused

    def make_dcp_sync(self, threads: int) -> Callable[[int], None]:
        def run(i: int) -> None:
            path = self.path(f"dcp-sync{threads}-{i}")
            self.cache.settle()
            t0 = time.perf_counter()
            dcp.save(self.state, storage_writer=dcp.FileSystemWriter(path, thread_count=threads))
            dt = time.perf_counter() - t0
            row = self.row(f"dcp_sync{threads}", f"dcp.save sync, FileSystemWriter thread_count={threads}",
                           "durable")
            row.samples.append(dt)
            row.stored.append(tree_bytes(path))
            shutil.rmtree(path, ignore_errors=True)
        return run

    # -- driver -------------------------------------------------------------------------------
    def run(self) -> None:
        args = self.args
        memcpy = self.setup_memcpy()
        methods: list[tuple[str, Callable[[int], None], int]] = [
            ("memcpy", memcpy, args.repeats), ("memcpy_fresh", self.run_memcpy_fresh, args.repeats),
            ("raw", self.run_raw_write, args.repeats), ("raw_early", self.run_raw_write_early, args.repeats)]
        if not args.skip_async_ckpt:
            methods.append(("ack_none", self.setup_async_ckpt(None), args.repeats))
            if not args.skip_zstd:
                methods.append(("ack_zstd", self.setup_async_ckpt("zstd"), args.repeats))
        if not args.skip_dcp:
            fresh, reused = self.setup_dcp()
            methods += [("dcp_async", fresh, args.repeats), ("dcp_async_reuse", reused, args.repeats)]
            sync_repeats = args.repeats if args.dcp_sync_repeats is None else args.dcp_sync_repeats
            methods += [(f"dcp_sync{k}", self.make_dcp_sync(k), sync_repeats) for k in (1, 2)]
        for r in range(max(n for _, _, n in methods)):
            shift = r % len(methods)
            order = methods[shift:] + methods[:shift]
            for name, fn, n in order:
                if r < n:
                    fn(r)
                    gc.collect()
            print(f"  round {r + 1} done ({time.perf_counter() - T0:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                print(f"warning: cleanup failed: {exc!r}", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.single_process", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=1.0, help="total fp32 state size (default 1.0)")
    p.add_argument("--tensors", type=int, default=20, help="number of equal tensors (default 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per method (default 5)")
    p.add_argument("--out", default="bench/results/single_process.json", help="JSON results file")
    p.add_argument("--dir", default=None, help="folder to write into (default: a new temp folder); "
                   "a fresh subfolder is created inside and removed afterwards")
    p.add_argument("--dcp-sync-repeats", type=int, default=None, help="repeats of dcp.save (default --repeats)")
    p.add_argument("--no-drop-caches", action="store_true", help="only sync before timed writes")
    p.add_argument("--skip-dcp", action="store_true")
    p.add_argument("--skip-zstd", action="store_true")
    p.add_argument("--skip-async-ckpt", action="store_true")
    args = p.parse_args(argv)
    if args.size_gib <= 0 or args.tensors < 1 or args.repeats < 1:
        p.error("--size-gib must be > 0, --tensors and --repeats >= 1")
    return args


T0 = time.perf_counter()


def main(argv=None) -> int:
    global T0
    T0 = time.perf_counter()
    load_start = os.getloadavg()
    args = parse_args(argv)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="async_ckpt_bench-", dir=args.dir)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)   # DCP needs a process group
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    bench = None
    try:
        bench = Bench(args, folder)
        print(f"state: {args.tensors} fp32 tensors, {bench.nbytes / GIB:.3f} GiB; dir {folder}; "
              f"page cache: {bench.cache.describe()}", file=sys.stderr, flush=True)
        bench.run()
        bench.close()
        summary, verdicts = summarise(bench)
        info = machine_info(folder)
        info["loadavg_start"], info["loadavg_end"] = load_start, os.getloadavg()
        table = markdown(summary, bench)
        elapsed = time.perf_counter() - T0
        print(f"\n### async_ckpt single-process save, {bench.nbytes / GIB:.3f} GiB fp32 in {args.tensors} "
              f"tensors, {args.repeats} repeats ({info['cpu_count']} CPUs, torch {torch.__version__}, "
              f"{info['target_fs'].get('fstype', '?')} at {info['target_fs'].get('mount_point', '?')})\n")
        print(f"Page cache: {bench.cache.describe()}. Ratios: blocking vs memcpy floor, durable vs raw "
              "fsync'd write, from medians of this run (targets judged on these); 'ratio (mins)' divides "
              "the fastest samples, less sensitive to other load on the machine. Load average start/end: "
              f"{info['loadavg_start'][0]:.2f}/{info['loadavg_end'][0]:.2f}.\n")
        print(table)
        print()
        print("\n".join(verdicts))
        print(f"\n(total {elapsed:.0f} s)")
        result = {"benchmark": "single_process", "machine": info,
                  "config": {"size_gib": args.size_gib, "tensors": args.tensors, "repeats": args.repeats,
                             "dcp_sync_repeats": args.dcp_sync_repeats,
                             "tensor_numel": bench.tensors[0].numel(), "dtype": "float32",
                             "total_state_bytes": bench.nbytes, "interleaved_rounds": True},
                  "total_state_bytes": bench.nbytes, "page_cache": bench.cache.describe(),
                  "page_cache_dropped": bench.cache.can_drop, "rows": summary, "verdicts": verdicts,
                  "async_ckpt_timings": bench.extras, "markdown": table, "elapsed_s": elapsed}
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, args.out)
            print(f"wrote {args.out}", file=sys.stderr)
    finally:
        if bench is not None:
            bench.close()
        dist.destroy_process_group()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
