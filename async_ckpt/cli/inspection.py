"""``async-ckpt inspect``: what one committed checkpoint holds, from its manifest alone (no data
is read): topology, versions, timings, metrics, sizes, files, and per component its sharing
pattern, validation level and copies, each copy's tensors (path, dtype, shape, bytes, codec and
stored size, the rank and node that wrote it) and plain values.

Sharded (DTensor) components do not exist yet; when they do, each tensor row gains its chunks.
"""
from __future__ import annotations

from typing import Any

import click

from ..format import metrics_file
from ..format.names import step_dir
from .common import check_step_option, choose_step, json_option, manifest_of, open_root, storage_option
from .output import emit_json, fmt_number, human_bytes, table
from .state import copies, dotted, leaf_value, writer_of


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
            node, rank = writer_of(t.file)
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
            "files": {n: {"size": f.size, "hash": f.hash} for n, f in m.files.items()},
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
               f"stored in {len(doc['files'])} file(s)")
    for key, comp in doc["components"].items():
        click.echo(f"\ncomponent {key}: {comp['sharing_pattern']}, validation {comp['validation_level']}, "
                   f"{'required' if comp['required'] else 'optional'}"
                   + (f", metadata {comp['metadata']}" if comp["metadata"] else ""))
        for name, cp in comp["copies"].items():
            members = f", members {cp['members']}" if "members" in cp else ""
            click.echo(f"  copy {name}: written by rank(s) {cp['owners']}{members}; "
                       f"{len(cp['tensors'])} tensor(s), {human_bytes(cp['nbytes'])} "
                       f"({human_bytes(cp['stored'])} stored), {len(cp['values'])} value(s)")
            if cp["tensors"]:
                rows = [[t["path"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar",
                         human_bytes(t["nbytes"]),
                         t["codec"] + (f" {t['stored'] / t['nbytes']:.0%}"
                                       if t["codec"] != "raw" and t["nbytes"] else ""),
                         "?" if t["rank"] is None else
                         f"rank {t['rank']}" + ("" if t["node"] is None else f" node {t['node']}")]
                        for t in cp["tensors"]]
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
