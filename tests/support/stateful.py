"""Stateful doubles for StateComponent: what they save and what a load does to them.

    Box      keeps its state; remembers what load handed it (`loaded`, the last) and counts loads
    Holder   a load replaces its state, as torch.optim.Optimizer.load_state_dict does
    Copying  a load copies into its own tensors, as nn.Module.load_state_dict does; it keeps no
             reference to what it was handed

All three count loads in `loads`; `on_save`, if given, runs at every state_dict() (a test can make
saving fail or die there).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class Box:
    def __init__(self, state: Any = None, on_save: Callable[[], None] | None = None):
        self.state = state if state is not None else {"w": torch.arange(4.0)}
        self.on_save = on_save
        self.loaded: Any = None
        self.loads = 0

    def state_dict(self) -> Any:
        if self.on_save is not None:
            self.on_save()
        return self.state

    def load_state_dict(self, sd: Any) -> None:
        self.loaded = sd
        self.loads += 1


class Holder(Box):
    def load_state_dict(self, sd: Any) -> None:
        self.state = sd
        self.loads += 1


class Copying(Box):
    def load_state_dict(self, sd: dict) -> None:
        self.loads += 1
        for k, v in sd.items():
            self.state[k].copy_(v)
