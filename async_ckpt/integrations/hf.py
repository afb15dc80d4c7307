"""AsyncCheckpointCallback: Hugging Face ``transformers.Trainer`` saving through async_ckpt.

The callback takes over the Trainer's save events: when the Trainer decides to save (its
``save_strategy``/``save_steps``), every rank calls ``AsyncCheckpointer.save`` instead of the
Trainer's synchronous ``checkpoint-N`` folder (the callback clears ``control.should_save``). Saved:
the model (REPLICATED, unwrapped keys), the optimizer and LR scheduler inside Accelerate's
wrappers (REPLICATED), Accelerate's GradScaler when mixed precision uses one, the RNG (PER_RANK)
and the ``TrainerState`` (GLOBAL, as its JSON). Evaluation metrics (``eval_loss``...) go to the
checkpoint of their step: with the save when the Trainer evaluates at a step it saves (the save
then waits for the eval so the saved RNG is the one after it, as the uninterrupted run continues),
or later through ``report_metrics``. Call sequence (every rank)::

    callback = AsyncCheckpointCallback(root, keep_last=2, keep_best=1, best_metric="eval_loss")
    trainer = transformers.Trainer(model, args, train_dataset=..., callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.resume(trainer))    # None on a fresh start

``resume(trainer)`` finds the newest committed checkpoint, restores the model and writes a small
resume folder (the Trainer's ``trainer_state.json`` and the weights) for the Trainer's own resume
logic, which restores its step and skips the batches already seen; the optimizer, scheduler and
scaler are restored from the checkpoint at ``on_train_begin`` (after the Trainer built them), the
RNG at the first epoch or step that the resumed run starts (after the Trainer re-created its data
iterator, which draws from the RNG). Needs ``pip install async_ckpt[hf]``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

from transformers import TrainerCallback

from ..checkpointer import AsyncCheckpointer
from ..training.rng import RNGState
from ..training.state import ModelState, OptimizerState
from ..types import SharingPattern, StateComponent


class _TrainerStateJSON:
    """The Trainer's TrainerState as a component (its own JSON, stored as a string)."""

    def __init__(self) -> None:
        self.state: Any = None
        self.loaded: str | None = None

    def state_dict(self) -> dict:
        if self.state is None:
            return {"json": ""}
        return {"json": json.dumps(dataclasses.asdict(self.state), sort_keys=True)}   # as save_to_json

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state["json"]


class _DeferredRNG:
    """RNGState whose load is applied later (`apply`), once the Trainer re-created its iterator."""

    def __init__(self) -> None:
        self.pending: Any = None

    def state_dict(self) -> dict:
        return RNGState().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pending = _owned(state)          # loaded tensors may be views of a read buffer

    def apply(self) -> None:
        if self.pending is not None:
            RNGState().load_state_dict(self.pending)
            self.pending = None


def _owned(obj: Any) -> Any:
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _owned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_owned(v) for v in obj)
    return obj


def _unwrapped(obj: Any, name: str) -> Any:
    inner = getattr(obj, name, None)
    return inner if inner is not None and type(obj).__module__.startswith("accelerate") else obj


