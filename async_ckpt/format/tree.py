"""Turning nested state into (JSON skeleton, tensor list) and back.

The skeleton is plain JSON. Containers are tagged objects so nothing is ambiguous:
``{"d": [[key, value], ...]}`` dict (``"o": 1`` for OrderedDict, ``"m"`` its ``_metadata``),
``{"l": [...]}`` list, ``{"u": [...]}`` tuple, ``{"t": i}`` tensor i (``"np": 1`` a NumPy array),
``{"f": "nan"|"inf"|"-inf"}`` a non-finite float, ``{"dt": "float32"}`` a torch.dtype and, only
with the pickle opt-in, ``{"p": base64}``. JSON scalars stand for themselves.
Decoding validates every node, so a hostile manifest fails with CorruptCheckpointError.
"""
from __future__ import annotations

import base64
import collections
import math
import pickle
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CorruptCheckpointError, InvalidArgumentError

DTYPES: dict[str, torch.dtype] = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}
_SCALARS = (str, int, bool, type(None))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, where: str) -> torch.dtype:
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CorruptCheckpointError(f"{where}: unknown dtype {name!r} in the manifest")
    return dtype


def _is_numpy_array(obj: Any) -> bool:
    return type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray"


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def _check_tensor(t: torch.Tensor, path: str, dtensors: bool = False) -> torch.Tensor:
    if _is_dtensor(t):
        if not dtensors:
            raise InvalidArgumentError(
                f"state at {path!r} is a DTensor (FSDP2, tensor parallel): register its component "
                "with sharing_pattern=SharingPattern.SHARDED, which saves each rank's chunks once "
                "and reshards them on load (docs/distributed.md)")
        return t.detach()
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise InvalidArgumentError(
            f"state at {path!r} is a {type(t).__name__}; only plain tensors (and DTensors, in "
            "SHARDED components) are supported (convert other tensor subclasses first)")
    if t.is_quantized:
        raise InvalidArgumentError(
            f"state at {path!r} is a quantized tensor ({t.dtype}); store its int_repr() and "
            "quantization parameters instead (quantized tensors cannot be checkpointed directly)")
    if t.layout != torch.strided or t.device.type == "meta":
        raise InvalidArgumentError(
            f"state at {path!r} is a {t.layout}/{t.device.type} tensor; only dense, materialised "
            "tensors can be checkpointed (call .to_dense() / materialise it first)")
    return t.detach()


