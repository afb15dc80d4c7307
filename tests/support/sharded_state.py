"""The state of the checked-in SHARDED fixture (tests/fixtures/sharded_v2/), rebuilt from formulas
(no RNG), and the two gloo ranks that wrote it.

Two components, both SHARDED: ``model`` (an FSDP2-sharded nn.Sequential: every parameter
Shard(0) over 2 ranks, uneven where its rows are odd) and ``extra`` (a dict of DTensors made with
distribute_tensor: columns sharded, a bfloat16 vector sharded unevenly, a replicated tensor that is
written once, a plain tensor and plain values). `expected()` is what any load must give, as global
tensors; `plain_targets()` are one-process (non-distributed) components to load it into.

`write_fixture(root)` spawns the ranks (torch.multiprocessing, gloo on loopback) and saves step 1
raw and step 2 zstd; only tests/fixtures/make_fixtures.py calls it, once. `load_resharded(root,
step, out)` spawns 2 ranks that load a step into another layout (tensor parallel instead of
FSDP2, other placements) and write, per rank, whether every gathered tensor is bit-exact.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import torch

WORLD = 2


def model() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))


def expected_model() -> dict[str, torch.Tensor]:
    ramp = torch.arange(30, dtype=torch.float64)
    return {"0.weight": (ramp.reshape(5, 6) / 7 - 2).to(torch.float32),
            "0.bias": (ramp[:5] / 3).to(torch.float32),
            "2.weight": (ramp[:20].reshape(4, 5) / -9).to(torch.float32),
            "2.bias": (ramp[:4] - 1.5).to(torch.float32)}


def expected_extra() -> dict[str, Any]:
    ramp = torch.arange(24, dtype=torch.float64)
    return {"cols": ramp.reshape(4, 6) / 11,                          # Shard(1): 4x3 + 4x3
            "bf16": (ramp[:7] / 5).to(torch.bfloat16),                 # Shard(0): 4 + 3
            "repl": torch.arange(-3, 3, dtype=torch.int64) * 1000,    # Replicate: written once
            "plain": torch.arange(5, dtype=torch.int32),               # a plain tensor: the same
            "step": 42, "name": "sharded fixture"}


def expected() -> dict[str, dict[str, Any]]:
    return {"model": expected_model(), "extra": expected_extra()}


class Extra:
    """A stateful whose load replaces its state (as an optimizer's does)."""

    def __init__(self, state: dict[str, Any]):
        self.state, self.loads = state, 0

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state, self.loads = sd, self.loads + 1


def plain_targets() -> tuple[torch.nn.Sequential, Extra]:
    """A plain model and extra state of the fixture's global shapes, every tensor zero (so a
    load that leaves anything out shows)."""
    m = model()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    extra = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
             for k, v in expected_extra().items()}
    return m, Extra(extra)


def components(m: Any, extra: Any) -> list:
    import async_ckpt as ac
    return [ac.StateComponent("model", m, ac.SharingPattern.SHARDED),
            ac.StateComponent("extra", extra, ac.SharingPattern.SHARDED)]


def _init(rank: int, port: int) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _rank(rank: int, root: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import async_ckpt as ac
    _init(rank, port)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        m = model()
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(expected_model()[name])
        fully_shard(m[0], mesh=mesh)
        fully_shard(m[2], mesh=mesh)
        fully_shard(m, mesh=mesh)
        want = expected_extra()
        extra = Extra({"cols": distribute_tensor(want["cols"], mesh, [Shard(1)]),
                       "bf16": distribute_tensor(want["bf16"], mesh, [Shard(0)]),
                       "repl": distribute_tensor(want["repl"], mesh, [Replicate()]),
                       "plain": want["plain"], "step": want["step"], "name": want["name"]})
        for step, compression in ((1, None), (2, "zstd")):
            with ac.AsyncCheckpointer(root, components(m, extra), compression=compression,
                                      timeout_s=60) as ckpt:
                ckpt.save(step, metrics={"loss": 0.5 * step}).wait()
    finally:
        dist.destroy_process_group()


def _load_rank(rank: int, root: str, step: int, out: str, port: int) -> None:
    import json

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import async_ckpt as ac
    _init(rank, port)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        m, _ = plain_targets()
        parallelize_module(m, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        zeros = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in expected_extra().items()}
        extra = Extra({"cols": distribute_tensor(zeros["cols"], mesh, [Shard(0)]),
                       "bf16": distribute_tensor(zeros["bf16"], mesh, [Replicate()]),
                       "repl": distribute_tensor(zeros["repl"], mesh, [Shard(0)]),
                       "plain": zeros["plain"], "step": 0, "name": ""})
        ckpt = ac.AsyncCheckpointer(root, components(m, extra), timeout_s=60)
        loaded = ckpt.load(step).step
        got = {**{f"model/{k}": v for k, v in m.state_dict().items()},
               **{f"extra/{k}": v for k, v in extra.state.items()}}
        want = {**{f"model/{k}": v for k, v in expected_model().items()},
                **{f"extra/{k}": v for k, v in expected_extra().items()}}
        exact = {}
        for k, v in want.items():
            g = got[k].full_tensor() if isinstance(got[k], DTensor) else got[k]
            exact[k] = (g.dtype == v.dtype and g.shape == v.shape and bool(g.view(torch.uint8).equal(
                v.view(torch.uint8)))) if isinstance(v, torch.Tensor) else g == v
        sharded = [k for k, v in got.items() if isinstance(v, DTensor)]
        with open(os.path.join(out, f"r{rank}.json"), "w") as f:
            json.dump({"step": loaded, "exact": exact, "dtensors": sharded}, f)
        ckpt.close()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_fixture(root: str) -> None:
    import torch.multiprocessing as mp
    mp.spawn(_rank, args=(root, _free_port()), nprocs=WORLD, join=True)


def load_resharded(root: str, step: int, out: str) -> None:
    import torch.multiprocessing as mp
    mp.spawn(_load_rank, args=(root, step, out, _free_port()), nprocs=WORLD, join=True)
