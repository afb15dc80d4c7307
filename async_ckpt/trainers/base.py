"""Trainer: the training loop every trainer shares, and SimpleTrainer (one process, all GLOBAL).

A trainer owns the loop around a user's model, map-style dataset of ``(inputs, target)`` pairs,
``loss_fn(output, target)`` and ``optimizer_factory(params)``: it builds the optimizer, the LR
scheduler, the data loader (a `ResumableSampler` in a ``StatefulDataLoader`` with its own
generator), registers everything a bit-exact resume needs through ``get_state_components()``,
resumes, saves on the schedule, evaluates late, watches for divergence and saves on preemption.

Call sequence (every rank, on its training thread)::

    trainer = SomeTrainer(args, model, dataset, loss_fn, optimizer_factory, ...)
    result = trainer.train()        # resume -> loop(step: batch, train_step, on_step_end,
                                    #   divergence, save/eval) -> close the checkpointer

Subclasses choose the sharing patterns (`patterns`), wrap the model (`prepare_model`), build the
loader (`make_loader`) and run one step (`train_step`); users extend `get_state_components()`.
"""
from __future__ import annotations

import logging
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

from ..checkpointer import AsyncCheckpointer
from ..training.detectors import EMADetector
from ..training.divergence import DivergenceEvent, DivergenceMonitor
from ..training.rng import RNGState
from ..training.sampler import ResumableSampler
from ..training.schedule import TrainingSchedule
from ..training.state import ModelState, OptimizerState, warn_unregistered_schedulers
from ..types import SharingPattern, StateComponent
from .arguments import TrainingArguments
from .progress import Progress, make_loader

log = logging.getLogger("async_ckpt")
SIGNALS = ("SIGTERM", "SIGUSR1")


@dataclass(frozen=True)
class TrainResult:
    """How `train()` ended: the last step done, whether a signal stopped it (after saving that
    step), and the divergence event that ended it, if one did."""

    step: int
    preempted: bool = False
    diverged: DivergenceEvent | None = None


def forever(loader: Any) -> Iterator[Any]:
    """Batches across epochs; the sampler/loader keep the position, not this generator."""
    while True:
        yield from loader


