"""The tables of `bench.scale`: one run as markdown, and two runs side by side (``--compare``)."""
from __future__ import annotations

import os
import subprocess


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def markdown(doc: dict) -> str:
    lines = [f"## bench.scale, {doc['label']} ({doc['git']})", "",
             f"`{doc['command']}`; Store: TCPStore on 127.0.0.1 in this process, one client "
             "connection per role (waiting phase: one per waiting rank); data writes stubbed.", "",
             "| ranks x tensors | pattern | root manifest | largest fragment | coordinator s/save | "
             "retention s | Store rt/save (ranks / writers / coordinator / workers) | loading rank "
             "parses | load s | objects |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in doc["rows"]:
        if r.get("skipped"):
            lines.append(f"| {r['world']} x {r['tensors']} | {r['pattern']} | not run: {r['skipped']} "
                         "| | | | | | | |")
            continue
        rt = r["store_round_trips"]
        lines.append(
            f"| {r['world']} x {r['tensors']} | {r['pattern']} | {_fmt_bytes(r['manifest_bytes'])} | "
            f"{_fmt_bytes(r['largest_fragment_bytes'])} | {r['coordinator_s']:.3f} | "
            f"{r['retention_s']:.3f} | {r['store_round_trips_total']:,} ({rt['ranks']:,} / "
            f"{rt['node_writers']:,} / {rt['coordinator']:,} / {rt['workers']:,}) | "
            f"{_fmt_bytes(r['load_bytes'])} | {r['load_s']:.3f} | {r['objects']:,} |")
    if doc.get("waiting"):
        lines += ["", "Waiting while a save is in flight (round trips per second, measured over "
                  f"{doc['waiting'][0]['window_s']} s; a waiting rank = its rank worker's wait + its "
                  "heartbeat):", "",
                  "| ranks | waiting ranks sampled | per waiting rank | coordinator waiting for "
                  "node reports | offered to the Store |", "|---:|---:|---:|---:|---:|"]
        for w in doc["waiting"]:
            lines.append(f"| {w['world']} | {w['waiters']} | {w['rank_rt_per_s']} (max "
                         f"{w['rank_rt_per_s_max']}) | {w['coordinator_rt_per_s']} | "
                         f"{w['offered_rt_per_s']:,} |")
    if doc.get("s3"):
        lines += ["", s3_markdown(doc["s3"])]
    return "\n".join(lines) + "\n"


def s3_markdown(s3: dict) -> str:
    lines = [f"S3 requests ({s3['server']} on 127.0.0.1, PER_RANK, 100 tensors per rank; data "
             "objects real but tiny, so each is one PUT where a real one is a multipart upload: "
             "create + parts + complete):", "",
             "| ranks | first-save write probe (ranks probing: requests) | requests per save "
             "(3 saves, keep_last=2) | listing + list_checkpoints (2 committed) |",
             "|---:|---|---|---|"]
    for row in s3["rows"]:
        saves = ", ".join(str(sum(s.values())) for s in row["saves"])
        last = row["saves"][-1]
        lines.append(f"| {row['world']} | {row['first_save_probe']['ranks_probing']}: "
                     f"{row['first_save_probe']['requests']} | {saves} ({_ops(last)}) | "
                     f"{sum(row['listing'].values())} ({_ops(row['listing'])}) |")
    return "\n".join(lines)


def _ops(ops: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))


def compare(before: dict, after: dict) -> str:
    """Side-by-side table of two runs (same rows)."""
    key = lambda r: (r["world"], r["tensors"], r["pattern"])  # noqa: E731
    b = {key(r): r for r in before["rows"] if not r.get("skipped")}
    lines = [f"## bench.scale: before ({before['git']}) / after ({after['git']})", "",
             "| ranks x tensors | pattern | root manifest | coordinator s/save | retention s | "
             "Store rt/save | loading rank parses | objects |", "|---|---|---|---|---|---|---|---|"]
    for r in after["rows"]:
        old = b.get(key(r))
        if r.get("skipped") or old is None:
            continue
        rt_old, rt_new = old["store_round_trips_total"], r["store_round_trips_total"]
        lines.append(
            f"| {r['world']} x {r['tensors']} | {r['pattern']} | {_fmt_bytes(old['manifest_bytes'])} / "
            f"{_fmt_bytes(r['manifest_bytes'])} | {old['coordinator_s']:.3f} / {r['coordinator_s']:.3f} | "
            f"{old['retention_s']:.3f} / {r['retention_s']:.3f} | {rt_old:,} / {rt_new:,} "
            f"({_ratio(rt_old, rt_new)}) | {_fmt_bytes(old['load_bytes'])} / {_fmt_bytes(r['load_bytes'])} "
            f"| {old['objects']:,} / {r['objects']:,} |")
    bw = {w["world"]: w for w in before.get("waiting", [])}
    if after.get("waiting"):
        lines += ["", "| ranks | round trips/s per waiting rank | coordinator waiting, rt/s | "
                  "offered to the Store, rt/s |", "|---:|---|---|---|"]
        for w in after["waiting"]:
            o = bw.get(w["world"])
            if o is None:
                continue
            lines.append(f"| {w['world']} | {o['rank_rt_per_s']} / {w['rank_rt_per_s']} | "
                         f"{o['coordinator_rt_per_s']} / {w['coordinator_rt_per_s']} | "
                         f"{o['offered_rt_per_s']:,} / {w['offered_rt_per_s']:,} |")
    if before.get("s3") and after.get("s3"):
        lines += ["", "Before:", "", s3_markdown(before["s3"]), "", "After:", "", s3_markdown(after["s3"])]
    return "\n".join(lines) + "\n"


def _ratio(old: float, new: float) -> str:
    return f"{old / new:.1f}x fewer" if new and old >= new else f"{new / max(old, 1):.1f}x more"


def _git() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" + changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"
