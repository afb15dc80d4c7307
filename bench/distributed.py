"""Distributed save benchmark: async_ckpt against DCP with real gloo process groups.

World size 2 (one node, 2 ranks) and 4 (two simulated nodes of 2 ranks: two torchrun launchers
with --nnodes=2 on this machine). Three cases: a REPLICATED state of --size-gib (identical on every
rank) without replica validation and with the default (QUICK: every rank stages and hashes its
replica), and PER_RANK shards adding up to --size-gib. Per save and rank also the process's CPU
time (its background threads included). Figures per case, medians over --repeats with
min/max: each rank's blocking time of save() next to its own memcpy floor (the bytes it stages),
time until committed (save() start to handle.wait(), max over ranks), the same with one data file
per rank (``node_object=False``) next to the default one data object per node, bytes written per
node, and dcp.async_save (default stager) / dcp.save(thread_count=2) measured in the same run.

The ``sharded`` case (bench/dist_sharded.py) runs once, not per world: --size-gib of DTensor
state (an FSDP2 model and its AdamW state) saved at world 4 on two simulated nodes, with the same
figures as above (blocking per rank vs its memcpy floor, commit vs dcp.save / dcp.async_save),
then loaded at world 2 into a fresh model on a 2-rank mesh (resharding 4 -> 2), cold, next to
dcp.load of the DCP checkpoint of the same state, every load checked bit-identical against a
digest taken at save. Targets: blocking <= 1.25x memcpy, commit <= 1.0x dcp.save (2 threads),
load <= 1.0x dcp.load.

    python -m bench.distributed [--size-gib 1.0] [--repeats 3] [--worlds 2,4] [--cases ...]
                                [--sharded-worlds 4,2] [--out bench/results/distributed.json]
                                [--dir PATH]
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
SHARDED_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_sharded.py")
CASES = "replicated,replicated_checked,per_rank,sharded"
TARGETS = {"blocking_vs_memcpy": 1.25, "commit_vs_dcp_save2": 1.0, "load_vs_dcp_load": 1.0}


def launch(world: int, script: str, script_args: list[str], out: str, what: str) -> dict:
    """`script` on `world` ranks: one node up to 2 ranks, else two simulated nodes (two torchrun
    launchers with --nnodes=2 on this machine); returns the JSON rank 0 wrote to `out`."""
    nnodes = 1 if world <= 2 else 2
    nproc = world // nnodes
    port = free_port()
    procs = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node}",
               f"--nproc-per-node={nproc}", "--rdzv-backend=static", "--master-addr=127.0.0.1",
               f"--master-port={port}", script, *script_args, out]
        procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    codes = [p.wait() for p in procs]
    if codes != [0] * len(codes):
        raise SystemExit(f"{what}: launchers exited with {codes}")
    with open(out) as f:
        return json.load(f)


def run_world(world: int, args, folder: str) -> dict:
    cases = ",".join(c for c in args.cases.split(",") if c != "sharded")
    return launch(world, RANK_SCRIPT, [cases, str(args.size_gib), str(args.repeats),
                                       os.path.join(folder, f"w{world}")],
                  os.path.join(folder, f"world{world}.json"), f"world {world}")


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
        if per_rank[0]["rows"].get("files_commit"):     # node object vs one file per rank
            commit["files"] = _stats(slowest("files_commit"))
            commit["ratio_vs_files"] = commit["ack"]["median_s"] / commit["files"]["median_s"]
            commit["paired_ratios_vs_files"] = [a / f for a, f in zip(slowest("ack_commit"),
                                                                      slowest("files_commit"), strict=True)]
        summary[case] = {"blocking": blocking, "commit": commit,
                         "node_bytes": per_rank[0]["node_bytes"]}
    return summary


def run_sharded(args, folder: str) -> dict:
    """The sharded case: saved at the first of --sharded-worlds, loaded at the second."""
    save_world, load_world = (int(w) for w in args.sharded_worlds.split(","))
    where = os.path.join(folder, "sharded")
    os.makedirs(where, exist_ok=True)
    common = [str(args.size_gib), str(args.repeats), where]
    save = launch(save_world, SHARDED_SCRIPT, ["save", *common], os.path.join(where, "save.json"),
                  f"sharded save, world {save_world}")
    load = launch(load_world, SHARDED_SCRIPT, ["load", *common], os.path.join(where, "load.json"),
                  f"sharded load, world {load_world}")
    return {"save": save, "load": load}


def summarise_sharded(raw: dict) -> dict:
    """Blocking per rank vs its memcpy floor; commit and load = slowest rank per round."""
    save, load = raw["save"], raw["load"]

    def slowest(ranks: list[dict], key: str) -> list[float]:
        return [max(vals) for vals in zip(*(r["rows"][key] for r in ranks), strict=True)]
    blocking = []
    for rank, r in enumerate(save["ranks"]):
        ack, floor = _stats(r["rows"]["ack_blocking"]), _stats(r["rows"]["memcpy"])
        blocking.append({"rank": rank, "staged_gib": r["staged_bytes"] / GIB, "ack": ack, "memcpy": floor,
                         "dcp_async": _stats(r["rows"]["dcp_async_blocking"]),
                         "cpu": _stats(r["rows"]["ack_cpu"]),
                         "ratio_vs_memcpy": ack["median_s"] / floor["median_s"]})
    commit = {"ack": _stats(slowest(save["ranks"], "ack_commit")),
              "dcp_async": _stats(slowest(save["ranks"], "dcp_async_commit")),
              "dcp_save2": _stats(slowest(save["ranks"], "dcp_save2"))}
    commit["ratio_vs_dcp_save2"] = commit["ack"]["median_s"] / commit["dcp_save2"]["median_s"]
    commit["node0_write"] = _stats(save["ranks"][0]["rows"]["ack_node0_write"])
    commit["manifest_total"] = _stats(save["ranks"][0]["rows"]["ack_manifest_total"])
    # paired: the same round, side by side
    commit["paired_ratios"] = [a / d for a, d in zip(slowest(save["ranks"], "ack_commit"),
                                                     slowest(save["ranks"], "dcp_save2"), strict=True)]
    ack_load, dcp_load = slowest(load["ranks"], "ack_load"), slowest(load["ranks"], "dcp_load")
    loads = {"ack": _stats(ack_load), "dcp": _stats(dcp_load),
             "ack_cpu": _stats(slowest(load["ranks"], "ack_load_cpu")),
             "dcp_cpu": _stats(slowest(load["ranks"], "dcp_load_cpu")),
             "ratio_vs_dcp_load": statistics.median(ack_load) / statistics.median(dcp_load),
             "paired_ratios": [a / d for a, d in zip(ack_load, dcp_load, strict=True)],
             "digests_checked": sum(r["digests_checked"] for r in load["ranks"]),
             "slabs": load["ranks"][0]["slabs"],
             "loaded_gib_per_rank": [r["loaded_bytes"] / GIB for r in load["ranks"]]}
    worst_blocking = max(b["ratio_vs_memcpy"] for b in blocking)
    verdicts = {"blocking_vs_memcpy": worst_blocking, "commit_vs_dcp_save2": commit["ratio_vs_dcp_save2"],
                "load_vs_dcp_load": loads["ratio_vs_dcp_load"]}
    state_gib = sum(r["staged_bytes"] for r in save["ranks"]) / GIB
    return {"save_world": save["world_size"], "save_nodes": save["num_nodes"], "load_world": load["world_size"],
            "layers": save["layers"], "dim": save["dim"], "state_gib": state_gib,
            "blocking": blocking, "commit": commit, "load": loads, "node_bytes": save["ranks"][0]["node_bytes"],
            "verdicts": {k: {"ratio": v, "target": TARGETS[k], "met": v <= TARGETS[k]} for k, v in verdicts.items()},
            "page_cache": save["page_cache"]}


def _cell(s: dict) -> str:
    return f"{s['median_s']:.3f} ({s['min_s']:.3f}-{s['max_s']:.3f})"


def markdown_sharded(s: dict) -> str:
    lines = [f"State: FSDP2 (`fully_shard`, 1-D mesh) model of {s['layers']} bias-free Linear "
             f"{s['dim']}x{s['dim']} layers + AdamW (exp_avg, exp_avg_sq, step): {s['state_gib']:.3f} GiB "
             f"of DTensors, saved at world {s['save_world']} ({s['save_nodes']} simulated nodes), loaded at "
             f"world {s['load_world']} (fresh model on a {s['load_world']}-rank mesh, resharding). "
             "SharingPattern.SHARDED components `model` and `optim`; DCP gets the same model and "
             "optimizer as Statefuls. Cells: median (min-max) seconds.", "",
             "| rank | staged GiB | memcpy floor s | async_ckpt blocking s | ratio | CPU s per save | "
             "dcp.async_save blocking s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for b in s["blocking"]:
        lines.append(f"| {b['rank']} | {b['staged_gib']:.3f} | {_cell(b['memcpy'])} | {_cell(b['ack'])} | "
                     f"{b['ratio_vs_memcpy']:.2f}x | {b['cpu']['median_s']:.3f} | {_cell(b['dcp_async'])} |")
    c, ld = s["commit"], s["load"]
    nodes = ", ".join(f"{k}: {v / GIB:.3f} GiB" for k, v in sorted(s["node_bytes"].items()))
    paired = ", ".join(f"{r:.2f}" for r in c["paired_ratios"])
    lines += ["", "| commit (save() start to committed, slowest rank) | s |", "|---|---:|",
              f"| async_ckpt save() -> handle.wait() | {_cell(c['ack'])} |",
              f"| dcp.save, thread_count=2 | {_cell(c['dcp_save2'])} |",
              f"| dcp.async_save -> future | {_cell(c['dcp_async'])} |",
              f"| of async_ckpt's commit: node 0's writer (map, stream + hash, fsync) | {_cell(c['node0_write'])} |",
              f"| of async_ckpt's commit: save() to manifest written (manifest `timings.total_s`) | "
              f"{_cell(c['manifest_total'])} |",
              "", f"Commit ratio vs dcp.save (2 threads): {c['ratio_vs_dcp_save2']:.2f}x (medians; per round: "
              f"{paired}). Bytes per node file: {nodes}.", ""]
    paired = ", ".join(f"{r:.2f}" for r in ld["paired_ratios"])
    lines += [f"| load {s['save_world']} -> {s['load_world']} (cold, slowest rank) | s | CPU s (slowest rank) |",
              "|---|---:|---:|",
              f"| async_ckpt load() (hashes verified) | {_cell(ld['ack'])} | {ld['ack_cpu']['median_s']:.3f} |",
              f"| dcp.load | {_cell(ld['dcp'])} | {ld['dcp_cpu']['median_s']:.3f} |",
              "", f"Load ratio vs dcp.load: {ld['ratio_vs_dcp_load']:.2f}x (medians; per round: {paired}). "
              f"Every load was checked bit-identical against the digest taken at save "
              f"({ld['digests_checked']} checks, {ld['slabs']} slabs of xxh3-128).", ""]
    names = {"blocking_vs_memcpy": "blocking vs memcpy floor (worst rank)",
             "commit_vs_dcp_save2": "commit vs dcp.save 2 threads", "load_vs_dcp_load": "load vs dcp.load"}
    for k, v in s["verdicts"].items():
        lines.append(f"- {names[k]}: {v['ratio']:.3f}x (target <= {v['target']:.2f}x): "
                     f"{'MET' if v['met'] else 'MISSED'}")
    return "\n".join(lines)


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
    files = [(world, case, s["commit"]) for world, summ in results.items() for case, s in summ.items()
             if "files" in s["commit"]]
    if files:
        lines += ["", "| world | case | commit s, one data object per node | commit s, one file per rank "
                  "(`node_object=False`) | ratio (medians) | median of the rounds' ratios | rounds where "
                  "the object was slower | ratio per round |", "|---|---|---:|---:|---:|---:|---:|---|"]
        for world, case, c in files:
            paired = c["paired_ratios_vs_files"]
            lines.append(f"| {world} | {case} | {c['ack']['median_s']:.3f} ({c['ack']['min_s']:.3f}-"
                         f"{c['ack']['max_s']:.3f}) | {c['files']['median_s']:.3f} ({c['files']['min_s']:.3f}-"
                         f"{c['files']['max_s']:.3f}) | {c['ratio_vs_files']:.2f}x | "
                         f"{statistics.median(paired):.2f}x | {sum(r > 1 for r in paired)} of {len(paired)} | "
                         f"{', '.join(f'{r:.2f}' for r in paired)} |")
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
    p.add_argument("--cases", default=CASES, help="'sharded' runs once, at --sharded-worlds")
    p.add_argument("--sharded-worlds", default="4,2", help="save world, load world of the sharded case")
    p.add_argument("--out", default=os.path.join("bench", "results", "distributed.json"))
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp dir on /tmp's disk)")
    args = p.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="ack-dist-bench-", dir=args.dir)
    started = time.time()
    try:
        load_start = os.getloadavg()
        plain = [c for c in args.cases.split(",") if c != "sharded"]
        raw = {int(w): run_world(int(w), args, folder) for w in args.worlds.split(",")} if plain else {}
        results = {w: summarise(r) for w, r in raw.items()}
        doc = {"machine": machine_info(folder), "size_gib": args.size_gib, "repeats": args.repeats,
               "results": results, "raw": raw}
        if raw:
            doc["page_cache"] = next(iter(raw.values()))["page_cache"]
        if "sharded" in args.cases.split(","):
            raw_sharded = run_sharded(args, folder)
            doc["sharded"] = summarise_sharded(raw_sharded)
            doc["raw_sharded"] = raw_sharded
            doc.setdefault("page_cache", raw_sharded["save"]["page_cache"])
        doc["load_average_start_end"] = [load_start[0], os.getloadavg()[0]]
        doc["seconds"] = time.time() - started
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    table = markdown(results) if results else ""
    if doc.get("sharded"):
        table += ("\n\n" if table else "") + "## Sharded (DTensor) state\n\n" + markdown_sharded(doc["sharded"])
    load = doc["load_average_start_end"]
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        title = "Distributed save benchmark" if results else "Sharded (DTensor) save and load benchmark"
        command = " ".join(sys.argv[1:] if argv is None else argv)
        f.write(f"# {title}\n\n`python -m bench.distributed {command}`"
                f"\n\n{args.size_gib} GiB per case, {args.repeats} repeats, {doc['page_cache']}. "
                f"Load average (1 min) at start/end: {load[0]:.1f}/{load[1]:.1f} "
                f"on {doc['machine']['cpu_count']} CPUs.\n\n{table}\n")
    print(table)
    return doc


if __name__ == "__main__":
    main()