class Trainer:
    """The loop and its checkpointing. Subclasses set `patterns` (model, optimizer, data)."""

    patterns: Mapping[str, SharingPattern] = {"model": SharingPattern.GLOBAL,
                                              "optimizer": SharingPattern.GLOBAL,
                                              "data": SharingPattern.GLOBAL}

    def __init__(self, args: TrainingArguments, model: torch.nn.Module, dataset: Any,
                 loss_fn: Callable[[Any, Any], torch.Tensor],
                 optimizer_factory: Callable[[Any], torch.optim.Optimizer], *,
                 lr_scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None,
                 grad_scaler: Any = None, eval_fn: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
                 collate_fn: Callable | None = None) -> None:
        self.args, self.loss_fn, self.eval_fn, self.grad_scaler = args, loss_fn, eval_fn, grad_scaler
        self.world, self.rank = _topology()
        torch.manual_seed(args.seed + self.rank)          # dropout etc.: one stream per rank
        random.seed(args.seed + self.rank)
        _seed_numpy(args.seed + self.rank)
        self.module = model                               # unwrapped: what is saved and evaluated
        self.model = self.prepare_model(model)
        self.optimizer = optimizer_factory(self.trainable_parameters())
        self.lr_scheduler = lr_scheduler_factory(self.optimizer) if lr_scheduler_factory else None
        self.loader_generator = torch.Generator().manual_seed(args.seed + 7919 * self.rank)
        self.loader, self.data_state = self.make_loader(dataset, collate_fn)
        self.progress = Progress()
        self.schedule = TrainingSchedule(save_every=self._save_every(), eval_every=args.eval_steps,
                                         eval_on_save=args.eval_on_save)
        self.checkpointer = AsyncCheckpointer(args.output_dir, self.get_state_components,
                                              **args.checkpointer_keywords())
        self.monitor = None
        if args.divergence_action is not None:
            short, long = args.divergence_spans
            self.monitor = DivergenceMonitor(EMADetector(short, long, threshold=args.divergence_threshold),
                                             args.divergence_action, checkpointer=self.checkpointer)
        warn_unregistered_schedulers(self.get_state_components())

    # -- what subclasses change -------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loop calls (DDP wraps it); `self.module` stays the unwrapped one."""
        return model

    def trainable_parameters(self) -> Any:
        return self.module.parameters()

    def make_loader(self, dataset: Any, collate_fn: Callable | None) -> tuple[Any, Any]:
        """(the loader to iterate, the Stateful that holds its position)."""
        sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=self.args.seed)
        return make_loader(dataset, sampler, self.args, self.loader_generator, collate_fn)

    def next_batch(self, batches: Iterator[Any]) -> Any:
        return next(batches)

    def train_step(self, batch: Any) -> torch.Tensor:
        """One optimisation step on `batch`; returns the loss (the same value on every rank
        is up to the subclass: see `reduce_loss`)."""
        inputs, target = batch
        loss = self.loss_fn(self.model(inputs), target)
        self.optimizer.zero_grad()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return loss.detach()

    def reduce_loss(self, loss: torch.Tensor) -> float:
        """The loss every rank agrees on (divergence decisions must be the same everywhere)."""
        return float(loss)

    def on_step_end(self, step: int, loss: float) -> None:
        """Called after every step on every rank (logging, tests)."""

    def get_state_components(self) -> list[StateComponent]:
        """Everything a bit-exact resume needs. Extend it (call super()) to add your own state."""
        p = self.patterns
        group = self.component_groups()
        comps = [StateComponent("model", ModelState(self.module), p["model"], group.get("model"),
                                validation_level=self._validation(p["model"])),
                 StateComponent("optimizer", OptimizerState(self.module, self.optimizer), p["optimizer"],
                                group.get("optimizer"), validation_level=self._validation(p["optimizer"]))]
        if self.lr_scheduler is not None:
            comps.append(StateComponent("lr_scheduler", self.lr_scheduler, p["optimizer"], group.get("optimizer")))
        if self.grad_scaler is not None:
            comps.append(StateComponent("grad_scaler", self.grad_scaler, p["optimizer"], group.get("optimizer")))
        comps += [StateComponent("rng", RNGState({"loader": self.loader_generator}), SharingPattern.PER_RANK),
                  StateComponent("data", self.data_state, p["data"], group.get("data")),
                  StateComponent("progress", self.progress, SharingPattern.GLOBAL),
                  StateComponent("schedule", self.schedule, SharingPattern.GLOBAL)]
        if self.monitor is not None:
            comps.append(StateComponent("divergence", self.monitor, SharingPattern.GLOBAL))
        return comps

    def component_groups(self) -> dict[str, Any]:
        """Process groups of PER_GROUP components, by role (model, optimizer, data)."""
        return {}

    def agree(self, flags: list[bool]) -> list[bool]:
        """Flags OR-ed over every rank (one tiny all-reduce when distributed)."""
        return flags

    # -- the loop ---------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load as `args.resume_from_checkpoint` says; returns the step to continue after."""
        args = self.args
        if args.resume_from_checkpoint is False:
            return 0
        if args.resume_root is not None:
            with AsyncCheckpointer(args.resume_root, self.get_state_components,
                                   storage_options=dict(args.storage_options or {}) or None) as source:
                info = source.load()
        else:
            info = self.checkpointer.load(args.resume_step)
        if info is None:
            return 0
        log.info("[rank %d] resumed from step %d (%s)", self.rank, info.step, info.url)
        evaluated = args.eval_on_save or (self.schedule.eval is not None and self.schedule.eval.last_step == info.step)
        if (self.eval_fn is not None and args.best_metric and args.resume_root is None and evaluated
                and args.best_metric not in info.metrics):
            self.checkpointer.report_metrics(info.step, self.evaluate())   # lost in the crash
        return info.step

    def evaluate(self) -> dict[str, float]:
        """`eval_fn` on the unwrapped model, in eval mode, without gradients, and RNG-neutral: the
        generators are put back afterwards, so training draws the same numbers whether or not an
        evaluation ran (a resumed run evaluates only a checkpoint whose metric was lost)."""
        assert self.eval_fn is not None
        self.model.eval()
        saved = RNGState().state_dict()
        try:
            with torch.no_grad():
                return {k: float(v) for k, v in self.eval_fn(self.module).items()}
        finally:
            RNGState().load_state_dict(saved)
            self.model.train()

    def train(self) -> TrainResult:
        """Resume, train to `max_steps`, close the checkpointer. Returns how it ended."""
        stop = _SignalFlag(self.args.handle_signals)
        try:
            return self._loop(stop)
        finally:
            stop.restore()
            self.checkpointer.close()

    def _loop(self, stop: "_SignalFlag") -> TrainResult:
        step = self.progress.step = self.resume()
        batches = forever(self.loader)
        last_save = time.monotonic()
        while step < self.args.max_steps:
            step += 1
            loss = self.reduce_loss(self.train_step(self.next_batch(batches)))
            self.progress.step = step
            self.on_step_end(step, loss)
            if self.monitor is not None and (event := self.monitor.update(step, loss)) is not None:
                if event.action == "rollback" and event.restored is not None:
                    step = self.progress.step = event.restored.step
                    batches = forever(self.loader)
                    continue
                if event.save:
                    self.checkpointer.save(step)
                return TrainResult(step, diverged=event)
            due = self.schedule.due(step)
            timed = self.args.save_strategy == "seconds" and time.monotonic() - last_save >= self.args.save_steps
            timed, signalled = self.agree([timed, stop.raised])
            evaluate = due.eval or (timed and self.args.eval_on_save)
            if due.save or timed or signalled:
                self.checkpointer.save(step)
                last_save = time.monotonic()
                if signalled:
                    log.warning("[rank %d] %s: saved step %d, stopping", self.rank, stop.name, step)
                    return TrainResult(step, preempted=True)
                if evaluate:
                    self.checkpointer.report_metrics(step, self.evaluate())   # late: the save runs
            elif evaluate:
                log.info("[rank %d] step %d eval %s", self.rank, step, self.evaluate())
        return TrainResult(step)

    def _save_every(self) -> int:
        if self.args.save_strategy == "epochs":
            return self.args.save_steps * max(1, len(self.loader))
        if self.args.save_strategy == "steps":
            return self.args.save_steps
        return self.args.max_steps + 1          # "seconds" and "no": the schedule never saves

    def _validation(self, pattern: SharingPattern) -> Any:
        return self.args.validation if pattern in (SharingPattern.REPLICATED, SharingPattern.PER_GROUP) else None


class SimpleTrainer(Trainer):
    """One process: model, optimizer and data all GLOBAL."""


class _SignalFlag:
    """Records SIGTERM/SIGUSR1 (preemption) instead of dying; the loop saves and stops at the
    end of the step. Handlers are installed only on the main thread and restored afterwards."""

    def __init__(self, enabled: bool) -> None:
        self.raised, self.name, self.previous = False, "", {}
        if not enabled:
            return
        try:
            for name in SIGNALS:
                sig = getattr(signal, name)
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:           # not the main thread: leave signals alone
            self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised, self.name = True, signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _topology() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _seed_numpy(seed: int) -> None:
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed)
