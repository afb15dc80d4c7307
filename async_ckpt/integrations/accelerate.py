"""Components from a Hugging Face Accelerate setup, and a one-call resume.

For a loop that keeps ``accelerator.prepare(...)``: `components()` registers the prepared model,
optimizer, LR scheduler, GradScaler, RNG and data position, each *unwrapped* (the model through
`ModelState`, so no ``module.`` prefix; the optimizer and scheduler inside Accelerate's wrappers),
with the data-parallel patterns (model, optimizer, scheduler REPLICATED; RNG and data PER_RANK)::

    accelerator = Accelerator(cpu=True)          # cpu=True on machines without GPUs (docs)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ckpt = ac.AsyncCheckpointer(root, components(accelerator, model=model, optimizer=optimizer,
                                                 lr_scheduler=scheduler, dataloader=loader,
                                                 generators={"loader": loader_gen}))
    step, batches = resume(ckpt, loader)         # 0 and a fresh iterator on a fresh start

The data position, and its guard rails:
- recommended: a ``StatefulDataLoader`` over ``ac.ResumableSampler`` (which shards by rank itself),
  *not* passed through ``prepare`` (move batches to ``accelerator.device`` yourself);
- a prepared loader gives a position only with ``DataLoaderConfiguration(use_stateful_dataloader
  =True)``; otherwise `components()` raises naming the component instead of Accelerate's
  ``AttributeError: ... 'dl_state_dict'`` at the first save;
- a ``ResumableSampler`` sharded by rank inside a prepared loader is sharded twice (each rank would
  see half its share): refused.

`check_launch` refuses the silent single-process fallback (torchrun/``accelerate launch`` started
several processes but the Accelerator sees one: on a CPU machine without ``cpu=True``).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from ..checkpointer import AsyncCheckpointer
from ..errors import InvalidArgumentError
from ..training.rng import RNGState
from ..training.sampler import ResumableSampler
from ..training.state import ModelState, OptimizerState, warn_unregistered_schedulers
from ..types import SharingPattern, StateComponent


def check_launch(accelerator: Any) -> None:
    """Raise when the launcher started several ranks (torch.distributed, or torchrun's WORLD_SIZE)
    but the Accelerator works as one process: each rank would train alone, unsynchronised."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes != world:
        raise InvalidArgumentError(
            f"the Accelerator sees {accelerator.num_processes} process(es) but the launcher started "
            f"{world} ranks ({accelerator.distributed_type}): each rank would train alone. On a "
            "machine without GPUs build Accelerator(cpu=True) and launch with torchrun or `accelerate "
            "launch --multi_gpu --num_processes N` (`accelerate launch --cpu` starts one process; "
            "docs/training.md, 'Accelerate launch')")


def _inner(obj: Any, *names: str) -> Any:
    for name in names:
        inner = getattr(obj, name, None)
        if inner is not None and type(obj).__module__.startswith("accelerate"):
            return inner
    return obj


def _resumable_samplers(loader: Any) -> list[ResumableSampler]:
    found, todo, seen = [], [loader], set()
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ResumableSampler):
            found.append(obj)
            continue
        todo += [getattr(obj, n, None) for n in ("sampler", "batch_sampler", "base_dataloader")]
    return found


def loader_position(loader: Any, key: str = "data") -> Any:
    """The Stateful holding `loader`'s position (the loader itself), after the guard rails."""
    prepared = type(loader).__module__.startswith("accelerate")
    if prepared and any(s.num_replicas > 1 for s in _resumable_samplers(loader)):
        raise InvalidArgumentError(
            f"component {key!r}: this loader was prepared by Accelerate, which shards its batches by "
            "process, and its ResumableSampler shards by rank too, so each rank would see half its "
            "share. Either build ResumableSampler(..., num_replicas=1, rank=0) for a prepared loader, "
            "or do not prepare a loader whose sampler shards by itself")
    if not callable(getattr(loader, "state_dict", None)):
        raise InvalidArgumentError(
            f"component {key!r}: {type(loader).__name__} cannot give its position (no state_dict); use "
            "torchdata's StatefulDataLoader over ac.ResumableSampler")
    try:
        loader.state_dict()
    except AttributeError as exc:
        raise InvalidArgumentError(
            f"component {key!r}: the prepared {type(loader).__name__} cannot give its position ({exc}). "
            "Build the Accelerator with dataloader_config=DataLoaderConfiguration("
            "use_stateful_dataloader=True) (needs torchdata), or keep the loader out of prepare(): a "
            "StatefulDataLoader over ac.ResumableSampler, batches moved to accelerator.device") from None
    if prepared:
        return _PreparedPosition(loader)
    return loader


class _PreparedPosition:
    """A prepared (stateful) loader's position: Accelerate's state (batches handed out in the
    current pass, replayed by fast-forwarding) plus its pass counter ``iteration``, which
    Accelerate hands to the sampler's ``set_epoch`` at every pass and does not save itself. A pass
    that was complete resumes at the start of the next one."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "iteration": int(getattr(self.loader, "iteration", 0))}

    def load_state_dict(self, state: dict) -> None:
        inner, iteration = dict(state["loader"]), int(state["iteration"])
        if inner.get("_iterator_finished") or inner.get("_num_yielded", 0) >= len(self.loader):
            iteration, inner = iteration + 1, {}
        self.loader.iteration = iteration
        if inner:
            self.loader.load_state_dict(inner)
            return
        # A fresh pass. Accelerate asked the StatefulDataLoader for its state when preparing it,
        # which made it create (and keep, for its next pass) an iterator whose sampler iterator
        # was created before set_epoch(iteration): drop it so the pass starts at the right epoch.
        base = getattr(self.loader, "base_dataloader", None)
        if base is not None and getattr(base, "_initial_iter_for_state_dict", False):
            base._iterator, base._initial_iter_for_state_dict = None, False   # torchdata 0.11


def components(accelerator: Any, *, model: Any, optimizer: Any = None, lr_scheduler: Any = None,
               dataloader: Any = None, generators: Mapping[str, Any] | None = None,
               extra: tuple[StateComponent, ...] = ()) -> list[StateComponent]:
    """The components of a data-parallel Accelerate run (see the module docstring)."""
    check_launch(accelerator)
    replicated = SharingPattern.REPLICATED
    out = [StateComponent("model", ModelState(model), replicated)]
    if optimizer is not None:
        out.append(StateComponent("optimizer", OptimizerState(model, optimizer), replicated))
    if lr_scheduler is not None:
        out.append(StateComponent("lr_scheduler", _inner(lr_scheduler, "scheduler"), replicated))
    if getattr(accelerator, "scaler", None) is not None:
        out.append(StateComponent("grad_scaler", accelerator.scaler, replicated))
    out.append(StateComponent("rng", RNGState(generators), SharingPattern.PER_RANK))
    if dataloader is not None:
        out.append(StateComponent("data", loader_position(dataloader), SharingPattern.PER_RANK))
    out += list(extra)
    if lr_scheduler is None:
        warn_unregistered_schedulers(out)
    return out


def forever(loader: Any) -> Iterator[Any]:
    """Batches across epochs (the loader and its sampler keep the position)."""
    while True:
        yield from loader


def resume(checkpointer: AsyncCheckpointer, dataloader: Any = None, step: int | None = None
           ) -> tuple[int, Iterator[Any] | None]:
    """Load `step` (default: the newest committed checkpoint) and return (the step to continue
    after, 0 on a fresh start; an endless iterator over `dataloader` from the restored position)."""
    info = checkpointer.load(step)
    return (0 if info is None else info.step), (forever(dataloader) if dataloader is not None else None)
