"""`python -m bench`: async_ckpt against every peer and floor, side by side, in one run.

    python -m bench --preset quick     # CI sized (about a minute), sanity only
    python -m bench --preset full      # 256 MiB / 1 GiB / 4 GiB, worlds 1/2/4, local + S3; writes
                                       # bench/results/harness-full.{json,md}, plots, docs/benchmarks.md

Any dimension can be overridden, e.g. ``--sizes 1GiB --mixes fp32 --worlds 1 --targets local``.
World 1 on the local target runs every peer (bench/harness/local.py); worlds > 1 reuse
bench/distributed.py (torchrun, gloo; fp32) and the S3 target reuses bench/s3.py (loopback
SeaweedFS; fp32). Every figure is a median over repeats with min/max; floors come from the same
run. The Markdown goes to stdout and to <out-dir>/<name>.md, the JSON beside it, PNGs under
<out-dir>/plots/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import torch.distributed as dist

from . import plots
from .common import PageCache, free_port, machine_info
from .harness import docs_page
from .harness.flatness import run_flatness
from .harness.local import run_case
from .harness.peers import ALL_PEERS, torchsnapshot_status
from .harness.state import DTYPE_MIXES
from .harness.summary import case_markdown, flatness_markdown, summarise_case

PRESETS = {
    "quick": dict(sizes="16MiB", mixes="fp32,bf16_adam", repeats=2, worlds="1,2", dist_size="8MiB",
                  dist_repeats=1, targets="local,s3", s3_size="8MiB", s3_repeats=1,
                  flatness_saves=20, flatness_size="2MiB", docs=False),
    "full": dict(sizes="256MiB,1GiB,4GiB", mixes="fp32,bf16_adam", repeats=5, worlds="1,2,4",
                 dist_size="1GiB", dist_repeats=3, targets="local,s3", s3_size="1GiB", s3_repeats=5,
                 flatness_saves=100, flatness_size="256MiB", docs=True),
}
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(text: str) -> int:
    for unit, mult in UNITS.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * mult)
    raise SystemExit(f"size {text!r}: write it as a number with KiB, MiB or GiB, e.g. 256MiB")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--sizes", help="comma-separated state sizes, e.g. 256MiB,1GiB,4GiB")
    p.add_argument("--mixes", help=f"dtype mixes: {','.join(DTYPE_MIXES)}")
    p.add_argument("--peers", default=",".join(ALL_PEERS), help="which peers (default: all)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--layers", type=int, default=16, help="layers per state (tensors: 1 per layer "
                   "for fp32, 3 for bf16_adam)")
    p.add_argument("--order", choices=("auto", "interleaved", "blocked"), default="auto")
    p.add_argument("--worlds", help="world sizes; 1 = the local single-process peers, >1 = torchrun")
    p.add_argument("--dist-size")
    p.add_argument("--dist-repeats", type=int)
    p.add_argument("--targets", help="local,s3")
    p.add_argument("--s3-size")
    p.add_argument("--s3-repeats", type=int)
    p.add_argument("--flatness-saves", type=int, help="0 skips the memory-flatness run")
    p.add_argument("--flatness-size")
    p.add_argument("--out-dir", default=os.path.join("bench", "results"))
    p.add_argument("--name", help="result file stem (default harness-<preset>)")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--docs", dest="docs", action="store_true", default=None,
                   help="rewrite docs/benchmarks.md from this run (default: only for --preset full)")
    p.add_argument("--no-docs", dest="docs", action="store_false")
    p.add_argument("--no-drop-caches", action="store_true", help="only sync (cold loads are then warm)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or f"harness-{args.preset}"
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s]
    args.mix_list = [m for m in args.mixes.split(",") if m]
    args.peer_list = [m for m in args.peers.split(",") if m]
    args.world_list = [int(w) for w in args.worlds.split(",") if w]
    args.target_list = [t for t in args.targets.split(",") if t]
    bad = set(args.target_list) - {"local", "s3"}
    if bad:
        p.error(f"unknown target(s) {sorted(bad)}: use local and/or s3")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_local(args, folder: str, cache: PageCache) -> dict:
    skipped: dict[str, str] = {}
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)   # DCP needs a process group
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        cases = []
        for nbytes in args.size_list:
            for mix in args.mix_list:
                peers = list(args.peer_list)
                if "torchsnapshot" in peers and (why := torchsnapshot_status(mix)):
                    peers.remove("torchsnapshot")
                    skipped[f"torchsnapshot ({mix})"] = why
                log(f"local: {mix} {nbytes / 2**20:.0f} MiB, peers {','.join(peers)}")
                cases.append(run_case(nbytes, mix, peers, args.repeats, args.layers, folder, cache, args.order))
                shutil.rmtree(os.path.join(folder, f"{mix}-{nbytes}"), ignore_errors=True)
    finally:
        dist.destroy_process_group()
    return {"cases": cases, "summaries": [summarise_case(c) for c in cases], "skipped_peers": skipped}


def run_distributed(args, folder: str) -> dict | None:
    worlds = [w for w in args.world_list if w > 1]
    if not worlds:
        return None
    from . import distributed
    if args.no_drop_caches:
        os.environ["BENCH_NO_DROP"] = "1"
    ns = SimpleNamespace(cases="replicated,per_rank", size_gib=parse_size(args.dist_size) / 2**30,
                         repeats=args.dist_repeats)
    raw = {}
    for w in worlds:
        log(f"distributed: world {w}, {args.dist_size} per case")
        raw[w] = distributed.run_world(w, ns, folder)
    results = {w: distributed.summarise(r) for w, r in raw.items()}
    return {"size_bytes": parse_size(args.dist_size), "repeats": args.dist_repeats, "results": results,
            "page_cache": next(iter(raw.values()))["page_cache"], "markdown": distributed.markdown(results)}


def run_s3(args, folder: str) -> dict | None:
    if "s3" not in args.target_list:
        return None
    from . import s3
    log(f"s3: loopback SeaweedFS, {args.s3_size}")
    ns = SimpleNamespace(size_gib=parse_size(args.s3_size) / 2**30, tensors=args.layers,
                         repeats=args.s3_repeats, dir=folder)
    doc = s3.run(ns)
    rows, verdicts = s3.summarise(doc)
    return {**{k: v for k, v in doc.items() if k != "machine"}, "rows": rows, "verdicts": verdicts,
            "markdown": s3.markdown(rows, verdicts, doc, args.s3_repeats)}


def render(doc: dict) -> str:
    parts = [f"## async_ckpt benchmark harness: preset {doc['preset']}\n",
             f"Command: `{doc['command']}`; {doc['elapsed_s']:.0f} s; page cache: {doc['page_cache']}.\n"]
    local = doc.get("local")
    if local:
        parts.append("### Local folder, one process (world 1)\n")
        parts.append("Cells: median (min-max) seconds over the repeats. Ratios divide medians of the same "
                     "case: blocking/staged by the memcpy floor, committed by raw write+fsync, load by the "
                     "raw cold read and by the fastest dcp.load. Extra RSS = what the peer keeps between "
                     "saves (pools, stagers) + the largest transient rise during one save.\n")
        parts += [case_markdown(s) for s in local["summaries"]]
        for name, why in local["skipped_peers"].items():
            parts.append(f"- {name} skipped: {why}\n")
    if doc.get("flatness"):
        parts.append("### Memory flatness\n\n" + flatness_markdown(doc["flatness"]))
    if doc.get("distributed"):
        d = doc["distributed"]
        parts.append(f"### Distributed (gloo, fp32, {d['size_bytes'] / 2**20:.0f} MiB per case, "
                     f"{d['repeats']} repeats)\n\n{d['markdown']}\n")
    if doc.get("s3"):
        parts.append(doc["s3"]["markdown"])
    return "\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="async_ckpt_harness-", dir=args.dir)
    cache = PageCache(not args.no_drop_caches)
    doc: dict = {"preset": args.preset, "command": "python -m bench " + " ".join(argv if argv is not None
                                                                                  else sys.argv[1:]),
                 "config": {k: v for k, v in vars(args).items() if not k.endswith("_list")},
                 "page_cache": cache.describe(), "load_average_start": os.getloadavg()}
    try:
        doc["machine"] = machine_info(folder)
        if "local" in args.target_list and 1 in args.world_list:
            doc["local"] = run_local(args, folder, cache)
        if args.flatness_saves:
            log(f"flatness: {args.flatness_saves} saves of {args.flatness_size}")
            doc["flatness"] = run_flatness(parse_size(args.flatness_size), args.flatness_saves, folder)
        doc["distributed"] = run_distributed(args, folder)
        doc["s3"] = run_s3(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    doc["load_average_end"] = os.getloadavg()
    doc["elapsed_s"] = time.perf_counter() - started
    os.makedirs(args.out_dir, exist_ok=True)
    doc["plots"] = plots.draw_all(doc, os.path.join(args.out_dir, "plots"), args.name) if doc.get("local") else []
    text = render(doc)
    stem = os.path.join(args.out_dir, args.name)
    with open(stem + ".json.tmp", "w") as f:
        json.dump({**doc, "markdown": text}, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")
    with open(stem + ".md", "w") as f:
        f.write(text)
    if args.docs:
        docs_page.write(doc, text, stem)
    print(text)
    log(f"wrote {stem}.json, {stem}.md, {len(doc['plots'])} plots"
        + (", docs/benchmarks.md" if args.docs else "") + f" ({doc['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
