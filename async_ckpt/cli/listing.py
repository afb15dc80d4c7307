"""``async-ckpt ls``: one row per committed checkpoint (step, creation time, stored and logical
size, metrics including late ones, why retention keeps it), then the leftovers of failed saves
and the writers holding a lease on the root.

Why a checkpoint is kept is computed with `retention.steps_to_keep`/`best_steps` from the
policy the newest manifest that records one holds (``retention``; a writer without retention,
such as ``async-ckpt import``, records none), or from the ``--keep-*`` options when given (for
checkpoints written before manifests recorded it).
"""
from __future__ import annotations

from typing import Any

import click

from ..errors import CorruptCheckpointError
from ..format import metrics_file
from ..format.names import committed_steps, step_dirs
from ..retention import best_steps, lower_is_better, steps_to_keep
from ..save.lease import read_leases
from ..storage import Storage
from .common import json_option, manifest_of, open_root, storage_option
from .output import emit_json, fmt_number, human_bytes, table


def keep_reasons(steps: list[int], metrics: dict[int, dict[str, float]], policy: dict[str, Any]
                 ) -> dict[int, list[str]]:
    """Why retention keeps each step under `policy` (empty list: the next commit removes it)."""
    ordered = sorted(steps)
    reasons: dict[int, list[str]] = {s: [] for s in ordered}
    if not ordered:
        return reasons
    reasons[ordered[-1]].append("latest")
    keep_last = policy.get("keep_last")
    if keep_last is None:
        for s in ordered:
            reasons[s].append("keep-all")
        return reasons
    if keep_last > 0:
        for s in ordered[-keep_last:]:
            reasons[s].append(f"last-{keep_last}")
    every = policy.get("keep_every")
    if every:
        for s in ordered:
            if s % every == 0:
                reasons[s].append(f"every-{every}")
    keep_best, metric = policy.get("keep_best") or 0, policy.get("best_metric")
    if keep_best > 0 and metric:
        for s in best_steps(ordered, metrics, metric, policy.get("greater_is_better"), keep_best):
            reasons[s].append(f"best-{keep_best} {metric}")
        for s in ordered:
            if metrics.get(s, {}).get(metric) is None:
                reasons[s].append(f"{metric} pending")
    kept = steps_to_keep(ordered, metrics, keep_last=keep_last, keep_best=keep_best, best_metric=metric,
                         greater_is_better=policy.get("greater_is_better"), keep_every=every)
    assert {s for s, r in reasons.items() if r} == kept, "keep_reasons disagrees with steps_to_keep"
    return reasons


def describe_policy(policy: dict[str, Any]) -> str:
    if policy.get("_none"):
        return ("none recorded: the writers keep every checkpoint (--keep-last/--keep-best/"
                "--best-metric/--keep-every show what a policy would keep)")
    if policy.get("keep_last") is None:
        return "keep every checkpoint (keep_last=None)"
    parts = [f"keep_last={policy['keep_last']}"]
    if policy.get("keep_best") and policy.get("best_metric"):
        lower = lower_is_better(policy["best_metric"], policy.get("greater_is_better"))
        parts.append(f"keep_best={policy['keep_best']} by {policy['best_metric']} "
                     f"({'lower' if lower else 'higher'} is better)")
    if policy.get("keep_every"):
        parts.append(f"keep_every={policy['keep_every']}")
    return ", ".join(parts)


def leftovers(storage: Storage, folders: dict[int, str], committed: list[int]) -> list[dict[str, Any]]:
    """Step folders without a manifest: what failed (or running) saves left."""
    out = []
    for step, name in sorted(folders.items()):
        if step in committed:
            continue
        files, size, uploads = storage.list_dir(name), 0, 0
        for f in files:
            try:
                size += storage.size(f"{name}/{f}")
            except FileNotFoundError:
                uploads += 1            # S3: an unfinished multipart upload, no object yet
        out.append({"step": step, "folder": name, "files": len(files), "bytes": size, "uploads": uploads})
    return out


@click.command("ls")
@click.argument("root")
@storage_option
@json_option
@click.option("--keep-last", type=click.IntRange(0), default=None, help="explain retention with this keep_last")
@click.option("--keep-best", type=click.IntRange(0), default=None, help="... and this keep_best")
@click.option("--best-metric", default=None, help="... and this best_metric")
@click.option("--keep-every", type=click.IntRange(0), default=None, help="... and this keep_every")
@click.option("--greater-is-better/--lower-is-better", default=None,
              help="... and this direction (default: lower is better when the name has 'loss')")
