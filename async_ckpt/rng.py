"""RNGState: the random generators of this rank as a checkpointable component."""
from __future__ import annotations

import random
import warnings

import torch


class RNGState:
    """Captures and restores torch's CPU generator, every CUDA device's generator, Python's
    `random` and NumPy's global generator (when NumPy is installed).

    Register it as a PER_RANK component so each rank gets its own streams back. Restoring on a
    machine with fewer (or no) GPUs than the one that saved restores what fits and warns.
    """

    def state_dict(self) -> dict:
        version, mt, gauss = random.getstate()
        state = {
            "torch_cpu": torch.get_rng_state(),
            "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        }
        if torch.cuda.is_available():
            state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
        try:
            import numpy as np
        except ImportError:
            return state
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch_cpu"])
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["mt"].tolist()), py["gauss"]))
        saved_cuda = state.get("torch_cuda") or []
        if saved_cuda:
            present = torch.cuda.device_count() if torch.cuda.is_available() else 0
            for device, cuda_state in enumerate(saved_cuda[:present]):
                torch.cuda.set_rng_state(cuda_state, device)
            if present < len(saved_cuda):
                warnings.warn(f"checkpoint holds RNG state for {len(saved_cuda)} CUDA devices but "
                              f"{present} are visible; restored {present}, the rest are ignored",
                              stacklevel=2)
        if "numpy" in state:
            try:
                import numpy as np
            except ImportError:
                warnings.warn("checkpoint holds NumPy RNG state but NumPy is not installed", stacklevel=2)
                return
            npst = state["numpy"]
            np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                                 npst["has_gauss"], npst["cached"]))
