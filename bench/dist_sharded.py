"""One rank of the sharded case of `python -m bench.distributed` (started by torchrun; not meant
to be run by hand).

    dist_sharded.py save SIZE_GIB REPEATS FOLDER OUT
    dist_sharded.py load SIZE_GIB REPEATS FOLDER OUT

The state: an FSDP2 model (`fully_shard` of LAYERS bias-free square Linear layers on a 1-D mesh
over every rank) and its AdamW state (exp_avg, exp_avg_sq, step), SIZE_GIB in all: a third each
for the parameters and the two moments. Every tensor is a DTensor sharded on dim 0 but the
optimizer's ``step`` scalars (plain tensors, replicated).

``save`` (world 4 on two simulated nodes): as in dist_rank.py, every round runs in rotating order
this rank's memcpy floor (its local shards into touched preallocated buffers: the bytes it
stages), async_ckpt ``save()`` -> ``handle.wait()`` of the SHARDED components ``model`` and
``optim``, ``dcp.async_save`` -> future, and ``dcp.save`` with 2 writer threads, page cache
dropped before every timed write. The newest async_ckpt checkpoint and one ``dcp.save``
checkpoint of the same state are kept in FOLDER for the load phase, with the state's digest.

``load`` (world 2, one node): a fresh model and optimizer on a 2-rank mesh (live DTensors); every
round, in rotating order, ``AsyncCheckpointer.load()`` and ``dcp.load`` of those checkpoints
(resharding 4 -> 2), each cold (page cache dropped) and each into a state scrambled beforehand.
After every load the state's digest must equal the one taken at save, or the rank fails: the
numbers are for correct loads.

The digest hashes every global tensor in BLOCKS equal slabs along dim 0 (xxh3-128 of the bytes),
each rank the slabs of its own shard, merged over ranks: the same digest whatever the world size,
without gathering the state. Barriers and gathers are the benchmark's, not the library's.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import xxhash  # noqa: E402

from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent, end_process  # noqa: E402
from async_ckpt.dist.topology import current_topology  # noqa: E402
from bench.common import GIB, PageCache  # noqa: E402

LAYERS = 4
BLOCKS = 4          # digest slabs per tensor: shard boundaries at world 4, 2 and 1 fall on them


def layer_dim(size_gib: float) -> int:
    """Side of the square layers: LAYERS x (weight, exp_avg, exp_avg_sq) fp32 make size_gib."""
    d = (size_gib * GIB / (LAYERS * 3 * 4)) ** 0.5
    return max(64, int(round(d / 64)) * 64)


def build(size_gib: float, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The FSDP2 model (parameters allocated, not filled) and its AdamW, state initialised by
    one step with zero gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    d = layer_dim(size_gib)
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(LAYERS)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()
            p.grad = DTensor.from_local(torch.zeros_like(p.to_local()), p.device_mesh, p.placements,
                                        run_check=False, shape=p.shape, stride=p.stride())
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def fill(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int) -> None:
    """Deterministic random parameters, and AdamW moments from one step on random gradients."""
    from torch.distributed.tensor import DTensor
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            local = p.to_local()
            gen = torch.Generator().manual_seed(1000 * i + rank)
            torch.randn(local.shape, generator=gen, out=local)
            p.grad = DTensor.from_local(torch.randn(local.shape, generator=gen), p.device_mesh,
                                        p.placements, run_check=False, shape=p.shape, stride=p.stride())
    opt.step()
    opt.zero_grad(set_to_none=True)


def named_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Iterator[tuple[str, Any]]:
    for k, v in model.state_dict().items():
        yield f"model/{k}", v
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for k, v in sorted(state.items()):
            if isinstance(v, torch.Tensor):
                yield f"optim/{names[id(p)]}/{k}", v


def local_digest(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int) -> dict[str, str]:
    """This rank's slabs of every DTensor (and, on rank 0, every plain tensor) -> xxh3-128."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    def h(t: torch.Tensor) -> str:
        return xxhash.xxh3_128_hexdigest(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    out = {}
    for name, t in named_tensors(model, opt):
        if not isinstance(t, DTensor):
            if rank == 0:
                out[name] = h(t)
            continue
        sizes, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        rows = t.shape[0] // BLOCKS
        if rows * BLOCKS != t.shape[0] or offsets[0] % rows or sizes[0] % rows:
            raise SystemExit(f"{name}: shard {offsets[0]}+{sizes[0]} of {t.shape[0]} rows does not "
                             f"fall on the digest's {BLOCKS} slabs")
        local = t.to_local()
        for b in range(offsets[0] // rows, (offsets[0] + sizes[0]) // rows):
            out[f"{name}#{b}"] = h(local.narrow(0, b * rows - offsets[0], rows))
    return out


def digest(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, world: int) -> dict[str, str]:
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local_digest(model, opt, rank))
    merged: dict[str, str] = {}
    for p in parts:
        merged.update(p)
    return dict(sorted(merged.items()))


def scramble(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Overwrite the live state, so a load that fills nothing cannot pass the digest."""
    from torch.distributed.tensor import DTensor
    with torch.no_grad():
        for _, t in named_tensors(model, opt):
            (t.to_local() if isinstance(t, DTensor) else t).fill_(-1.0)


def local_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor
    return [t.to_local() if isinstance(t, DTensor) else t for _, t in named_tensors(model, opt)]


def components(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
    return [StateComponent("model", model, SharingPattern.SHARDED),
            StateComponent("optim", opt, SharingPattern.SHARDED)]


def run_save(size_gib: float, repeats: int, folder: str, rank: int, world: int, settle) -> dict:
    model, opt = build(size_gib, world)
    fill(model, opt, rank)
    mine = local_tensors(model, opt)
    dst = [torch.empty_like(t).copy_(t) for t in mine]
    peer_state = {"model": model, "optim": opt}        # DCP calls the Statefuls itself
    root = os.path.join(folder, "ack")
    ckpt = AsyncCheckpointer(root, components(model, opt), keep_last=1, timeout_s=600)
    rows: dict[str, list] = {"memcpy": [], "ack_blocking": [], "ack_commit": [], "ack_cpu": [],
                             "dcp_async_blocking": [], "dcp_async_commit": [], "dcp_save2": [],
                             "ack_node0_write": [], "ack_manifest_total": []}
    node_bytes: dict = {}
    keep_dcp = os.path.join(folder, "dcp")

    def run_memcpy(_: int) -> None:
        dist.barrier()
        t0 = time.perf_counter()
        for d, s in zip(dst, mine, strict=True):
            d.copy_(s)
        rows["memcpy"].append(time.perf_counter() - t0)

    def run_ack(i: int) -> None:
        settle()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        handle = ckpt.save(i)
        t1 = time.perf_counter()
        info = handle.wait()
        t2 = time.perf_counter()
        ckpt.wait()
        rows["ack_cpu"].append(time.process_time() - cpu0)
        rows["ack_blocking"].append(t1 - t0)
        rows["ack_commit"].append(t2 - t0)
        if rank == 0:
            with open(os.path.join(info.url, "manifest.json")) as f:
                doc = json.load(f)
            # node 0's writer (map the ranks' buffers, stream, hash, fsync) and save() to manifest
            rows["ack_node0_write"].append(doc["timings"]["write_s"])
            rows["ack_manifest_total"].append(doc["timings"]["total_s"])
            sizes: dict[str, int] = {}
            for name, entry in doc["files"].items():
                sizes[name[:11]] = sizes.get(name[:11], 0) + entry["size"]
            node_bytes.update(sizes)

    def run_dcp_async(i: int) -> None:
        path = os.path.join(folder, f"dcp-async-{i}")
        settle()
        t0 = time.perf_counter()
        fut = dcp.async_save(peer_state, checkpoint_id=path)
        t1 = time.perf_counter()
        fut.result()
        t2 = time.perf_counter()
        rows["dcp_async_blocking"].append(t1 - t0)
        rows["dcp_async_commit"].append(t2 - t0)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)

    def run_dcp_save(i: int) -> None:
        path = os.path.join(folder, f"dcp-save-{i}")
        settle()
        t0 = time.perf_counter()
        dcp.save(peer_state, storage_writer=dcp.FileSystemWriter(path, thread_count=2))
        rows["dcp_save2"].append(time.perf_counter() - t0)
        dist.barrier()
        if rank == 0:        # the newest one is the load phase's DCP checkpoint
            shutil.rmtree(keep_dcp, ignore_errors=True)
            os.replace(path, keep_dcp)

    run_ack(0)                      # first save allocates the staging buffers: not timed
    for key in ("ack_blocking", "ack_commit", "ack_cpu", "ack_node0_write", "ack_manifest_total"):
        rows[key].clear()
    methods = [run_memcpy, run_ack, run_dcp_async, run_dcp_save]
    for i in range(1, repeats + 1):
        shift = i % len(methods)
        for method in methods[shift:] + methods[:shift]:
            method(i)
    ckpt.close()
    state_digest = digest(model, opt, rank, world)
    return {"rows": rows, "node_bytes": node_bytes, "digest": state_digest,
            "staged_bytes": sum(t.numel() * t.element_size() for t in mine)}


def run_load(size_gib: float, repeats: int, folder: str, rank: int, world: int, settle) -> dict:
    with open(os.path.join(folder, "save.json")) as f:
        expected = json.load(f)["digest"]
    model, opt = build(size_gib, world)
    ckpt = AsyncCheckpointer(os.path.join(folder, "ack"), components(model, opt), timeout_s=600)
    rows: dict[str, list] = {"ack_load": [], "ack_load_cpu": [], "dcp_load": [], "dcp_load_cpu": []}
    checked = 0

    def check(method: str) -> None:
        nonlocal checked
        got = digest(model, opt, rank, world)
        if got != expected:
            wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            raise SystemExit(f"rank {rank}: {method} loaded a state whose digest differs from the "
                             f"saved one at {len(wrong)} slabs: {wrong[:4]}")
        checked += 1

    def timed(key: str, load) -> None:
        scramble(model, opt)
        settle()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        load()
        rows[key].append(time.perf_counter() - t0)
        rows[f"{key}_cpu"].append(time.process_time() - cpu0)
        check(key)

    def run_ack(_: int) -> None:
        def load() -> None:
            info = ckpt.load()
            if info is None:
                raise SystemExit(f"rank {rank}: async_ckpt found no checkpoint to load")
        timed("ack_load", load)

    def run_dcp(_: int) -> None:
        timed("dcp_load", lambda: dcp.load({"model": model, "optim": opt},
                                           checkpoint_id=os.path.join(folder, "dcp")))

    methods = [run_ack, run_dcp]
    for i in range(repeats):
        shift = i % len(methods)
        for method in methods[shift:] + methods[:shift]:
            method(i)
    ckpt.close()
    return {"rows": rows, "digests_checked": checked, "slabs": len(expected),
            "loaded_bytes": sum(t.numel() * t.element_size() for t in local_tensors(model, opt))}


def main() -> None:
    mode, size_gib, repeats, folder, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), \
        sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo")
    topo = current_topology()
    rank, world = topo.rank, topo.world_size
    cache = PageCache(rank == 0 and os.environ.get("BENCH_NO_DROP") != "1")

    def settle() -> None:
        dist.barrier()
        if rank == 0:
            cache.settle()
        dist.barrier()

    run = run_save if mode == "save" else run_load
    result = run(size_gib, repeats, folder, rank, world, settle)
    digest_of = result.pop("digest", None)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        doc = {"mode": mode, "world_size": world, "num_nodes": topo.num_nodes, "ranks": gathered,
               "page_cache": cache.describe(), "layers": LAYERS, "dim": layer_dim(size_gib)}
        if digest_of is not None:
            doc["digest"] = digest_of
        with open(out + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(out + ".tmp", out)
    end_process()       # not a plain return: torch's gloo exit race (async_ckpt/dist/ending.py)


if __name__ == "__main__":
    main()
