"""``async-ckpt import``: build a committed checkpoint from a DCP checkpoint folder, a safetensors
file (or a Hugging Face folder of them) or a ``torch.save`` file, through the public API
(`AsyncCheckpointer.save`), so the result is an ordinary checkpoint: same manifest, hashes,
atomic commit, the root's other steps untouched.

Components: a DCP checkpoint of ``{"model": ..., "optim": ...}`` (what ``dcp.save`` of several
state dicts gives) becomes one GLOBAL component per top-level key; anything else (a flat state
dict, a safetensors file) becomes one component, ``--component`` (default ``model``), which
also forces a single component. DCP keeps dict keys as strings: the integer parameter ids of a
``torch.optim.Optimizer.state_dict()`` are restored, so it loads into its optimizer.

Pickle: DCP's metadata and its non-tensor values are pickles. Without ``--allow-pickle`` they are
read with restricted unpicklers (DCP's own metadata classes, torch dtypes and sizes; values with
``torch.load(weights_only=True)``), so a hostile folder cannot run code. A ``torch.save`` file is
read only with ``--allow-pickle``.
"""
from __future__ import annotations

import glob
import io
import json
import os
import pickle
import warnings
from typing import Any

import click
import torch

from ..checkpointer import AsyncCheckpointer
from ..types import KEY_RE, SharingPattern, StateComponent
from .common import EXIT_USAGE, CliError, open_root, parse_storage_options, storage_option
from .output import human_bytes

