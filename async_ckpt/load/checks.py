"""What a load checks before the first ``load_state_dict``, and how it reports one that fails.

Verify-before-mutate: every record's hash is checked while it is read (`load.reader`); this
module adds the checks of the *restored state* against the live objects, so that a mismatch is
an error before any component changes:

- a component whose stateful offers ``check_state_dict(state)`` (the project's own
  `ResumableSampler` does; any user Stateful may) is asked first: it raises to refuse;
- an ``nn.Module`` gets its keys and tensor shapes compared with its live ``state_dict()``
  (what ``load_state_dict(strict=True)`` would refuse half-way), with a hint when the two differ
  only by a ``module.`` prefix (a DDP-wrapped model saved, an unwrapped one loading, or back).

When a ``load_state_dict`` still raises, `PartialLoadError` says exactly which components were
restored and which were not.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..errors import CheckpointError, InvalidArgumentError, PartialLoadError
from ..types import StateComponent


def check_before_load(c: StateComponent, state: Any) -> None:
    """Raise InvalidArgumentError naming `c` if restoring `state` into it cannot work."""
    hook = getattr(c.stateful, "check_state_dict", None)
    if callable(hook):
        try:
            hook(state)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - the component's own refusal, named
            raise InvalidArgumentError(f"component {c.key!r} refuses the saved state: {exc}") from exc
    if isinstance(c.stateful, torch.nn.Module) and isinstance(state, Mapping):
        _check_module(c.key, c.stateful, state)


def _check_module(key: str, module: torch.nn.Module, state: Mapping) -> None:
    live = module.state_dict()
    missing = [k for k in live if k not in state]
    unexpected = [k for k in state if k not in live]
    if missing or unexpected:
        hint = ""
        if missing and all(f"module.{k}" in state for k in missing):
            hint = (" The saved keys carry a 'module.' prefix: it was saved wrapped (DDP) and is "
                    "loaded unwrapped; register the same object in both runs (e.g. model.module "
                    "for DDP, or ac.ModelState(model)).")
        elif unexpected and all(f"module.{k}" in live for k in unexpected):
            hint = (" The live keys carry a 'module.' prefix: it was saved unwrapped and is loaded "
                    "wrapped (DDP); register model.module instead.")
        raise InvalidArgumentError(
            f"component {key!r}: the saved state does not fit the module: missing keys "
            f"{_few(missing)}, unexpected keys {_few(unexpected)}.{hint}")
    shapes = [f"{k!r}: saved {list(v.shape)}, module {list(live[k].shape)}" for k, v in state.items()
              if isinstance(v, torch.Tensor) and isinstance(live[k], torch.Tensor)
              and v.shape != live[k].shape]
    if shapes:
        raise InvalidArgumentError(f"component {key!r}: saved tensors do not match the module's "
                                   f"shapes ({_few(shapes, quote=False)})")


def _few(items: Sequence[str], n: int = 5, quote: bool = True) -> str:
    shown = ", ".join(repr(i) if quote else i for i in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})" if items else "[]"


def describe_partial(step: int, restored: list[str], failed: str, pending: list[str],
                     exc: BaseException) -> PartialLoadError:
    err = PartialLoadError(
        f"loading step {step}: component {failed!r} raised in load_state_dict ({exc!r}) after "
        f"{restored or 'no component'} {'were' if len(restored) != 1 else 'was'} restored; not "
        f"restored: {[failed] + pending}. The live state is now partly from step {step}: load "
        "again (or another step) before training on")
    err.__cause__ = exc
    return err
