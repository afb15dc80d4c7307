"""ResumableSampler: a stateful, shuffling, distributed-aware sampler for map-style datasets.

Its state is (epoch, samples handed out in this epoch), and the order of every epoch is a pure
function of (seed, epoch, rank, world size). So a run restored mid-epoch hands out exactly the
indices the uninterrupted run would have, without replaying the epoch.

Where to register its state:
- ``torchdata.stateful_dataloader.StatefulDataLoader(ds, sampler=s, ...)``: register the *loader*
  (any ``num_workers``). It snapshots this sampler when each batch is dispatched to a worker, so
  the saved position is the one the training loop consumed, not the prefetched one.
- a plain ``torch.utils.data.DataLoader`` with ``num_workers=0``: register the sampler itself.
  (With workers a plain DataLoader prefetches, so the sampler runs ahead of the training loop;
  use StatefulDataLoader there.)
"""
from __future__ import annotations

import math
from typing import Iterator, Sized

import torch

from ..errors import InvalidArgumentError


def _check_int(name: str, value, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise InvalidArgumentError(f"ResumableSampler: {name} must be an integer >= {lo}, got {value!r}")
    return value


def _default_topology() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffles `dataset` (a Sized, or its length) anew each epoch and gives this rank its share.

    Like ``DistributedSampler``: every rank draws the same permutation (seeded with
    ``seed + epoch``), pads it by wrapping around (``drop_last=False``) or trims it
    (``drop_last=True``) to a multiple of ``num_replicas``, and takes every
    ``num_replicas``-th index starting at ``rank``. ``num_replicas``/``rank`` default to the
    initialised default process group (or 1/0).

    Epochs advance by themselves: iterating after an epoch was fully handed out starts the next
    one, so a step-based loop (``while True: for batch in loader: ...``) needs no bookkeeping.
    Epoch-based loops may call ``set_epoch(e)`` before each epoch as with DistributedSampler;
    calling it with the current epoch keeps a restored mid-epoch position.
    """

    def __init__(self, dataset: Sized | int, *, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        length = dataset if isinstance(dataset, int) and not isinstance(dataset, bool) else None
        if length is None:
            try:
                length = len(dataset)  # type: ignore[arg-type]
            except TypeError:
                raise InvalidArgumentError(
                    f"ResumableSampler needs a map-style dataset with len() or its length as an int, "
                    f"got {type(dataset).__name__}") from None
        self.length = _check_int("dataset length", length, 0)
        world, my_rank = _default_topology()
        self.num_replicas = _check_int("num_replicas", world if num_replicas is None else num_replicas, 1)
        self.rank = _check_int("rank", my_rank if rank is None else rank, 0)
        if self.rank >= self.num_replicas:
            raise InvalidArgumentError(f"ResumableSampler: rank {self.rank} must be < num_replicas "
                                       f"{self.num_replicas}")
        self.seed = _check_int("seed", seed, 0)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        if self.drop_last:
            self.num_samples = self.length // self.num_replicas
        else:
            self.num_samples = math.ceil(self.length / self.num_replicas) if self.length else 0
        self.epoch = 0
        self.yielded = 0          # indices of `epoch` already handed out on this rank
        self._token = 0           # only the newest iterator advances the position

    def __len__(self) -> int:
        return self.num_samples

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order (a pure function of the configuration)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.num_replicas
        if total > len(order) and order:         # pad by wrapping so every rank gets as many
            order += (order * math.ceil(total / len(order)))[:total - len(order)]
        return order[:total][self.rank::self.num_replicas]

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless it is already the current epoch (then a
        position restored by load_state_dict is kept)."""
        _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self.yielded = epoch, 0

    def __iter__(self) -> Iterator[int]:
        if self.num_samples and self.yielded >= self.num_samples:
            self.epoch, self.yielded = self.epoch + 1, 0     # last epoch fully handed out
        self._token += 1
        return self._iterate(self._token, self.epoch, self.yielded)

    def _iterate(self, token: int, epoch: int, start: int) -> Iterator[int]:
        for index in self.epoch_indices(epoch)[start:]:
            if token == self._token:
                self.yielded += 1
            yield index

    def state_dict(self) -> dict:
        """Position and configuration (the configuration is checked on load)."""
        return {"epoch": self.epoch, "yielded": self.yielded, "seed": self.seed,
                "length": self.length, "num_replicas": self.num_replicas, "rank": self.rank,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def check_state_dict(self, state: dict) -> None:
        """Refuse a state saved with another seed, dataset length, world size, rank or shuffling,
        since the same position would then name different samples. Called by the checkpointer
        before any component is restored, and by load_state_dict."""
        mine = self.state_dict()
        differs = {k: (state.get(k), mine[k]) for k in ("seed", "length", "num_replicas", "rank",
                                                         "shuffle", "drop_last") if state.get(k) != mine[k]}
        if differs:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differs.items())
            raise InvalidArgumentError(
                f"ResumableSampler: the saved position belongs to another configuration ({detail}); "
                "construct the sampler as in the saved run to resume it, or do not load its state "
                "to start a fresh order")

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (see check_state_dict for what is refused)."""
        self.check_state_dict(state)
        epoch, yielded = state["epoch"], state["yielded"]
        _check_int("saved epoch", epoch, 0)
        _check_int("saved position", yielded, 0)
        self.epoch, self.yielded = epoch, min(yielded, self.num_samples)
        self._token += 1      # iterators made before the load no longer move the position
