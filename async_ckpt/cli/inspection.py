"""``async-ckpt inspect``: what one committed checkpoint holds, from its manifest alone (no data
is read): topology, versions, timings, metrics, sizes, files, and per component its sharing
pattern, validation level and copies, each copy's tensors (path, dtype, shape, bytes, codec and
stored size, the rank and node that wrote it) and plain values.

A SHARDED component has one copy, ``sharded``: each of its tensors is a global tensor (path,
dtype, global shape) with its ``chunks``, each a box of it (offsets, sizes) and the record that
holds it (file, codec, stored size, the rank and node that wrote it), and the ``layout`` it was
saved with (mesh, placements) when known.
"""
from __future__ import annotations

from typing import Any

import click

from ..format import metrics_file
from ..format.manifest import Manifest, file_json
from ..format.sharded import Chunk
from ..format.names import step_dir
from .common import check_step_option, choose_step, json_option, manifest_of, open_root, storage_option
from .output import emit_json, fmt_number, human_bytes, table
from .state import copies, dotted, leaf_value, writer_of


def _chunk(c: Chunk, m: Manifest) -> dict[str, Any]:
    node, rank = writer_of(c.record.file, c.record.offset, m)
    t = c.record
    return {"offsets": list(c.offsets), "sizes": list(c.sizes), "nbytes": t.nbytes, "stored": t.length,
            "codec": t.codec, "file": t.file, "offset": t.offset, "hash": t.hash, "rank": rank,
            "node": node}


def _writer(t: dict[str, Any]) -> str:
    return ("?" if t["rank"] is None else
            f"rank {t['rank']}" + ("" if t["node"] is None else f" node {t['node']}"))


def _codec(t: dict[str, Any]) -> str:
    return t["codec"] + (f" {t['stored'] / t['nbytes']:.0%}" if t["codec"] != "raw" and t["nbytes"] else "")


def _rows(tensors: list[dict[str, Any]]) -> list[list[str]]:
    """Table rows: a tensor, then (SHARDED) one row per chunk: its box as ranges per dimension."""
    rows = []
    for t in tensors:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        if "chunks" not in t:
            rows.append([t["path"], t["dtype"], shape, human_bytes(t["nbytes"]), _codec(t), _writer(t)])
            continue
        layout = t["layout"] if isinstance(t.get("layout"), dict) else {}
        placed = layout.get("placements")
        rows.append([t["path"], t["dtype"], shape, human_bytes(t["nbytes"]), _codec(t),
                     f"{len(t['chunks'])} chunk(s)" + (f" {','.join(map(str, placed))[:40]} on mesh "
                                                       f"{layout.get('mesh')}" if isinstance(placed, list) else "")])
        for c in t["chunks"]:
            box = ",".join(f"{o}:{o + s}" for o, s in zip(c["offsets"], c["sizes"], strict=True)) or "scalar"
            rows.append([f"  [{box}]", "", "x".join(map(str, c["sizes"])) or "scalar",
                         human_bytes(c["nbytes"]), _codec(c), _writer(c)])
    return rows


def describe(storage: Any, step: int, component: str | None) -> dict[str, Any]:
    m = manifest_of(storage, step)
    folder = step_dir(step)
    late = metrics_file.read_late(storage, folder)
    where = storage.child_url(folder)
    comps: dict[str, Any] = {}
    for cp in copies(m, where, component):
        entry = m.components[cp.component]
        comp = comps.setdefault(cp.component, {
            "sharing_pattern": entry.sharing_pattern, "validation_level": entry.validation_level,
            "required": entry.required, "metadata": entry.metadata, "copies": {}})
        tensors = []
        for path, leaf, t in cp.tensors():
            g = cp.chunks(leaf.index)
            if g is not None:
                tensors.append({"path": dotted(path), "index": leaf.index, "dtype": g.dtype,
                                "shape": list(g.shape), "nbytes": t.nbytes, "stored": t.length,
                                "codec": t.codec, "global": True, "layout": g.layout,
                                "chunks": [_chunk(c, m) for c in g.chunks],
                                **({"numpy": True} if leaf.numpy else {})})
                continue
            node, rank = writer_of(t.file, t.offset, m)
            tensors.append({"path": dotted(path), "index": leaf.index, "dtype": t.dtype, "shape": list(t.shape),
                            "nbytes": t.nbytes, "stored": t.length, "codec": t.codec, "file": t.file,
                            "offset": t.offset, "hash": t.hash, "rank": rank, "node": node,
                            **({"numpy": True} if leaf.numpy else {})})
        comp["copies"][cp.name] = {
            "owners": list(cp.shard.owners), **({"members": list(cp.shard.members)} if cp.shard.members else {}),
            "nbytes": sum(t.nbytes for t in cp.shard.tensors),
            "stored": sum(t.length for t in cp.shard.tensors),
            "tensors": tensors, "values": {dotted(p): leaf_value(v) for p, v in cp.values()}}
    return {"root": storage.url, "step": m.step, "url": where, "created": m.created,
            "format_version": m.format_version, "versions": m.versions, "topology": m.topology,
            "timings": m.timings, "metrics": {**metrics_file.decode(m.metrics), **late},
            "late_metrics": sorted(late), "retention": m.retention or None,
            "nbytes": m.nbytes, "stored_nbytes": m.stored_nbytes,
            "files": {n: file_json(f) for n, f in m.files.items()},
            "fragments": {n: {"size": r.size, "hash": r.hash, "node": r.node, "ranks": list(r.ranks)}
                          for n, r in sorted(m.fragments.items())},
            "components": comps}