class AsyncCheckpointCallback(TrainerCallback):
    """Saves, reports metrics and resumes a transformers Trainer through async_ckpt. Keywords go
    to AsyncCheckpointer (keep_last, keep_best, best_metric, compression, storage_options...)."""

    def __init__(self, root: str, **checkpointer_options: Any) -> None:
        self.root, self.options = str(root), checkpointer_options
        self.trainer_state = _TrainerStateJSON()
        self.rng = _DeferredRNG()
        self.objects: dict[str, Any] = {}
        self.checkpointer: AsyncCheckpointer | None = None
        self.trainer: Any = None
        self.resume_step: int | None = None
        self._rng_at_epoch = False
        self._saved: set[int] = set()
        self._deferred: int | None = None
        self._resume_folder: str | None = None

    # -- components ---------------------------------------------------------------------------------
    def components(self) -> list[StateComponent]:
        rep, out = SharingPattern.REPLICATED, []
        model = self.objects.get("model")
        out.append(StateComponent("model", ModelState(model), rep))
        if self.objects.get("optimizer") is not None:
            out.append(StateComponent("optimizer", OptimizerState(model, self.objects["optimizer"]), rep))
        if self.objects.get("lr_scheduler") is not None:
            out.append(StateComponent("lr_scheduler", _unwrapped(self.objects["lr_scheduler"], "scheduler"), rep))
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        if scaler is not None:
            out.append(StateComponent("grad_scaler", scaler, rep))
        out += [StateComponent("rng", self.rng, SharingPattern.PER_RANK),
                StateComponent("trainer_state", self.trainer_state, SharingPattern.GLOBAL)]
        return out

    def _open(self) -> AsyncCheckpointer:
        if self.checkpointer is None:
            self.checkpointer = AsyncCheckpointer(self.root, self.components, **self.options)
        return self.checkpointer

    # -- resume -------------------------------------------------------------------------------------
    def resume(self, trainer: Any, step: int | None = None) -> str | None:
        """Prepare a resume from `step` (default: the newest committed checkpoint) and return the
        folder to pass as ``trainer.train(resume_from_checkpoint=...)``; None when there is none."""
        self.trainer = trainer
        self.objects["model"] = trainer.model
        only = [StateComponent("model", ModelState(trainer.model), SharingPattern.REPLICATED),
                StateComponent("trainer_state", self.trainer_state, SharingPattern.GLOBAL)]
        with AsyncCheckpointer(self.root, only, **self.options) as peek:
            info = peek.load(step)
        if info is None:
            return None
        self.resume_step = info.step
        folder = tempfile.mkdtemp(prefix=f"async_ckpt-resume-{info.step}-")
        with open(os.path.join(folder, "trainer_state.json"), "w") as f:
            f.write(self.trainer_state.loaded or "{}")
        # every rank writes its own folder (save_pretrained writes on one rank only); tied weights once
        from safetensors.torch import save_model
        save_model(trainer.model, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        self._resume_folder = folder
        return folder

    # -- Trainer events -------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.objects.update(model=kw.get("model"), optimizer=kw.get("optimizer"),
                            lr_scheduler=kw.get("lr_scheduler"))
        self.trainer_state.state = state
        ckpt = self._open()
        if self.resume_step is not None:
            ckpt.load(self.resume_step)               # everything; the RNG waits (see _DeferredRNG)
            if self._resume_folder is not None:       # the Trainer has read it by now
                shutil.rmtree(self._resume_folder, ignore_errors=True)
                self._resume_folder = None
            self._saved.add(self.resume_step)
            loader = kw.get("train_dataloader")
            per_epoch = max(1, len(loader) // max(1, args.gradient_accumulation_steps)) if loader else 0
            self._rng_at_epoch = bool(per_epoch) and state.global_step % per_epoch == 0

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._rng_at_epoch:
            self.rng.apply()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.rng.apply()

    def _take_save(self, state: Any, control: Any) -> None:
        if not control.should_save:
            return
        control.should_save = False                   # the Trainer's own synchronous save
        if state.global_step in self._saved:
            return
        if control.should_evaluate:
            self._deferred = state.global_step        # after the eval (see the module docstring)
        else:
            self._save(state.global_step, None)

    def _save(self, step: int, metrics: Any) -> None:
        self._open().save(step, metrics=metrics)
        self._saved.add(step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.trainer_state.state = state
        self._take_save(state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._take_save(state, control)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any) -> None:
        values = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        if self._deferred == state.global_step:
            self._deferred = None
            self._save(state.global_step, values)
        elif state.global_step in self._saved and self.checkpointer is not None:
            self.checkpointer.report_metrics(state.global_step, values)   # late

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._deferred is not None:
            self._save(self._deferred, None)
            self._deferred = None
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None

