"""``python -m bench.torture``: random SIGKILL trials across the modes, then a results table.

    python -m bench.torture [--modes local-raw,local-zstd,s3,torchrun-group,torchrun-rank,
                                     torchrun-launcher,disk-full] [--kills N] [--seed S]
                            [--out bench/results/torture.json] [--dir PATH] [--mib M] [--quiet]

``--kills N`` is the total number of kills, spread over the selected kill modes by weight (most
go to the fast local modes); ``--modes local-raw=400,s3=100`` gives a mode its own count (for
disk-full: trials). The JSON and a markdown table (same name, ``.md``) are written to ``--out``;
the exit status is 1 when any trial found a failure. S3 runs on a SeaweedFS started here on
127.0.0.1 (or the server at ``$ASYNC_CKPT_S3_ENDPOINT``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .results import ModeResult, Progress, table
from .single import SingleMode, run_single

SINGLE = {"local-raw": SingleMode("local-raw", None, False, 0.2),
          "local-zstd": SingleMode("local-zstd", "zstd", False, 0.6),
          "s3": SingleMode("s3", None, True, 1.5)}
TORCHRUN = {"torchrun-group": "group", "torchrun-rank": "rank", "torchrun-launcher": "launcher"}
ALL = [*SINGLE, *TORCHRUN, "disk-full"]
WEIGHTS = {"local-raw": 0.45, "local-zstd": 0.30, "s3": 0.15, "torchrun-group": 0.034,
           "torchrun-rank": 0.033, "torchrun-launcher": 0.033}


def plan(modes_arg: str, kills: int) -> dict[str, int]:
    """Mode -> kills (disk-full: trials): explicit counts first, the rest of --kills by weight."""
    counts: dict[str, int | None] = {}
    for item in filter(None, (m.strip() for m in modes_arg.split(","))):
        name, _, number = item.partition("=")
        if name not in ALL:
            raise SystemExit(f"unknown mode {name!r}; choose from {', '.join(ALL)}")
        counts[name] = int(number) if number else None
    left = kills - sum(c for n, c in counts.items() if c is not None and n != "disk-full")
    weighted = [n for n, c in counts.items() if c is None and n != "disk-full"]
    total = sum(WEIGHTS[n] for n in weighted)
    out: dict[str, int] = {}
    for name, count in counts.items():
        if count is not None:
            out[name] = count
        elif name == "disk-full":
            out[name] = max(4, kills // 50)
        else:
            out[name] = max(1, round(max(0, left) * WEIGHTS[name] / total))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.torture", description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(ALL))
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/torture.json")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp folder)")
    parser.add_argument("--mib", type=int, default=64, help="state size of the single-process savers")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    counts = plan(args.modes, args.kills)
    progress = Progress(args.quiet)
    workdir = Path(tempfile.mkdtemp(prefix="torture-", dir=args.dir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.torture", *(argv if argv is not None else sys.argv[1:])])
    server = None
    results: list[ModeResult] = []
    started = time.monotonic()
    try:
        for name, count in counts.items():
            rng = random.Random(f"{args.seed}/{name}")
            progress.say(f"== {name}: {count} {'trials' if name == 'disk-full' else 'kills'}")
            if name in SINGLE:
                if SINGLE[name].s3 and server is None:
                    server = _s3_server(workdir)
                results.append(run_single(SINGLE[name], count, rng, workdir, args.mib, progress,
                                          server if SINGLE[name].s3 else None))
            elif name in TORCHRUN:
                from .torchrun import run_torchrun
                results.append(run_torchrun(name, TORCHRUN[name], count, rng, workdir, progress))
            else:
                from .diskfull import run_disk_full
                results.append(run_disk_full(count, rng, workdir, progress))
            md = _write(out, command, args.seed, counts, started, results)   # after every mode
    finally:
        if server is not None:
            server.stop()
        if not any(r.kept_roots for r in results):
            shutil.rmtree(workdir, ignore_errors=True)
    md = _write(out, command, args.seed, counts, started, results)
    print(md)
    failures = [(r.mode, f) for r in results for f in r.failures]
    for mode, failure in failures:
        print(f"\nFAILURE {mode} trial {failure['trial']} (seed {args.seed}, landed {failure['landing']}, "
              f"{failure['plan']}), root {failure['root']}:")
        for problem in failure["problems"]:
            print(f"  - {problem}")
    return 1 if failures else 0


def _write(out: Path, command: str, seed: int, counts: dict, started: float,
           results: list[ModeResult]) -> str:
    """The JSON and the markdown table of the modes done so far; returns the markdown."""
    seconds = time.monotonic() - started
    done = "" if len(results) == len(counts) else f" (partial: {len(results)} of {len(counts)} modes)"
    doc = {"command": command, "seed": seed, "counts": counts, "seconds": seconds,
           "complete": not done, "machine": _machine(), "modes": [r.to_json() for r in results]}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    md = (f"{table(results)}\n\nCommand: `{command}` (seed {seed}); {seconds / 60:.0f} min on "
          f"{os.cpu_count()} CPUs{done}.")
    out.with_suffix(".md").write_text(md + "\n")
    return md


def _s3_server(workdir: Path):
    from async_ckpt.storage.testing import servers
    return servers.from_environment() or servers.start_seaweed(workdir)


def _machine() -> dict:
    import platform
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


if __name__ == "__main__":
    sys.exit(main())