_SAFE_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
_SAFE_DCP_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                   ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                   ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _Held:
    """The imported state as a Stateful (its state_dict is what gets saved)."""

    def __init__(self, state: Any):
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` without running code: only its own dataclasses and torch value types."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _SAFE_DCP_NAMES or dtype:
            return super().find_class(module, name)
        if module in _SAFE_DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise CliError(f"the DCP metadata references {module}.{name}, which the safe reader does not "
                       "load; pass --allow-pickle if you trust this checkpoint")


def _dcp_load(src: str, allow_pickle: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    if not allow_pickle:
        # Refuse a hostile .metadata here, before DCP (which would wrap the refusal in its own
        # multi-rank error report).
        path = os.path.join(src, ".metadata")
        try:
            with open(path, "rb") as f:
                _MetadataUnpickler(f).load()
        except CliError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unreadable file
            raise CliError(f"cannot read the DCP metadata {path}: {exc}") from exc
    reader = dcp.FileSystemReader(src) if allow_pickle else SafeReader(src)
    planner = _EmptyStateDictLoadPlanner() if allow_pickle else SafePlanner()
    state: dict[str, Any] = {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            # What format_utils.dcp_to_torch_save does: an empty state filled from the metadata.
            _load_state_dict(state, storage_reader=reader, planner=planner, no_dist=True)
    except Exception as exc:  # noqa: BLE001 - DCP wraps every failure in a multi-line report
        last = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()][-1:] or [type(exc).__name__]
        hint = "" if allow_pickle else " (a value may need full unpickling: --allow-pickle if you trust it)"
        raise CliError(f"cannot read the DCP checkpoint {src}: {last[0]}{hint}") from exc
    return _restore_optimizer_keys(state)


def _restore_optimizer_keys(obj: Any) -> Any:
    """DCP stores dict keys as strings; an Optimizer.state_dict() needs its integer ids back."""
    if isinstance(obj, dict):
        obj = {k: _restore_optimizer_keys(v) for k, v in obj.items()}
        state, groups = obj.get("state"), obj.get("param_groups")
        if (isinstance(state, dict) and isinstance(groups, list) and state
                and all(isinstance(k, str) and k.isdigit() for k in state)
                and all(isinstance(g, dict) and all(isinstance(p, int) for p in g.get("params", [])) for g in groups)):
            obj["state"] = {int(k): v for k, v in state.items()}
    elif isinstance(obj, list):
        obj = [_restore_optimizer_keys(v) for v in obj]
    return obj


def _safetensors_load(src: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    from safetensors.torch import load_file
    if os.path.isdir(src):
        files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
        index = glob.glob(os.path.join(src, "*.safetensors.index.json"))
        if index:
            with open(index[0]) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted({os.path.join(src, name) for name in weight_map.values()})
    else:
        files = [src]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state, files


def _source(src: str, allow_pickle: bool) -> tuple[str, Any]:
    if os.path.isdir(src):
        if os.path.exists(os.path.join(src, ".metadata")):
            return "DCP checkpoint", _dcp_load(src, allow_pickle)
        if glob.glob(os.path.join(src, "*.safetensors")):
            state, files = _safetensors_load(src)
            return f"safetensors folder ({len(files)} file(s))", state
        raise CliError(f"{src} is neither a DCP checkpoint (no .metadata) nor a folder of safetensors files")
    if not os.path.exists(src):
        raise CliError(f"{src} does not exist")
    with open(src, "rb") as f:
        head = f.read(16)
    if src.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
        return "safetensors file", _safetensors_load(src)[0]
    if not allow_pickle:
        raise CliError(f"{src} looks like a torch.save file: loading it runs pickle, which can run any "
                       "code; pass --allow-pickle if you trust it")
    return "torch.save file", torch.load(src, map_location="cpu", weights_only=False, mmap=True)


def _components(state: Any, component: str | None) -> list[tuple[str, Any]]:
    if component is None and isinstance(state, dict) and state and all(
            isinstance(k, str) and KEY_RE.fullmatch(k) and isinstance(v, dict) for k, v in state.items()):
        return list(state.items())
    name = component or "model"
    if not KEY_RE.fullmatch(name):
        raise CliError(f"--component {name!r} must match [A-Za-z0-9_.-]+", EXIT_USAGE)
    return [(name, state)]


@click.command("import")
@click.argument("src")
@click.argument("root")
@click.option("--step", type=click.IntRange(0), required=True, help="the step to commit it as")
@click.option("--component", default=None,
              help="put the whole state in this one component (default: one per top-level key of "
                   "a DCP checkpoint, else 'model')")
@click.option("--compression", type=click.Choice(["none", "zstd"]), default="none", show_default=True)
@click.option("--metric", "metrics", multiple=True, metavar="NAME=VALUE", help="metrics to record; repeatable")
@click.option("--allow-pickle", is_flag=True,
              help="read a torch.save file (pickle can run code), and DCP pickles without restrictions")
@storage_option
def import_(src: str, root: str, step: int, component: str | None, compression: str,
            metrics: tuple[str, ...], allow_pickle: bool, storage_options: tuple[str, ...]) -> int:
    """Commit SRC (a DCP checkpoint folder, a safetensors file or folder, or with --allow-pickle a
    torch.save file) as the checkpoint of --step under ROOT. Non-tensor values must be plain
    JSON-able values (ints, floats, strings, lists, dicts).

    \b
    Example:
      async-ckpt import ./dcp_ckpt/step_1000 ./checkpoints --step 1000
      async-ckpt import model.safetensors s3://bucket/run1 --step 0 -o endpoint_url=http://127.0.0.1:8333
    """
    values: dict[str, float] = {}
    for item in metrics:
        name, sep, raw = item.partition("=")
        try:
            values[name] = float(raw)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise CliError(f"--metric {item!r}: expected NAME=NUMBER", EXIT_USAGE)
    open_root(root, storage_options, must_exist=False)     # a wrong URL fails before SRC is read
    kind, state = _source(src, allow_pickle)
    parts = _components(state, component)
    comps = [StateComponent(key, _Held(sub), SharingPattern.GLOBAL) for key, sub in parts]
    with AsyncCheckpointer(root, comps, storage_options=parse_storage_options(storage_options),
                           compression=None if compression == "none" else compression) as ckpt:
        info = ckpt.save(step, metrics=values).wait()
    click.echo(f"imported {kind} {src} as step {info.step} at {info.url}: components "
               f"{', '.join(k for k, _ in parts)}, {human_bytes(info.nbytes)}")
    return 0
