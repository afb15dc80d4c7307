"""ModelState and OptimizerState: a model's and an optimizer's state as components, the same for
a plain module, DDP and a `torch.distributed.pipelining` stage.

Both are Stateful wrappers over ``torch.distributed.checkpoint.state_dict`` (DCP's
``get_model_state_dict``/``get_optimizer_state_dict`` and their ``set_*``), so what is saved is
keyed by fully-qualified parameter names, never by wrapper prefixes or parameter ids:

- a DDP-wrapped model saves ``layer.weight``, not ``module.layer.weight``, so the checkpoint loads
  into the wrapped and the unwrapped model alike;
- the optimizer state is flattened (``StateDictOptions(flatten_optimizer_state_dict=True)``):
  ``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``... Each parameter carries its group's
  hyperparameters, so a pipeline stage's optimizer (whose ids start at 0 on every stage) saves
  and reloads its own groups, betas and eps included;
- loading into a fresh optimizer (no step taken yet) works: DCP initialises the optimizer state
  (one step with zero gradients and lr 0) before loading, so the saved state has keys to land in.

Deviations from DCP's defaults, each to keep resume bit-exact: saving an optimizer that has no
state yet does not leave DCP's initialisation step behind (the state is cleared again and not
saved), and loading a checkpoint of such an optimizer leaves it without state, as it was saved.
A full optimizer state (``full_state_dict=True``) is loaded in DCP's nested form, rebuilt here
(`OptimizerState._nested`): torch 2.13 cannot load a full flattened one.
DTensor state (FSDP2, tensor parallel) is passed through as DCP returns it (the SHARDED pattern).

Register them like any component (REPLICATED under DDP, PER_RANK for a pipeline stage)::

    StateComponent("model", ModelState(model), SharingPattern.REPLICATED)
    StateComponent("optimizer", OptimizerState(model, optimizer), SharingPattern.REPLICATED)

Both are called on the training thread of every rank: ``state_dict()`` from
``AsyncCheckpointer.save``, ``check_state_dict`` then ``load_state_dict`` from ``load``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..errors import InvalidArgumentError


def _module_of(model: Any) -> torch.nn.Module:
    """The module to read: a pipelining stage (``PipelineStage``) gives its ``submod``."""
    sub = getattr(model, "submod", None)
    if not isinstance(model, torch.nn.Module) and isinstance(sub, torch.nn.Module):
        return sub
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"ModelState/OptimizerState need an nn.Module (or a pipeline stage), "
                                   f"got {type(model).__name__}")
    return model


def _options(full_state_dict: bool, cpu_offload: bool, strict: bool) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full_state_dict, cpu_offload=cpu_offload, strict=strict,
                            flatten_optimizer_state_dict=True)


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''} ({len(keys)})"


class ModelState:
    """A model's parameters and buffers by fully-qualified name (wrapper prefixes removed).

    ``full_state_dict``/``cpu_offload``/``strict`` are DCP's ``StateDictOptions`` of the same
    names (``strict`` also decides whether ``check_state_dict`` refuses missing/unexpected keys).

    Loading copies the values into the model's own parameters and keeps no reference to them
    (``copies_on_load``), so a GLOBAL or REPLICATED ModelState is loaded from one shared buffer
    per node (load.node_shared): a full state dict (``full_state_dict=True``) is materialised
    once per node, not once per rank.
    """

    copies_on_load = True

    def __init__(self, model: Any, *, full_state_dict: bool = False, cpu_offload: bool = False,
                 strict: bool = True) -> None:
        self.model = _module_of(model)
        self.options = _options(full_state_dict, cpu_offload, strict)

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model, options=self.options)

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse, before anything is restored, a state whose keys or shapes do not fit."""
        if not self.options.strict:
            return
        live = self.state_dict()
        missing = [k for k in live if k not in state]
        unexpected = [k for k in state if k not in live]
        if missing or unexpected:
            hint = ""
            if missing and all(f"module.{k}" in state for k in missing):
                hint = (" The saved keys carry a 'module.' prefix: they were saved from a DDP-wrapped "
                        "model registered directly; register ac.ModelState(model) in both runs.")
            raise InvalidArgumentError(f"ModelState: the saved state does not fit the model: missing "
                                       f"keys {_few(missing)}, unexpected keys {_few(unexpected)}.{hint}")
        shapes = [f"{k}: saved {list(v.shape)}, model {list(live[k].shape)}" for k, v in state.items()
                  if isinstance(v, torch.Tensor) and isinstance(live[k], torch.Tensor)
                  and v.shape != live[k].shape]
        if shapes:
            raise InvalidArgumentError(f"ModelState: saved tensors do not match the model's shapes: "
                                       f"{_few(shapes)}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_model_state_dict(self.model, dict(state), options=self.options)


class OptimizerState:
    """An optimizer's state, flattened and keyed by the fully-qualified names of `model`'s
    parameters (``state.<fqn>.<name>``, ``param_groups.<fqn>.<hyperparameter>``)."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, *, full_state_dict: bool = False,
                 cpu_offload: bool = False, strict: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(f"OptimizerState needs a torch.optim.Optimizer, got "
                                       f"{type(optimizer).__name__}")
        inner = getattr(optimizer, "optimizer", None)       # accelerate's AcceleratedOptimizer
        self.model = _module_of(model)
        self.optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        self.options = _options(full_state_dict, cpu_offload, strict)

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer.state:
            return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        # DCP initialises an optimizer without state by stepping it once (zero grads, lr 0): the
        # parameters do not move, but the state would (Adam's step count starts at 1), so the run
        # that saved would no longer match one that did not. Undo it and save the groups only.
        state = get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        self.optimizer.state.clear()
        return {k: v for k, v in state.items() if not k.startswith("state.")}

    def load_target(self) -> dict[str, Any]:
        """The live state a SHARDED load fills (load.reshard): with the optimizer state's entries
        even before the first step (DCP's initialisation is undone again, so nothing changes
        before the load's verdict), so the saved state has a place to land."""
        fresh = not self.optimizer.state
        state = get_optimizer_state_dict(self.model, self.optimizer, options=self.options)
        if fresh:
            self.optimizer.state.clear()
        return state

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse a state saved for other parameters (before anything is restored)."""
        if not self.options.strict:
            return
        live = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in self.state_dict() if k.startswith("param_groups.")}
        saved = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in state if k.startswith("param_groups.")}
        if live != saved:
            raise InvalidArgumentError(
                f"OptimizerState: the saved optimizer was built over other parameters: missing "
                f"{_few(sorted(live - saved))}, unexpected {_few(sorted(saved - live))}; build the "
                "optimizer over the same model (and pipeline stage) as the run that saved")

    def _nested(self, flat: dict[str, Any]) -> dict[str, Any]:
        """The flattened state in DCP's nested, FQN-keyed form (``state[fqn][name]``,
        ``param_groups[i]`` with ``params`` as FQNs in the live optimizer's order). torch 2.13's
        ``set_optimizer_state_dict`` with ``full_state_dict`` cannot take the flattened form (it
        flattens the live state one way and the given one another, and fails with a KeyError on
        ``param_groups.0.params.0``), so a full state is unflattened here and passed nested. The
        live groups come from DCP itself (local, unflattened: no collective), whose
        initialisation of a fresh optimizer is undone as in `state_dict`."""
        fresh = not self.optimizer.state
        live: Any = get_optimizer_state_dict(self.model, self.optimizer,
                                             options=StateDictOptions(flatten_optimizer_state_dict=False))
        if fresh:
            self.optimizer.state.clear()
        groups = [{"params": [str(f) for f in group["params"]]} for group in live["param_groups"]]
        owner = {fqn: i for i, g in enumerate(groups) for fqn in g["params"]}
        state: dict[str, Any] = {}
        for key, value in flat.items():       # one pass: a key is <kind>.<fqn>.<name path>
            kind, _, rest = key.partition(".")
            fqn, tail = rest, ""
            while fqn and fqn not in owner:   # FQNs hold dots: the longest live one that fits
                fqn, _, last = fqn.rpartition(".")
                tail = f"{last}.{tail}" if tail else last
            if not fqn or not tail:
                continue
            if kind == "param_groups":
                group = groups[owner[fqn]]
                if group["params"][0] == fqn:  # a group's hyperparameters: its first parameter's
                    group[tail] = value
            elif kind == "state":
                *path, name = tail.split(".")
                node = state.setdefault(fqn, {})
                for part in path:
                    node = node.setdefault(part, {})
                node[name] = value
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        stateless = not any(k.startswith("state.") for k in state)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grads = {p: p.grad for p in params}
        # DCP initialises the optimizer state (so the saved one has names to land in) only when
        # it is empty and no gradient exists. A state saved before the first step has nothing to
        # land: then keep DCP from initialising (one placeholder gradient) and load the groups.
        if stateless:
            self.optimizer.state.clear()
            for p in params:
                p.grad = torch.zeros_like(p) if p is params[0] else None
        elif not self.optimizer.state:
            for p in params:
                p.grad = None
        try:
            if self.options.full_state_dict and not stateless:
                set_optimizer_state_dict(self.model, self.optimizer, self._nested(state),
                                         options=replace(self.options, flatten_optimizer_state_dict=False))
            else:       # groups only: nothing to distribute (DCP's full path needs a state tensor)
                set_optimizer_state_dict(self.model, self.optimizer, state,
                                         options=replace(self.options, full_state_dict=False))
        finally:
            for p, g in grads.items():
                p.grad = g
        if stateless:
            self.optimizer.state.clear()


def warn_unregistered_schedulers(components: Any) -> None:
    """Warn when an optimizer among `components` is driven by an LR scheduler (torch's schedulers
    leave ``initial_lr`` in its param groups) and no scheduler over it is registered: resuming
    would restart the schedule at step 0 (torch cannot name the scheduler from its optimizer)."""
    import warnings

    def optimizer_of(obj: Any) -> Any:
        obj = getattr(obj, "optimizer", obj)           # OptimizerState, accelerate's wrappers
        return getattr(obj, "optimizer", obj)

    optimizers = {c.key: optimizer_of(c.stateful) for c in components
                  if isinstance(optimizer_of(c.stateful), torch.optim.Optimizer)
                  and not hasattr(c.stateful, "last_epoch") and not hasattr(c.stateful, "get_last_lr")}
    scheduled = {id(optimizer_of(c.stateful)) for c in components if hasattr(c.stateful, "get_last_lr")}
    for key, opt in optimizers.items():
        if id(opt) not in scheduled and any("initial_lr" in g for g in opt.param_groups):
            warnings.warn(f"component {key!r}: its optimizer is driven by an LR scheduler (its param "
                          "groups carry 'initial_lr') but no scheduler over it is registered; a resumed "
                          "run would restart the schedule. Register the scheduler as a component "
                          "(StateComponent('lr_scheduler', scheduler, <the optimizer's pattern>))",
                          UserWarning, stacklevel=3)
