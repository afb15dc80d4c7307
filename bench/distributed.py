"""Distributed save benchmark: async_ckpt against DCP with real gloo process groups.

World size 2 (one node, 2 ranks) and 4 (two simulated nodes of 2 ranks: two torchrun launchers
with --nnodes=2 on this machine). Three cases: a REPLICATED state of --size-gib (identical on every
rank) without replica validation and with the default (QUICK: every rank stages and hashes its
replica), and PER_RANK shards adding up to --size-gib. Per save and rank also the process's CPU
time (its background threads included). Figures per case, medians over --repeats with
min/max: each rank's blocking time of save() next to its own memcpy floor (the bytes it stages),
time until committed (save() start to handle.wait(), max over ranks), bytes written per node,
and dcp.async_save (default stager) / dcp.save(thread_count=2) measured in the same run.

    python -m bench.distributed [--size-gib 1.0] [--repeats 3] [--worlds 2,4]
                                [--out bench/results/distributed.json] [--dir PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from .common import GIB, free_port, machine_info

RANK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_rank.py")
CASES = "replicated,replicated_checked,per_rank"


def run_world(world: int, args, folder: str) -> dict:
    nnodes = 1 if world <= 2 else 2
    nproc = world // nnodes
    out = os.path.join(folder, f"world{world}.json")
    port = free_port()
    procs = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node}",
               f"--nproc-per-node={nproc}", "--rdzv-backend=static", "--master-addr=127.0.0.1",
               f"--master-port={port}", RANK_SCRIPT, args.cases, str(args.size_gib), str(args.repeats),
               os.path.join(folder, f"w{world}"), out]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    codes = [p.wait() for p in procs]
    if codes != [0] * len(codes):
        raise SystemExit(f"world {world}: launchers exited with {codes}")
    with open(out) as f:
        return json.load(f)


def _stats(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "n": len(samples)}


def summarise(raw: dict) -> dict:
    """Per case: per-rank blocking vs its memcpy floor; commit = slowest rank per round."""
    summary = {}
    for case in raw["ranks"][0]:
        per_rank = [r[case] for r in raw["ranks"]]

        def slowest(key: str) -> list[float]:
            return [max(vals) for vals in zip(*(r["rows"][key] for r in per_rank))]
        blocking = []
        for rank, r in enumerate(per_rank):
            ack, floor = _stats(r["rows"]["ack_blocking"]), _stats(r["rows"]["memcpy"])
            dcp_block = _stats(r["rows"]["dcp_async_blocking"])
            cpu = _stats(r["rows"]["ack_cpu"]) if r["rows"].get("ack_cpu") else None
            blocking.append({"rank": rank, "staged_gib": r["staged_bytes"] / GIB, "ack": ack,
                             "memcpy": floor, "dcp_async": dcp_block, "cpu": cpu,
                             "ratio_vs_memcpy": ack["median_s"] / floor["median_s"] if floor["median_s"] else None})
        commit = {"ack": _stats(slowest("ack_commit")), "dcp_async": _stats(slowest("dcp_async_commit")),
                  "dcp_save2": _stats(slowest("dcp_save2"))}
        commit["ratio_vs_dcp_save2"] = commit["ack"]["median_s"] / commit["dcp_save2"]["median_s"]
        summary[case] = {"blocking": blocking, "commit": commit,
                         "node_bytes": per_rank[0]["node_bytes"]}
    return summary


def markdown(results: dict) -> str:
    lines = ["| world | case | rank | staged GiB | memcpy floor s | async_ckpt blocking s | ratio | "
             "CPU s per save | dcp.async_save blocking s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for world, summ in results.items():
        for case, s in summ.items():
            for b in s["blocking"]:
                lines.append(f"| {world} | {case} | {b['rank']} | {b['staged_gib']:.3f} | "
                             f"{b['memcpy']['median_s']:.3f} | {b['ack']['median_s']:.3f} "
                             f"({b['ack']['min_s']:.3f}-{b['ack']['max_s']:.3f}) | "
                             f"{b['ratio_vs_memcpy']:.2f}x | "
                             f"{b['cpu']['median_s'] if b.get('cpu') else float('nan'):.3f} | "
                             f"{b['dcp_async']['median_s']:.3f} |")
    lines += ["", "| world | case | async_ckpt commit s | dcp.async_save s | dcp.save 2 threads s | "
              "ratio vs dcp.save | bytes per node file |", "|---|---|---:|---:|---:|---:|---|"]
    for world, summ in results.items():
        for case, s in summ.items():
            c = s["commit"]
            nodes = ", ".join(f"{k}: {v / GIB:.3f} GiB" for k, v in sorted(s["node_bytes"].items()))
            lines.append(f"| {world} | {case} | {c['ack']['median_s']:.3f} ({c['ack']['min_s']:.3f}-"
                         f"{c['ack']['max_s']:.3f}) | {c['dcp_async']['median_s']:.3f} | "
                         f"{c['dcp_save2']['median_s']:.3f} | {c['ratio_vs_dcp_save2']:.2f}x | {nodes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--cases", default=CASES)
    p.add_argument("--out", default=os.path.join("bench", "results", "distributed.json"))
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp dir on /tmp's disk)")
    args = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="ack-dist-bench-", dir=args.dir)
    started = time.time()
    try:
        raw = {int(w): run_world(int(w), args, folder) for w in args.worlds.split(",")}
        results = {w: summarise(r) for w, r in raw.items()}
        doc = {"machine": machine_info(folder), "size_gib": args.size_gib, "repeats": args.repeats,
               "page_cache": next(iter(raw.values()))["page_cache"], "results": results, "raw": raw,
               "seconds": time.time() - started}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    table = markdown(results)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"# Distributed save benchmark\n\n{args.size_gib} GiB per case, {args.repeats} repeats, "
                f"{doc['page_cache']}.\n\n{table}\n")
    print(table)
    return doc


if __name__ == "__main__":
    main()
