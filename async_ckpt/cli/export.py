"""``async-ckpt export``: write one component (or all) of a committed checkpoint in a format
other tools read: one safetensors file, a Hugging Face style folder of safetensors shards with
``model.safetensors.index.json``, or (only when asked for, by a ``.pt``/``.pth`` target) a
``torch.save`` file. Every tensor is read through the verified reader.

Names: a tensor's key path joined with dots (``layers.0.weight``), prefixed with its component
when several components are exported and with its copy (``rank2.``) when a component has several
copies (PER_RANK, PER_NODE, PER_GROUP) and no ``--copy`` picks one. A REPLICATED component is one
copy whatever rank wrote each tensor, so it exports whole. Non-tensor values go, as JSON, into
the safetensors metadata (``async_ckpt``) and the index's ``metadata``; the ``.pt`` file holds
the state objects as they load.

`logical_tensors` is where a tensor's name meets its stored parts: one record each, or for a
SHARDED component (DTensor state) the chunks of one global tensor, which `state.read_batches`
assembles to the global shape: the export is the consolidated (unsharded) state, whatever
topology saved it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import click
import torch

from ..errors import CorruptCheckpointError
from ..format.manifest import Manifest, TensorEntry
from ..format.names import step_dir
from ..format.tree import unflatten
from ..load.reader import load_shard
from ..storage import Storage
from ..version import __version__
from .common import EXIT_USAGE, CliError, check_step_option, choose_step, manifest_of, open_root, storage_option
from .output import Progress, human_bytes, jsonable
from .state import Copy, copies, dotted, leaf_value, read_batches

INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise CliError(f"--shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB", EXIT_USAGE)
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise CliError("--shard-size must be positive", EXIT_USAGE)
    return size


@dataclass(frozen=True)
class LogicalTensor:
    """One output tensor: its name and where its bytes are (`entry`: one record, or for a SHARDED
    copy the summary of the global tensor's chunks, `copy.chunks(index)`)."""
    name: str
    copy: Copy
    index: int
    entry: TensorEntry


def _prefixes(selected: list[Copy], copy_given: bool) -> dict[tuple[str, str], str]:
    per_component: dict[str, int] = {}
    for cp in selected:
        per_component[cp.component] = per_component.get(cp.component, 0) + 1
    several = len(per_component) > 1
    out = {}
    for cp in selected:
        parts = ([cp.component] if several else []) + (
            [cp.name] if per_component[cp.component] > 1 and not copy_given else [])
        out[(cp.component, cp.name)] = ".".join(parts)
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def logical_tensors(selected: list[Copy], prefixes: dict[tuple[str, str], str]) -> list[LogicalTensor]:
    """Every output tensor, in checkpoint order; refuses two tensors with one name."""
    out, seen = [], set()
    for cp in selected:
        for path, leaf, entry in cp.tensors():
            name = _join(prefixes[(cp.component, cp.name)], dotted(path))
            if name in seen:
                raise CliError(f"two tensors would both be named {name!r} (key paths that differ only "
                               "in dots); export the components one at a time, or to .pt")
            seen.add(name)
            out.append(LogicalTensor(name, cp, leaf.index, entry))
    return out


def _values(selected: list[Copy], prefixes: dict[tuple[str, str], str]) -> dict[str, Any]:
    return {_join(prefixes[(cp.component, cp.name)], dotted(p)): leaf_value(v)
            for cp in selected for p, v in cp.values()}


def _read(storage: Storage, manifest: Manifest, items: list[LogicalTensor], bar: Progress) -> dict[str, torch.Tensor]:
    """The tensors of `items` by name, verified. Tied weights (one record under two names) get a
    copy per name: safetensors refuses one tensor under two names."""
    by_copy: dict[int, tuple[Copy, list[LogicalTensor]]] = {}
    for item in items:
        by_copy.setdefault(id(item.copy), (item.copy, []))[1].append(item)
    out: dict[str, torch.Tensor] = {}
    for cp, group in by_copy.values():
        for batch in read_batches(storage, manifest, cp, [i.index for i in group], bar.advance):
            taken: set[int] = set()
            for item in group:
                if item.index in batch:
                    t = batch[item.index]
                    out[item.name] = t.clone() if item.index in taken else t
                    taken.add(item.index)
    return {item.name: out[item.name] for item in items}


def _check_dtypes(items: list[LogicalTensor]) -> None:
    from safetensors import torch as st
    supported = set(getattr(st, "_TYPES", {}).values())
    for item in items:
        if supported and getattr(torch, item.entry.dtype) not in supported:
            raise CliError(f"safetensors cannot store {item.entry.dtype} (tensor {item.name}); "
                           "export to a .pt file instead")


def _metadata(manifest: Manifest, storage: Storage, selected: list[Copy], values: dict[str, Any]) -> dict[str, Any]:
    return {"async_ckpt_version": __version__, "root": storage.url, "step": manifest.step,
            "components": sorted({cp.component for cp in selected}),
            "copies": sorted({f"{cp.component}[{cp.name}]" for cp in selected}), "values": values}


def _save_safetensors(tensors: dict[str, torch.Tensor], path: str, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "async_ckpt": json.dumps(jsonable(meta))})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_target(path: str, force: bool, folder: bool) -> None:
    if "://" in path and not path.startswith("file://"):
        raise CliError(f"--to {path}: export writes local files only", EXIT_USAGE)
    if folder:
        if os.path.isfile(path):
            raise CliError(f"--to {path} is a file; a Hugging Face folder needs a folder path", EXIT_USAGE)
        if os.path.isdir(path) and os.listdir(path) and not force:
            raise CliError(f"--to {path} is a folder that is not empty; pass --force to write into it")
    elif os.path.exists(path) and not force:
        raise CliError(f"--to {path} exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CliError(f"--to {path}: the folder {parent} does not exist")


def _format_of(to: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    lower = to.lower()
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith((".pt", ".pth")):
        return "torch"
    if os.path.splitext(lower.rstrip("/"))[1] and not os.path.isdir(to):
        raise CliError(f"--to {to}: cannot tell the format from the name; use .safetensors, .pt/.pth, "
                       "a folder path (Hugging Face layout) or --format", EXIT_USAGE)
    return "hf"


def _sharded_state(storage: Storage, manifest: Manifest, cp: Copy, allow_pickle: bool) -> Any:
    """A SHARDED component's state with every tensor assembled to its global shape."""
    assert cp.sharded is not None
    tensors: list[torch.Tensor | None] = [None] * len(cp.sharded.tensors)
    for batch in read_batches(storage, manifest, cp, list(range(len(tensors)))):
        for i, t in batch.items():
            tensors[i] = t
    where = f"{storage.child_url(step_dir(manifest.step))} component {cp.component!r}"
    return unflatten(cp.sharded.tree, tensors, where, allow_pickle)   # type: ignore[arg-type]


def export_torch(storage: Storage, manifest: Manifest, selected: list[Copy], prefixes: dict[tuple[str, str], str],
                 path: str, allow_pickle: bool) -> int:
    """torch.save of the state objects as they load: one state, or nested by prefix parts."""
    folder = step_dir(manifest.step)
    tree: dict[str, Any] = {}
    root_state: Any = None
    with Progress("reading", sum(t.length for cp in selected for t in cp.shard.tensors)) as bar:
        for cp in selected:
            try:
                if cp.sharded is not None:
                    state = _sharded_state(storage, manifest, cp, allow_pickle)
                else:
                    state = load_shard(storage, folder, manifest, cp.component, cp.name, allow_pickle)
            except CorruptCheckpointError as exc:
                if "pickle" in str(exc) and not allow_pickle:
                    raise CliError(f"{exc} (pass --allow-pickle to unpickle it)") from exc
                raise
            bar.advance(sum(t.length for t in cp.shard.tensors))
            prefix = prefixes[(cp.component, cp.name)]
            if not prefix:
                root_state = state
                continue
            node = tree
            *parents, last = prefix.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = state
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(tree if root_state is None else root_state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return sum(t.nbytes for cp in selected for t in cp.shard.tensors)


def export_hf(storage: Storage, manifest: Manifest, items: list[LogicalTensor], meta: dict[str, Any],
              folder: str, shard_size: int) -> list[str]:
    """Shards of at most `shard_size` bytes (a larger tensor gets a shard of its own), read and
    written one at a time, then the index."""
    shards: list[list[LogicalTensor]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.entry.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.entry.nbytes
    os.makedirs(folder, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    with Progress("exporting", sum(i.entry.length for i in items)) as bar:
        for name, shard in zip(names, shards, strict=True):
            _save_safetensors(_read(storage, manifest, shard, bar), os.path.join(folder, name), meta)
            weight_map.update({item.name: name for item in shard})
    index = {"metadata": {"total_size": sum(i.entry.nbytes for i in items), "async_ckpt": jsonable(meta)},
             "weight_map": weight_map}
    tmp = os.path.join(folder, f".{INDEX_NAME}.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=2)
    os.replace(tmp, os.path.join(folder, INDEX_NAME))
    return names


@click.command("export")
@click.argument("root")
@click.option("--step", type=int, default=None, help="the step (default: the newest committed)")
@click.option("--component", default=None, help="export only this component (default: all)")
@click.option("--copy", "copy_name", default=None,
              help="only this copy of the component (rank2, node1, group0, ...; default: all, prefixed)")
@click.option("--to", "to", required=True, metavar="PATH",
              help="out.safetensors, out.pt / out.pth (torch.save, pickled), or a folder (Hugging Face "
                   "layout: sharded safetensors + model.safetensors.index.json)")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "torch", "hf"]), default=None,
              help="override the format the --to name implies")
@click.option("--shard-size", default="5GB", show_default=True, help="largest shard of a folder export")
@click.option("--allow-pickle", is_flag=True, help="unpickle values stored with allow_pickle (.pt only)")
@click.option("--force", is_flag=True, help="replace an existing file, write into a non-empty folder")
@storage_option
def export(root: str, step: int | None, component: str | None, copy_name: str | None, to: str,
           fmt: str | None, shard_size: str, allow_pickle: bool, force: bool,
           storage_options: tuple[str, ...]) -> int:
    """Write a committed checkpoint's component (or all of them) under ROOT as safetensors, a
    torch.save file or a Hugging Face style folder. Nothing is pickled unless the target is .pt.

    \b
    Example:
      async-ckpt export ./checkpoints --step 200 --component model --to model.safetensors
      async-ckpt export ./checkpoints --component model --to hf_model/ --shard-size 2GB
      async-ckpt export ./checkpoints --component rng --copy rank2 --to rng2.pt
    """
    kind = _format_of(to, fmt)
    limit = parse_size(shard_size)
    to = to[len("file://"):] if to.startswith("file://") else to
    _check_target(to, force, folder=kind == "hf")
    storage = open_root(root, storage_options)
    manifest = manifest_of(storage, choose_step(storage, check_step_option(step)))
    selected = copies(manifest, storage.child_url(step_dir(manifest.step)), component, copy_name)
    prefixes = _prefixes(selected, copy_name is not None)
    if kind == "torch":
        nbytes = export_torch(storage, manifest, selected, prefixes, to, allow_pickle)
        click.echo(f"wrote {to}: step {manifest.step}, {human_bytes(nbytes)} "
                   f"({', '.join(sorted({cp.component for cp in selected}))}; torch.save, pickled)")
        return 0
    items = logical_tensors(selected, prefixes)
    values = _values(selected, prefixes)
    meta = _metadata(manifest, storage, selected, values)
    pickled = [k for k, v in values.items() if isinstance(v, str) and v.startswith("<pickled")]
    if pickled:
        click.echo(f"warning: {len(pickled)} pickled value(s) are listed, not exported "
                   f"(e.g. {pickled[0]}); export to .pt with --allow-pickle to keep them", err=True)
    _check_dtypes(items)
    nbytes = sum(i.entry.nbytes for i in items)
    if kind == "safetensors":
        with Progress("exporting", sum(i.entry.length for i in items)) as bar:
            _save_safetensors(_read(storage, manifest, items, bar), to, meta)
        click.echo(f"wrote {to}: step {manifest.step}, {len(items)} tensor(s), {human_bytes(nbytes)}, "
                   f"{len(values)} value(s) in its metadata")
    else:
        names = export_hf(storage, manifest, items, meta, to, limit)
        click.echo(f"wrote {to}/: step {manifest.step}, {len(items)} tensor(s), {human_bytes(nbytes)} in "
                   f"{len(names)} shard(s) + {INDEX_NAME}")
    return 0
