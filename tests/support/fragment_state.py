"""The state of the checked-in fragments fixture (tests/fixtures/fragments_v3/), rebuilt from
formulas (no RNG), and the two gloo ranks -- two nodes of one rank each -- that wrote it.

A multi-node save is format_version 3: the root manifest and one fragment per node. The fixture
holds every kind of record a fragment carries and every kind the root keeps:

- ``model`` and ``extra``: the SHARDED components of tests/fixtures/sharded_v2 (support/
  sharded_state.py): chunks in the nodes' fragments, skeleton and global tensors in the root;
- ``opt``: PER_RANK, a different state per rank (`per_rank(rank)`): one copy per fragment;
- ``config``: GLOBAL and ``shared``: REPLICATED (support/fixture_state.expected_state): the root.

`write_fixture(root)` spawns the ranks and saves step 1 raw and step 2 zstd; only
tests/fixtures/make_fixtures.py calls it, once.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from . import sharded_state
from .fixture_state import expected_state

WORLD = 2


def per_rank(rank: int) -> dict[str, Any]:
    ramp = torch.arange(12, dtype=torch.float32)
    return {"exp_avg": ramp.reshape(3, 4) * (rank + 1) / 3, "count": torch.tensor(rank * 10 + 1),
            "rank": rank, "tag": f"rank {rank}"}


def global_state() -> dict[str, Any]:
    return {"lr": 0.125, "schedule": [1, 2, 3], "table": torch.arange(6, dtype=torch.int16)}


def components(model: Any, extra: Any, opt: Any, config: Any, shared: Any) -> list:
    import async_ckpt as ac
    return [*sharded_state.components(model, extra),
            ac.StateComponent("opt", opt, ac.SharingPattern.PER_RANK),
            ac.StateComponent("config", config, ac.SharingPattern.GLOBAL),
            ac.StateComponent("shared", shared, ac.SharingPattern.REPLICATED)]


def _rank(rank: int, root: str, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import async_ckpt as ac
    from .stateful import Holder
    # two nodes of one rank each (torchrun's GROUP_RANK tells nodes apart)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        m = sharded_state.model()
        with torch.no_grad():
            for name, p in m.named_parameters():
                p.copy_(sharded_state.expected_model()[name])
        for module in (m[0], m[2], m):
            fully_shard(module, mesh=mesh)
        want = sharded_state.expected_extra()
        extra = sharded_state.Extra({
            "cols": distribute_tensor(want["cols"], mesh, [Shard(1)]),
            "bf16": distribute_tensor(want["bf16"], mesh, [Shard(0)]),
            "repl": distribute_tensor(want["repl"], mesh, [Replicate()]),
            "plain": want["plain"], "step": want["step"], "name": want["name"]})
        comps = components(m, extra, Holder(per_rank(rank)), Holder(global_state()),
                           Holder(expected_state()))
        for step, compression in ((1, None), (2, "zstd")):
            with ac.AsyncCheckpointer(root, comps, compression=compression, timeout_s=60) as ckpt:
                ckpt.save(step, metrics={"loss": 0.5 * step}).wait()
    finally:
        dist.destroy_process_group()


def write_fixture(root: str) -> None:
    import torch.multiprocessing as mp
    mp.spawn(_rank, args=(root, sharded_state._free_port()), nprocs=WORLD, join=True)
