"""From raw samples to figures: median with min/max for every figure, ratios against the floors
of the same case, verdicts against the issue-6 targets, and the Markdown tables."""
from __future__ import annotations

import statistics

from ..common import GIB

TARGET_BLOCKING = 1.25   # x memcpy floor
TARGET_COMMIT = 1.15     # x raw write + fsync
TARGET_LOAD = 1.15       # x raw cold read (and no slower than dcp.load)
# the documented pool budget on top of the staged bytes (docs/design.md, "Staging and memory"):
# with zstd at most 7 compressed pieces of 16 MiB in flight (look-ahead 6 + the one being written)
# plus zstd's working memory (2 MiB per encode thread); none without compression
POOL_BUDGET = {"async_ckpt_none": 0, "async_ckpt_zstd": 7 * (16 << 20) + 2 * (2 << 20)}
RSS_SLACK = 32 << 20     # allocator and thread-stack noise allowed on top

LABELS = {
    "memcpy": "memcpy into preallocated buffers (floor)",
    "raw_write": "raw os.write + fsync (floor)",
    "raw_odirect": "raw O_DIRECT write + fsync (floor)",
    "raw_cold_read": "raw cold sequential read (floor)",
    "async_ckpt_none": "async_ckpt, no compression",
    "async_ckpt_zstd": "async_ckpt, zstd",
    "torch_save": "torch.save + fsync",
    "dcp_save1": "dcp.save, 1 thread",
    "dcp_save2": "dcp.save, 2 threads",
    "dcp_async": "dcp.async_save, default",
    "dcp_async_stager": "dcp.async_save, reused DefaultStager",
    "torchsnapshot": "torchsnapshot async_take + fsync",
}
FIGURES = ("blocking_s", "staged_s", "committed_s", "load_s", "background_cpu_s",
           "peak_extra_rss_bytes", "stored_bytes")


def stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


def summarise_case(case: dict) -> dict:
    n = case["state_bytes"]
    fig = {m: {f: stats(v) for f, v in figs.items()} for m, figs in case["figures"].items()}

    def med(method: str, figure: str) -> float | None:
        return fig.get(method, {}).get(figure, {}).get("median")

    memcpy, raw, cold = med("memcpy", "blocking_s"), med("raw_write", "committed_s"), med("raw_cold_read", "load_s")
    dcp_loads = {m: med(m, "load_s") for m in ("dcp_save1", "dcp_save2", "dcp_async", "dcp_async_stager")
                 if med(m, "load_s")}
    dcp_load = min(dcp_loads.values()) if dcp_loads else None
    rows = {}
    for m, figs in fig.items():
        row = {"label": LABELS.get(m, m), "figures": figs}
        if med(m, "committed_s"):
            row["commit_gib_per_s"] = n / GIB / med(m, "committed_s")
        if med(m, "load_s"):
            row["load_gib_per_s"] = n / GIB / med(m, "load_s")
        if med(m, "stored_bytes"):
            row["compression_ratio"] = n / med(m, "stored_bytes")
        for f, base in (("blocking_s", memcpy), ("staged_s", memcpy), ("committed_s", raw), ("load_s", cold)):
            if med(m, f) and base:
                row[f"{f[:-2]}_vs_floor"] = med(m, f) / base
        if med(m, "load_s") and dcp_load:
            row["load_vs_dcp_load"] = med(m, "load_s") / dcp_load
        resident = case.get("resident_after_first_save_bytes", {}).get(m)
        if resident is not None and med(m, "peak_extra_rss_bytes") is not None:
            row["extra_host_bytes"] = resident + fig[m]["peak_extra_rss_bytes"]["max"]
        rows[m] = row
    return {"state_bytes": n, "mix": case["mix"], "order": case["order"], "rows": rows,
            "verdicts": verdicts(rows, n)}


def verdicts(rows: dict, nbytes: int) -> list[dict]:
    out = []

    def check(what: str, value: float | None, limit: float, unit: str = "x") -> None:
        if value is not None:
            out.append({"what": what, "value": value, "limit": limit, "unit": unit, "met": value <= limit})
    for key in ("async_ckpt_none", "async_ckpt_zstd"):
        r = rows.get(key)
        if not r:
            continue
        if key == "async_ckpt_none":
            check(f"{key} blocking vs memcpy floor", r.get("blocking_vs_floor"), TARGET_BLOCKING)
            check(f"{key} committed vs raw write+fsync", r.get("committed_vs_floor"), TARGET_COMMIT)
        check(f"{key} cold load vs raw cold read", r.get("load_vs_floor"), TARGET_LOAD)
        check(f"{key} cold load vs best dcp.load", r.get("load_vs_dcp_load"), 1.0)
        if "extra_host_bytes" in r:
            check(f"{key} extra host memory (MiB) vs staged + pool budget",
                  r["extra_host_bytes"] / 2**20, (nbytes + POOL_BUDGET[key] + RSS_SLACK) / 2**20, " MiB")
    return out


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _spread(figs: dict, f: str, scale: float = 1.0, fmt: str = ".3f") -> str:
    s = figs.get(f)
    if not s:
        return "-"
    return f"{s['median'] / scale:{fmt}} ({s['min'] / scale:{fmt}}-{s['max'] / scale:{fmt}})"


def case_markdown(summary: dict) -> str:
    n = summary["state_bytes"]
    head = (f"#### {summary['mix']}, {n / 2**20:.0f} MiB ({summary['order']} order)\n\n"
            "| method | blocking s | staged s | committed s | cold load s | commit GiB/s | "
            "blocking / memcpy | commit / raw write | load / raw read | load / dcp.load | "
            "bg CPU s | extra RSS MiB | stored ratio |\n"
            "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    lines = [head]
    for m, r in summary["rows"].items():
        f = r["figures"]
        n_s = max((s["n"] for s in f.values()), default=0)
        extra = _f(r["extra_host_bytes"] / 2**20, ".0f") if "extra_host_bytes" in r else "-"
        lines.append(
            f"| {r['label']} [n={n_s}] | {_spread(f, 'blocking_s')} | {_spread(f, 'staged_s')} | "
            f"{_spread(f, 'committed_s')} | {_spread(f, 'load_s')} | {_f(r.get('commit_gib_per_s'), '.2f')} | "
            f"{_f(r.get('blocking_vs_floor'), '.2f')} | {_f(r.get('committed_vs_floor'), '.2f')} | "
            f"{_f(r.get('load_vs_floor'), '.2f')} | {_f(r.get('load_vs_dcp_load'), '.2f')} | "
            f"{_spread(f, 'background_cpu_s', fmt='.2f')} | {extra} | {_f(r.get('compression_ratio'), '.3f')} |")
    lines.append("")
    for v in summary["verdicts"]:
        lines.append(f"- {v['what']}: {v['value']:.2f}{v['unit']} (target <= {v['limit']:.2f}{v['unit']}): "
                     f"{'MET' if v['met'] else 'MISSED'}")
    return "\n".join(lines) + "\n"


def flatness_markdown(flat: dict) -> str:
    return (f"Memory flatness: {flat['saves']} consecutive async_ckpt saves of "
            f"{flat['state_bytes'] / 2**20:.0f} MiB, RSS growth first tenth -> last tenth "
            f"{flat['growth_bytes'] / 2**20:+.1f} MiB (tolerance {flat['tolerance_bytes'] / 2**20:.0f} MiB): "
            f"{'FLAT' if flat['flat'] else 'GROWING'}; RSS min/max "
            f"{min(flat['rss_bytes']) / 2**20:.0f}/{max(flat['rss_bytes']) / 2**20:.0f} MiB.\n")
