"""Turning benchmark rows into ratios against the floors measured in the same run, verdicts
against the targets, and a Markdown table."""
from __future__ import annotations

import statistics

from .common import GIB

TARGET_BLOCKING = 1.25   # x memcpy floor
TARGET_DURABLE = 1.15    # x raw fsync'd write


def summarise(bench) -> tuple[list[dict], list[str]]:
    rows = bench.rows
    memcpy = rows["memcpy"].median if "memcpy" in rows else None
    raw = rows["raw"].median if "raw" in rows else None
    out = []
    for r in rows.values():
        base, base_name = (memcpy, "memcpy") if r.figure == "blocking" else (raw, "raw write")
        target = None
        if r.key == "ack_none":
            target = TARGET_BLOCKING
        elif r.key == "ack_none_durable":
            target = TARGET_DURABLE
        ratio = r.median / base if base else None
        base_min = min(rows["memcpy" if r.figure == "blocking" else "raw"].samples) if base else None
        out.append({"key": r.key, "label": r.label, "figure": r.figure, "one_off": r.one_off,
                    "samples_s": r.samples, "median_s": r.median, "min_s": min(r.samples),
                    "max_s": max(r.samples), "gib_per_s": bench.nbytes / GIB / r.median,
                    "ratio": ratio, "ratio_vs": base_name, "target_ratio": target,
                    "ratio_of_mins": min(r.samples) / base_min if base_min else None,
                    "meets_target": (ratio <= target) if (target and ratio) else None,
                    "stored_bytes": r.stored})
    verdicts = []
    by_key = {o["key"]: o for o in out}
    for key, what in (("ack_none", "blocking"), ("ack_none_durable", "durable")):
        o = by_key.get(key)
        if o and o["ratio"] is not None:
            verdicts.append(f"- async_ckpt {what}: {o['ratio']:.2f}x {o['ratio_vs']} "
                            f"(target <= {o['target_ratio']:.2f}x): {'MET' if o['meets_target'] else 'MISSED'}")
    for ours, theirs in (("ack_none", "dcp_async"), ("ack_none", "dcp_async_reuse"),
                         ("ack_none_durable", "dcp_async_durable"),
                         ("ack_none_durable", "dcp_async_reuse_durable")):
        a, b = by_key.get(ours), by_key.get(theirs)
        if a and b:
            verdicts.append(f"- async_ckpt {a['figure']} {a['median_s']:.3f} s vs {b['label']} "
                            f"{b['median_s']:.3f} s: {'ahead' if a['median_s'] < b['median_s'] else 'BEHIND'} "
                            f"({b['median_s'] / a['median_s']:.2f}x)")
    return out, verdicts


def markdown(summary: list[dict], bench) -> str:
    lines = ["| method | figure | median s | min s | max s | GiB/s | ratio (medians) | target | "
             "ratio (mins) | stored GiB |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    order = sorted(summary, key=lambda o: (o["figure"] != "blocking", o["one_off"]))
    for o in order:
        n = len(o["samples_s"])
        ratio = f"{o['ratio']:.2f}x {o['ratio_vs']}" if o["ratio"] is not None else "-"
        target = ""
        if o["target_ratio"]:
            target = f"<= {o['target_ratio']:.2f}x {'met' if o['meets_target'] else 'MISSED'}"
        stored = f"{statistics.median(o['stored_bytes']) / GIB:.3f}" if o["stored_bytes"] else ""
        by_min = f"{o['ratio_of_mins']:.2f}x" if o["ratio_of_mins"] is not None else "-"
        label = o["label"] + (" [1 sample]" if o["one_off"] else f" [n={n}]")
        lines.append(f"| {label} | {o['figure']} | {o['median_s']:.3f} | {o['min_s']:.3f} | "
                     f"{o['max_s']:.3f} | {o['gib_per_s']:.2f} | {ratio} | {target} | {by_min} | {stored} |")
    return "\n".join(lines)
