"""``async-ckpt diff``: what changed between the checkpoints of two steps under one root.

Components, copies and leaves are matched by key path. A tensor whose dtype, shape, codec and
stored hash agree is equal without reading a byte (the hash covers the stored bytes); any other
pair is read (verified) and compared: max |b - a| and the relative norm ||b - a|| / ||a||,
computed in float64 (complex: on the magnitude of the difference). Plain values are compared as
JSON values (NaN equals NaN). Tensors and values only in one step are listed as added or removed.
A SHARDED component's tensors are its global tensors (its one copy, ``sharded``): equal without a
read when both steps stored the same chunk boxes with the same hashes, otherwise assembled from
their chunks and compared, so two steps saved at different world sizes (chunked differently)
compare by value.
"""
from __future__ import annotations

import math
from typing import Any

import click
import torch

from ..format.manifest import Manifest
from ..format.names import step_dir
from ..format.tree import TensorLeaf
from ..storage import Storage
from .common import EXIT_FAILED, choose_step, json_option, manifest_of, open_root, storage_option
from .output import Progress, emit_json, fmt_number, table
from .state import Copy, copies, dotted, leaf_value, read_batches


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |b - a|, ||b - a|| / ||a||) in float64."""
    if a.numel() == 0:
        return 0.0, 0.0
    wide = torch.complex128 if a.is_complex() else torch.float64
    a64, b64 = a.to(wide), b.to(wide)
    diff = (b64 - a64).abs()
    both_nan = torch.isnan(a64.abs()) & torch.isnan(b64.abs())
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    max_abs = float(diff.max())
    num, den = float(diff.norm()), float(a64.abs().nan_to_num(0.0).norm())
    rel = num / den if den else (0.0 if num == 0 else math.inf)
    return max_abs, rel


def compare(storage: Storage, ma: Manifest, mb: Manifest, component: str | None,
            bar: Progress) -> dict[str, Any]:
    where_a, where_b = storage.child_url(step_dir(ma.step)), storage.child_url(step_dir(mb.step))
    copies_a = {(c.component, c.name): c for c in copies(ma, where_a, component)}
    copies_b = {(c.component, c.name): c for c in copies(mb, where_b, component)}
    tensors: list[dict[str, Any]] = []
    values: list[dict[str, Any]] = []
    to_read: list[tuple[Copy, Copy, list[tuple[dict[str, Any], int, int]]]] = []
    for key in sorted(set(copies_a) | set(copies_b)):
        ca, cb = copies_a.get(key), copies_b.get(key)
        prefix = f"{key[0]}[{key[1]}]"
        la = {p: v for p, v in (ca.leaves if ca else [])}
        lb = {p: v for p, v in (cb.leaves if cb else [])}
        pending: list[tuple[dict[str, Any], int, int]] = []
        for path in list(la) + [p for p in lb if p not in la]:
            name = f"{prefix} {dotted(path)}"
            va, vb = la.get(path, _MISSING), lb.get(path, _MISSING)
            is_t = isinstance(va, TensorLeaf) or isinstance(vb, TensorLeaf)
            if va is _MISSING or vb is _MISSING:
                status = "added" if va is _MISSING else "removed"
                (tensors if is_t else values).append({"name": name, "status": status})
                continue
            if not (isinstance(va, TensorLeaf) and isinstance(vb, TensorLeaf)):
                if is_t:
                    values.append({"name": name, "status": "changed", "a": _show(va, ca), "b": _show(vb, cb)})
                elif not _same_value(va, vb):
                    values.append({"name": name, "status": "changed", "a": leaf_value(va), "b": leaf_value(vb)})
                continue
            assert ca is not None and cb is not None
            ta, tb = ca.shard.tensors[va.index], cb.shard.tensors[vb.index]
            row: dict[str, Any] = {"name": name, "dtype": tb.dtype, "shape": list(tb.shape)}
            if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
                row.update(status="changed", detail=f"{ta.dtype}{list(ta.shape)} -> {tb.dtype}{list(tb.shape)}")
            elif ta.codec == tb.codec and ta.hash == tb.hash:
                row.update(status="equal", by="hash")
            else:
                pending.append((row, va.index, vb.index))
            tensors.append(row)
        if pending:
            assert ca is not None and cb is not None
            to_read.append((ca, cb, pending))
    bar.start(sum(ca.shard.tensors[i].length + cb.shard.tensors[j].length
                  for ca, cb, rows in to_read for _, i, j in rows))
    for ca, cb, rows in to_read:
        # One side at a time, in bounded batches, so two large steps never sit in memory at once.
        for batch in _chunks(rows, ca):
            got_a = {k: v for part in read_batches(storage, ma, ca, [i for _, i, _ in batch], bar.advance)
                     for k, v in part.items()}
            got_b = {k: v for part in read_batches(storage, mb, cb, [j for _, _, j in batch], bar.advance)
                     for k, v in part.items()}
            for row, i, j in batch:
                a, b = got_a[i], got_b[j]
                if torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
                    row.update(status="equal", by="bytes")
                else:
                    max_abs, rel = _stats(a, b)
                    row.update(status="changed", max_abs_diff=max_abs, rel_norm=rel)
    return {"root": storage.url, "a": ma.step, "b": mb.step, "tensors": tensors, "values": values}


_MISSING = object()


def _show(v: Any, cp: Copy | None) -> Any:
    if isinstance(v, TensorLeaf) and cp is not None:
        t = cp.shard.tensors[v.index]
        return f"tensor {t.dtype}{list(t.shape)}"
    return leaf_value(v)


def _chunks(rows: list[tuple[dict[str, Any], int, int]], cp: Copy, limit: int = 512 << 20
            ) -> list[list[tuple[dict[str, Any], int, int]]]:
    out: list[list[tuple[dict[str, Any], int, int]]] = [[]]
    size = 0
    for r in rows:
        if out[-1] and size + cp.shard.tensors[r[1]].nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(r)
        size += cp.shard.tensors[r[1]].nbytes
    return out


@click.command("diff")
@click.argument("root")
@click.argument("a", type=int)
@click.argument("b", type=int)
@click.option("--component", default=None, help="only this component")
@click.option("--all", "show_all", is_flag=True, help="list equal tensors too")
@click.option("--exit-code", is_flag=True, help="exit with status 1 when anything differs")
@storage_option
@json_option
def diff(root: str, a: int, b: int, component: str | None, show_all: bool, exit_code: bool,
         storage_options: tuple[str, ...], as_json: bool) -> int:
    """Show which tensors and values changed between steps A and B under ROOT: per tensor
    max |diff| and relative norm ||B-A||/||A||. Tensors whose hashes agree are equal without
    being read.

    \b
    Example:
      async-ckpt diff ./checkpoints 100 200 --component model
    """
    storage = open_root(root, storage_options)
    ma, mb = manifest_of(storage, choose_step(storage, a)), manifest_of(storage, choose_step(storage, b))
    with Progress("comparing") as bar:
        doc = compare(storage, ma, mb, component, bar)
    changed = [t for t in doc["tensors"] if t["status"] != "equal"] + doc["values"]
    doc["equal_tensors"] = sum(t["status"] == "equal" for t in doc["tensors"])
    doc["changed"] = len(changed)
    if as_json:
        emit_json(doc)
    else:
        rows = [[t["name"], t["status"] + (f" ({t['by']})" if t.get("by") else ""),
                 fmt_number(t["max_abs_diff"]) if "max_abs_diff" in t else "-",
                 fmt_number(t["rel_norm"]) if "rel_norm" in t else t.get("detail", "-")]
                for t in doc["tensors"] if show_all or t["status"] != "equal"]
        if rows:
            click.echo(table(["TENSOR", "STATUS", "MAX |B-A|", "||B-A||/||A||"], rows))
        for v in doc["values"]:
            if v["status"] == "changed":
                click.echo(f"value {v['name']}: {v['a']!r} -> {v['b']!r}")
            else:
                click.echo(f"value {v['name']}: {v['status']}")
        n_t = len(doc["tensors"])
        click.echo(f"step {a} -> {b}: {n_t - doc['equal_tensors']} of {n_t} tensor(s) differ, "
                   f"{len(doc['values'])} value(s) changed")
    return EXIT_FAILED if exit_code and changed else 0