def flatten(obj: Any, path: str, allow_pickle: bool = False, dtensors: bool = False
            ) -> tuple[Any, list[torch.Tensor]]:
    """Split `obj` into a JSON skeleton and the tensors it references (in skeleton order).

    Tensors that are the same view of the same storage (tied weights) are stored once. DTensors
    are accepted (as they are) only with `dtensors` (SHARDED components).
    """
    tensors: list[torch.Tensor] = []
    seen: dict[tuple, int] = {}

    def tensor_ref(t: torch.Tensor, p: str) -> int:
        t = _check_tensor(t, p, dtensors)
        data = t.to_local() if _is_dtensor(t) else t   # type: ignore[attr-defined]
        ident = ((data.data_ptr(), t.dtype, tuple(t.shape), data.stride(), data.device)
                 if data.data_ptr() else None)
        if ident is not None and ident in seen:
            return seen[ident]
        tensors.append(t)
        if ident is not None:
            seen[ident] = len(tensors) - 1
        return len(tensors) - 1

    def enc(o: Any, p: str) -> Any:
        if isinstance(o, torch.Tensor):
            return {"t": tensor_ref(o, p)}
        if isinstance(o, bool) or o is None or isinstance(o, str):
            return o
        if isinstance(o, int):
            return int(o)
        if isinstance(o, float):
            if math.isfinite(o):
                return float(o)
            return {"f": "nan" if math.isnan(o) else ("inf" if o > 0 else "-inf")}
        if isinstance(o, dict):
            items = []
            for k, v in o.items():
                if not isinstance(k, _SCALARS):
                    raise InvalidArgumentError(
                        f"state at {p!r} has a dict key of type {type(k).__name__}; keys must be "
                        "str, int, bool or None")
                items.append([k, enc(v, f"{p}/{k}")])
            node: dict = {"d": items}
            if isinstance(o, collections.OrderedDict):
                node["o"] = 1
            meta = getattr(o, "_metadata", None)
            if isinstance(meta, dict):
                node["m"] = enc(meta, f"{p}/_metadata")
            return node
        if isinstance(o, list):
            return {"l": [enc(v, f"{p}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, tuple) and (type(o) is tuple or isinstance(o, torch.Size)):
            return {"u": [enc(v, f"{p}/{i}") for i, v in enumerate(o)]}
        if isinstance(o, torch.dtype):
            return {"dt": dtype_name(o)}
        if _is_numpy_array(o) and o.dtype.kind in "biufc":
            import numpy as np  # present: `o` is a NumPy array
            contiguous = o.flags.c_contiguous and o.flags.writeable
            return {"t": tensor_ref(torch.from_numpy(o if contiguous else np.ascontiguousarray(o).copy()), p),
                    "np": 1}
        if allow_pickle:
            return {"p": base64.b64encode(pickle.dumps(o)).decode("ascii")}
        raise InvalidArgumentError(
            f"state at {p!r} is a {type(o).__module__}.{type(o).__qualname__}, which cannot be "
            "stored as JSON or a tensor; convert it in state_dict(), or pass allow_pickle=True "
            "to AsyncCheckpointer if you trust every reader of this checkpoint")

    return enc(obj, path), tensors


def unflatten(skel: Any, tensors: list[torch.Tensor], where: str, allow_pickle: bool = False) -> Any:
    """Rebuild the object `flatten` split. Raises CorruptCheckpointError on any malformed node."""

    def bad(p: str, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: malformed state skeleton at {p!r}: {why}")

    def dec(n: Any, p: str) -> Any:
        if n is None or isinstance(n, (str, bool, int, float)):
            return n
        if isinstance(n, list) or not isinstance(n, dict) or not n:
            raise bad(p, f"unexpected JSON value {type(n).__name__}")
        if "t" in n:
            i = n["t"]
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(tensors):
                raise bad(p, f"tensor index {i!r} out of range")
            if not n.get("np"):
                return tensors[i]
            try:
                return tensors[i].numpy()
            except (TypeError, RuntimeError) as exc:   # bfloat16, complex32, ...: no NumPy dtype
                raise bad(p, f"tensor {i} ({dtype_name(tensors[i].dtype)}) is marked as a NumPy "
                             f"array, which it cannot be: {exc}") from None
        if "d" in n:
            items = n["d"]
            if not isinstance(items, list):
                raise bad(p, "dict items are not a list")
            out: dict = collections.OrderedDict() if n.get("o") else {}
            for item in items:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], _SCALARS)):
                    raise bad(p, "dict item is not a [key, value] pair")
                out[item[0]] = dec(item[1], f"{p}/{item[0]}")
            if "m" in n:
                meta = dec(n["m"], f"{p}/_metadata")
                if isinstance(out, collections.OrderedDict) and isinstance(meta, dict):
                    out._metadata = meta  # type: ignore[attr-defined]
            return out
        if "l" in n or "u" in n:
            seq = n.get("l", n.get("u"))
            if not isinstance(seq, list):
                raise bad(p, "sequence is not a list")
            values = [dec(v, f"{p}/{i}") for i, v in enumerate(seq)]
            return values if "l" in n else tuple(values)
        if "f" in n:
            if n["f"] not in ("nan", "inf", "-inf"):
                raise bad(p, f"bad float tag {n['f']!r}")
            return float(n["f"])
        if "dt" in n:
            return dtype_from_name(n["dt"], f"{where} at {p!r}")
        if "p" in n:
            if not allow_pickle:
                raise CorruptCheckpointError(
                    f"{where}: state at {p!r} was stored with pickle; refusing to unpickle it. "
                    "Pass allow_pickle=True to AsyncCheckpointer only if you trust this checkpoint")
            try:
                return pickle.loads(base64.b64decode(n["p"]))
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is corruption here
                raise bad(p, f"cannot unpickle: {exc}") from exc
        raise bad(p, f"unknown node tag(s) {sorted(n)[:3]}")

    try:
        return dec(skel, "")
    except RecursionError:
        raise bad("", "nested too deeply") from None


@dataclass(frozen=True)
class TensorLeaf:
    """A tensor reference in a skeleton: tensor `index` of the shard (`numpy`: a NumPy array)."""
    index: int
    numpy: bool = False


@dataclass(frozen=True)
class PickledLeaf:
    """A leaf stored with pickle (`allow_pickle=True`); listed, never unpickled."""
    nbytes: int


def leaves(skel: Any, where: str) -> list[tuple[tuple[Any, ...], Any]]:
    """Every leaf of a skeleton in order, with its key path (dict keys and sequence indices): a
    `TensorLeaf`, a `PickledLeaf`, or the value as `unflatten` gives it; an empty container is a
    leaf too. A module's ``_metadata`` is not state and is skipped. For tools that list or compare
    what a checkpoint holds without reading its tensors; malformed nodes raise
    CorruptCheckpointError like `unflatten`."""
    out: list[tuple[tuple[Any, ...], Any]] = []

    def walk(n: Any, path: tuple[Any, ...]) -> None:
        if isinstance(n, dict) and "t" in n:
            if not isinstance(n["t"], int) or isinstance(n["t"], bool) or n["t"] < 0:
                raise CorruptCheckpointError(f"{where}: bad tensor index at {path!r}")
            out.append((path, TensorLeaf(n["t"], bool(n.get("np")))))
        elif isinstance(n, dict) and "p" in n:
            out.append((path, PickledLeaf(len(str(n["p"])) * 3 // 4)))
        elif isinstance(n, dict) and "d" in n and isinstance(n["d"], list) and n["d"]:
            for item in n["d"]:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], _SCALARS)):
                    raise CorruptCheckpointError(f"{where}: dict item at {path!r} is not a [key, value] pair")
                walk(item[1], path + (item[0],))
        elif isinstance(n, dict) and isinstance(seq := n.get("l", n.get("u")), list) and seq:
            for i, v in enumerate(seq):
                walk(v, path + (i,))
        else:
            out.append((path, unflatten(n, [], where)))   # scalars, non-finite floats, dtypes, {}

    walk(skel, ())
    return out
