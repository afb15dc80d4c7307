"""RNGState: the random generators of this rank as a checkpointable component.

Bit-exact resume needs every stream a training step draws from: dropout and torch.randn (torch
CPU and each CUDA device), Python's `random` (augmentations, shuffles in user code) and NumPy's
global generator. Everything is stored as tensors and JSON scalars, never pickle.
"""
from __future__ import annotations

import random
import warnings
from typing import Mapping, cast

import torch

from ..errors import InvalidArgumentError


def _own(state: torch.Tensor) -> torch.Tensor:
    """A copy with its own storage. Loaded tensors can be views into one shared read buffer, and
    torch's Generator.set_state reads from the start of the storage, ignoring the view's offset
    (torch 2.13: "Invalid mt19937 state", or a crash for other generator kinds)."""
    return state.detach().to("cpu", torch.uint8).clone(memory_format=torch.contiguous_format)


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class RNGState:
    """Captures and restores torch's CPU generator, every CUDA device's generator, Python's
    `random` and NumPy's global generator (when NumPy is installed).

    Register it as a PER_RANK component so each rank gets its own streams back::

        StateComponent("rng", RNGState(), SharingPattern.PER_RANK)

    Restoring on a machine with fewer (or no) GPUs than the one that saved restores the devices
    that exist and warns (the other devices' streams are lost, so GPU-side randomness will not
    repeat the saved run); it never fails for that reason.

    `generators` adds private ``torch.Generator`` objects by name, e.g. the one given to a
    DataLoader as ``generator=`` (a DataLoader without one draws a seed from the global torch
    stream every time an iterator is created, which a resumed run does at a different step).
    """

    def __init__(self, generators: Mapping[str, torch.Generator] | None = None) -> None:
        self.generators = dict(generators or {})
        for name, gen in self.generators.items():
            if not isinstance(name, str) or not isinstance(gen, torch.Generator):
                raise InvalidArgumentError(
                    f"RNGState generators must map names (str) to torch.Generator objects; got "
                    f"{name!r}: {type(gen).__name__}")

    def state_dict(self) -> dict:
        """The current state of every generator of this process."""
        version, mt, gauss = random.getstate()
        state: dict = {
            "torch_cpu": torch.get_rng_state(),
            "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        }
        if _cuda_count():
            state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
        if self.generators:
            state["generators"] = {name: gen.get_state() for name, gen in self.generators.items()}
        try:
            import numpy as np
        except ImportError:
            return state
        kind, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state(legacy=True))
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Set every generator present in `state`; warn about streams that cannot be restored."""
        torch.set_rng_state(_own(state["torch_cpu"]))
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["mt"].tolist()), py["gauss"]))
        self._load_cuda(list(state.get("torch_cuda") or []))
        saved_gens = state.get("generators") or {}
        for name, gen in self.generators.items():
            if name in saved_gens:
                gen.set_state(_own(saved_gens[name]))
            else:
                warnings.warn(f"RNGState: generator {name!r} is not in the checkpoint; it keeps its "
                              "current state (register it before saving to restore it)", stacklevel=2)
        if "numpy" in state:
            self._load_numpy(state["numpy"])

    @staticmethod
    def _load_cuda(saved: list) -> None:
        present = _cuda_count()
        for device, cuda_state in enumerate(saved[:present]):
            torch.cuda.set_rng_state(_own(cuda_state), device)
        if present < len(saved):
            warnings.warn(
                f"RNGState: the checkpoint holds the RNG state of {len(saved)} CUDA device(s) but "
                f"{present} are visible here; restored {min(present, len(saved))}, the others are "
                "dropped, so GPU-side random draws will differ from the saved run. Resume on a "
                "machine with as many GPUs for a bit-exact continuation", stacklevel=3)
        elif saved and present > len(saved):
            warnings.warn(
                f"RNGState: the checkpoint holds the RNG state of {len(saved)} CUDA device(s) but "
                f"{present} are visible; devices {len(saved)}..{present - 1} keep their current "
                "state", stacklevel=3)

    @staticmethod
    def _load_numpy(npst: dict) -> None:
        try:
            import numpy as np
        except ImportError:
            warnings.warn("RNGState: the checkpoint holds NumPy's RNG state but NumPy is not "
                          "installed here; install numpy to restore it", stacklevel=3)
            return
        np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), int(npst["pos"]),
                             int(npst["has_gauss"]), float(npst["cached"])))