def _text(doc: dict[str, Any], values: bool) -> None:
    topo = doc["topology"]
    click.echo(f"step {doc['step']} at {doc['url']}")
    click.echo(f"  created     {doc['created']}   format_version {doc['format_version']}")
    click.echo(f"  topology    world_size {topo.get('world_size')}, {topo.get('num_nodes')} node(s) "
               f"x {topo.get('local_world_size')} local rank(s)")
    click.echo("  versions    " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()))
    click.echo("  timings     " + (", ".join(f"{k} {fmt_number(v)} s" for k, v in doc["timings"].items()) or "-"))
    click.echo("  metrics     " + (" ".join(
        f"{k}={fmt_number(v)}{' (late)' if k in doc['late_metrics'] else ''}"
        for k, v in sorted(doc["metrics"].items())) or "-"))
    click.echo(f"  size        {human_bytes(doc['nbytes'])} logical, {human_bytes(doc['stored_nbytes'])} "
               f"stored in {len(doc['files'])} file(s)"
               + (f"; manifest in {len(doc['fragments'])} per-node fragment(s)" if doc["fragments"] else ""))
    for key, comp in doc["components"].items():
        click.echo(f"\ncomponent {key}: {comp['sharing_pattern']}, validation {comp['validation_level']}, "
                   f"{'required' if comp['required'] else 'optional'}"
                   + (f", metadata {comp['metadata']}" if comp["metadata"] else ""))
        for name, cp in comp["copies"].items():
            members = f", members {cp['members']}" if "members" in cp else ""
            chunked = any("chunks" in t for t in cp["tensors"])
            click.echo(f"  copy {name}: {'chunks ' if chunked else ''}written by rank(s) "
                       f"{cp['owners']}{members}; {len(cp['tensors'])} "
                       f"{'global ' if chunked else ''}tensor(s), {human_bytes(cp['nbytes'])} "
                       f"({human_bytes(cp['stored'])} stored), {len(cp['values'])} value(s)")
            if cp["tensors"]:
                rows = _rows(cp["tensors"])
                click.echo("    " + table(["TENSOR", "DTYPE", "SHAPE", "BYTES", "CODEC", "WRITTEN BY"],
                                          rows).replace("\n", "\n    "))
            if values and cp["values"]:
                for path, v in cp["values"].items():
                    text = repr(v)
                    click.echo(f"    {path} = {text if len(text) <= 80 else text[:77] + '...'}")


@click.command("inspect")
@click.argument("root")
@click.option("--step", type=int, default=None, help="the step (default: the newest committed)")
@click.option("--component", default=None, help="only this component")
@click.option("--values/--no-values", default=True, help="list non-tensor values (text output)")
@storage_option
@json_option
def inspect(root: str, step: int | None, component: str | None, values: bool,
            storage_options: tuple[str, ...], as_json: bool) -> int:
    """Show what the checkpoint of one step under ROOT holds: components, sharing patterns and
    validation levels, topology, every tensor (dtype, shape, bytes, codec, the rank and node that
    wrote it), values, versions and timings. Reads the manifest only.

    \b
    Example:
      async-ckpt inspect ./checkpoints --step 200 --component model
    """
    storage = open_root(root, storage_options)
    doc = describe(storage, choose_step(storage, check_step_option(step)), component)
    if as_json:
        emit_json(doc)
    else:
        _text(doc, values)
    return 0