def ls(root: str, storage_options: tuple[str, ...], as_json: bool, keep_last: int | None,
       keep_best: int | None, best_metric: str | None, keep_every: int | None,
       greater_is_better: bool | None) -> int:
    """List the committed checkpoints under ROOT, why retention keeps each one, and the
    leftovers of failed saves.

    \b
    Example:
      async-ckpt ls ./checkpoints
      async-ckpt ls s3://bucket/run1 -o endpoint_url=http://127.0.0.1:8333 --json
    """
    storage = open_root(root, storage_options)
    folders = step_dirs(storage)
    steps = committed_steps(storage, folders)
    rows: list[dict[str, Any]] = []
    metrics: dict[int, dict[str, float]] = {}
    policy: dict[str, Any] | None = None
    source_step = None
    for step in steps:
        try:
            m = manifest_of(storage, step)
        except CorruptCheckpointError as exc:
            rows.append({"step": step, "error": str(exc)})
            continue
        late = metrics_file.read_late(storage, folders[step])
        merged = {**metrics_file.decode(m.metrics), **late}
        metrics[step] = merged
        if m.retention:
            policy, source_step = m.retention, step     # the newest recorded policy is in force
        rows.append({"step": step, "created": m.created, "stored_nbytes": m.stored_nbytes,
                     "nbytes": m.nbytes, "metrics": merged, "late_metrics": sorted(late),
                     "files": len(m.files), "components": list(m.components)})
    flags = {"keep_last": keep_last, "keep_best": keep_best, "best_metric": best_metric,
             "keep_every": keep_every, "greater_is_better": greater_is_better}
    if any(v is not None for v in flags.values()):
        source = "options"
        policy = {**(policy or {}), **{k: v for k, v in flags.items() if v is not None}}
        if keep_last is None and "keep_last" not in policy:
            policy["keep_last"] = None
    elif policy:
        source = f"manifest of step {source_step}"
    else:
        source, policy = "none", {"keep_last": None, "_none": True}
    reasons = keep_reasons([r["step"] for r in rows if "error" not in r], metrics, policy)
    for r in rows:
        if "error" not in r:
            r["kept_because"] = reasons[r["step"]] or ["not kept: the next commit removes it"]
    left = leftovers(storage, folders, steps)
    writers = [{"name": lease.name, "stale": lease.stale_reason(), "writer": lease.describe(),
                **(lease.doc or {})} for lease in read_leases(storage)]
    live = any(w["stale"] is None for w in writers)
    for item in left:
        item["why"] = ("no manifest: a save in progress, or a failed one" if live else
                       "no manifest: a failed or interrupted save (async-ckpt gc removes it)")
    public_policy = {k: v for k, v in policy.items() if not k.startswith("_")}
    if as_json:
        emit_json({"root": storage.url, "checkpoints": rows, "leftovers": left, "writers": writers,
                   "retention": public_policy if source != "none" else None, "retention_source": source})
        return 0
    if not rows and not left:
        click.echo(f"no committed checkpoints at {storage.url}")
    if rows:
        click.echo(table(["STEP", "CREATED", "STORED", "LOGICAL", "METRICS", "KEPT BECAUSE"], [
            [r["step"], "-", "-", "-", "-", f"UNREADABLE: {r['error']}"] if "error" in r else
            [r["step"], r["created"].replace("+00:00", "Z"), human_bytes(r["stored_nbytes"]),
             human_bytes(r["nbytes"]), _metrics_cell(r["metrics"], r["late_metrics"]),
             ", ".join(r["kept_because"])] for r in rows]))
    for item in left:
        extra = f", {item['uploads']} unfinished upload(s)" if item["uploads"] else ""
        click.echo(f"LEFTOVER {item['folder']}: {item['files']} file(s), {human_bytes(item['bytes'])}"
                   f"{extra}: {item['why']}")
    for w in writers:
        state = f"stale: {w['stale']}" if w["stale"] else "active"
        click.echo(f"WRITER {state}: {w['writer']}")
    if rows:
        click.echo(f"retention: {describe_policy(policy)}"
                   + (f" (from the {source})" if source != "none" else ""))
        if any(r.get("late_metrics") for r in rows):
            click.echo("*: metric reported after the save (report_metrics)")
    return 0


def _metrics_cell(metrics: dict[str, float], late: list[str]) -> str:
    if not metrics:
        return "-"
    return " ".join(f"{k}={fmt_number(v)}{'*' if k in late else ''}" for k, v in sorted(metrics.items()))
