"""PNG figures of a harness run (matplotlib, headless). One figure per question: how long each
phase takes per case, how throughput scales with state size, what a save costs in memory and
background CPU, what compression buys, and whether RSS stays flat over many saves."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")    # no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402

PHASES = (("blocking_s", "blocking"), ("staged_s", "staged"), ("committed_s", "committed"),
          ("load_s", "cold load"))


def _bars(ax, rows: dict, figure: str, scale: float = 1.0) -> None:
    names = [m for m in rows if figure in rows[m]["figures"]]
    med = [rows[m]["figures"][figure]["median"] / scale for m in names]
    lo = [m_ - rows[m]["figures"][figure]["min"] / scale for m, m_ in zip(names, med)]
    hi = [rows[m]["figures"][figure]["max"] / scale - m_ for m, m_ in zip(names, med)]
    ax.barh(range(len(names)), med, xerr=[lo, hi], color="tab:blue", capsize=2)
    ax.set_yticks(range(len(names)), [rows[m]["label"] for m in names], fontsize=7)
    ax.invert_yaxis()


def case_times(summary: dict, path: str) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5), sharey=False)
    for ax, (figure, title) in zip(axes, PHASES):
        _bars(ax, summary["rows"], figure)
        ax.set_title(f"{title} (s, median, min-max)")
    fig.suptitle(f"{summary['mix']}, {summary['state_bytes'] / 2**20:.0f} MiB")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def case_costs(summary: dict, path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    _bars(axes[0], summary["rows"], "peak_extra_rss_bytes", 2**20)
    axes[0].set_title("transient extra RSS per save (MiB)")
    _bars(axes[1], summary["rows"], "background_cpu_s")
    axes[1].set_title("background CPU per save (s)")
    rows = {m: r for m, r in summary["rows"].items() if "compression_ratio" in r}
    axes[2].barh(range(len(rows)), [r["compression_ratio"] for r in rows.values()], color="tab:green")
    axes[2].set_yticks(range(len(rows)), [r["label"] for r in rows.values()], fontsize=7)
    axes[2].invert_yaxis()
    axes[2].set_title("state bytes / stored bytes")
    fig.suptitle(f"{summary['mix']}, {summary['state_bytes'] / 2**20:.0f} MiB")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def throughput(summaries: list[dict], path: str) -> None:
    mixes = sorted({s["mix"] for s in summaries})
    fig, axes = plt.subplots(1, len(mixes), figsize=(7 * len(mixes), 4.5), squeeze=False)
    for ax, mix in zip(axes[0], mixes):
        cases = sorted((s for s in summaries if s["mix"] == mix), key=lambda s: s["state_bytes"])
        methods = {m for s in cases for m, r in s["rows"].items() if "commit_gib_per_s" in r}
        for m in sorted(methods):
            pts = [(s["state_bytes"] / 2**30, s["rows"][m]["commit_gib_per_s"]) for s in cases
                   if "commit_gib_per_s" in s["rows"].get(m, {})]
            ax.plot(*zip(*pts), marker="o", label=cases[0]["rows"].get(m, {}).get("label", m))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("state GiB")
        ax.set_ylabel("GiB/s until committed")
        ax.set_title(mix)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def flatness(flat: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(flat["rss_bytes"]) + 1), [b / 2**20 for b in flat["rss_bytes"]])
    ax.set_xlabel("save #")
    ax.set_ylabel("RSS MiB after commit")
    ax.set_title(f"RSS over {flat['saves']} saves of {flat['state_bytes'] / 2**20:.0f} MiB")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw_all(doc: dict, folder: str, prefix: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in doc["local"]["summaries"]:
        tag = f"{s['mix']}-{s['state_bytes'] >> 20}MiB"
        for name, fn in (("times", case_times), ("costs", case_costs)):
            p = os.path.join(folder, f"{prefix}-{name}-{tag}.png")
            fn(s, p)
            paths.append(p)
    if doc["local"]["summaries"]:
        p = os.path.join(folder, f"{prefix}-throughput.png")
        throughput(doc["local"]["summaries"], p)
        paths.append(p)
    if doc.get("flatness"):
        p = os.path.join(folder, f"{prefix}-flatness.png")
        flatness(doc["flatness"], p)
        paths.append(p)
    return paths
