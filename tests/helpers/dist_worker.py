"""One rank of a distributed test run, started by torchrun (see tests/support/dist.py).

Usage: dist_worker.py <scenario> <checkpoint root> <output dir> [args...]
Each rank writes its observations to ``<out>/<scenario>-r<rank>.json``; the tests assert on them.
The states are cheap deterministic functions of rank, node and group, so every rank knows what
it must get back.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from async_ckpt import (AsyncCheckpointer, CheckpointError, RNGState, SaveFailedError, SharingPattern,
                        StateComponent, ValidationLevel)
from support.stateful import Holder   # tests/ is on PYTHONPATH: support.paths.child_env()
from async_ckpt import end_process

SCENARIO, ROOT, OUT = sys.argv[1], sys.argv[2], Path(sys.argv[3])
COMPRESSION = os.environ.get("DIST_TEST_COMPRESSION") or None   # scenario_save's compression
ARGS = sys.argv[4:]


def setup():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ["LOCAL_WORLD_SIZE"])
    node = int(os.environ["GROUP_RANK"])
    # Disjoint groups across nodes, like pipeline stages with their data-parallel replicas.
    groups = {}
    for parity in (0, 1):
        ranks = [r for r in range(world) if r % 2 == parity]
        groups[parity] = dist.new_group(ranks)
    return rank, world, local_world, node, groups


def model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.register_buffer("scale16", torch.linspace(0, 1, 16, dtype=torch.bfloat16))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, opt


def train(model, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x = torch.randn(8, 32, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def digest(module_or_sd) -> str:
    sd = module_or_sd.state_dict() if hasattr(module_or_sd, "state_dict") else module_or_sd
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(sd.items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def draws() -> list:
    return [torch.rand(3).tolist(), random.random(), float(np.random.rand())]


def pattern_components(rank, node, local_rank, groups, zero: bool):
    model, opt = model_and_opt(seed=99 if zero else 0)
    parity = rank % 2
    group_min = min(r for r in range(dist.get_world_size()) if r % 2 == parity)

    def fill(value: float, n: int) -> torch.Tensor:
        return torch.full((n,), -1.0 if zero else value)
    holders = {
        "per_rank": Holder({"v": fill(rank, 5), "name": "x" if zero else f"rank{rank}"}),
        "global": Holder({"v": fill(rank, 3), "note": "x" if zero else f"from {rank}"}),
        "per_node": Holder({"v": fill(node * 10 + local_rank, 4)}),
        "per_group": Holder({"v": fill(100 + group_min, 2), "writer_probe": fill(rank, 1)}),
        "dynamic": Holder({"v": fill(rank, 2)}),
    }
    comps = [
        StateComponent("model", model, SharingPattern.REPLICATED, validation_level=ValidationLevel.TENSOR),
        StateComponent("optim", opt, SharingPattern.REPLICATED, validation_level=ValidationLevel.QUICK),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
        StateComponent("per_rank", holders["per_rank"], SharingPattern.PER_RANK),
        StateComponent("global", holders["global"], SharingPattern.GLOBAL),
        StateComponent("per_node", holders["per_node"], SharingPattern.PER_NODE),
        # These two hold rank-specific probes (who wrote the copy?), so their "replicas" differ on
        # purpose: they opt out of the replica check that REPLICATED and PER_GROUP get by default.
        StateComponent("per_group", holders["per_group"], SharingPattern.PER_GROUP,
                       process_group=groups[parity], validation_level=ValidationLevel.NONE),
        StateComponent("dynamic", holders["dynamic"], lambda: DYNAMIC[0],
                       validation_level=ValidationLevel.NONE),
    ]
    return model, opt, holders, comps


DYNAMIC = [SharingPattern.REPLICATED]     # what the dynamic component resolves to right now


def write(result: dict, rank: int) -> None:
    (OUT / f"{SCENARIO}-r{rank}.json").write_text(json.dumps(result))


def scenario_save(rank, world, local_world, node, groups):
    local_rank = rank % local_world
    model, opt, holders, comps = pattern_components(rank, node, local_rank, groups, zero=False)
    random.seed(1000 + rank)
    np.random.seed(2000 + rank)
    torch.manual_seed(3000 + rank)
    train(model, opt, 2)
    with AsyncCheckpointer(ROOT, comps, keep_last=5, timeout_s=60, compression=COMPRESSION) as ckpt:
        first = ckpt.save(1).wait()
        train(model, opt, 1)
        DYNAMIC[0] = SharingPattern.PER_RANK
        handle = ckpt.save(2)
        expected_draws = draws()
        info = handle.wait()
    write({"steps": [first.step, info.step], "model": digest(model), "draws": expected_draws,
           "blocking_s": info.timings["blocking_s"], "url": info.url}, rank)


def scenario_load(rank, world, local_world, node, groups):
    local_rank = rank % local_world
    model, opt, holders, comps = pattern_components(rank, node, local_rank, groups, zero=True)
    with AsyncCheckpointer(ROOT, comps, timeout_s=60) as ckpt:
        reads = []
        real_read_into = ckpt.storage.read_into

        def counting_read_into(path, offset, out):
            reads.append([path.rsplit("/", 1)[-1], offset, offset + len(out)])
            return real_read_into(path, offset, out)
        ckpt.storage.read_into = counting_read_into
        real_map_private = ckpt.storage.map_private   # local files are mapped, not read_into

        def counting_map_private(path, offset, length):
            reads.append([path.rsplit("/", 1)[-1], offset, offset + length])
            return real_map_private(path, offset, length)
        ckpt.storage.map_private = counting_map_private
        info = ckpt.load()
    write({"step": info.step, "model": digest(model), "draws": draws(), "reads": reads,
           "opt_steps": [int(s["step"]) for s in opt.state_dict()["state"].values()],
           **{k: {"v": h.state["v"].tolist(), **{n: x for n, x in h.state.items() if isinstance(x, str)}}
              for k, h in holders.items()}}, rank)


def scenario_resize(rank, world, local_world, node, groups):
    """Load a 4-rank checkpoint with 2 ranks: GLOBAL/REPLICATED work, PER_RANK refuses (strict)."""
    model, opt = model_and_opt(seed=99)
    glob = Holder({})
    per_rank = Holder({})
    ok = [StateComponent("model", model, SharingPattern.REPLICATED),
          StateComponent("optim", opt, SharingPattern.REPLICATED),
          StateComponent("global", glob, SharingPattern.GLOBAL)]
    with AsyncCheckpointer(ROOT, ok, timeout_s=60) as ckpt:
        info = ckpt.load()
    strict_error = None
    with AsyncCheckpointer(ROOT, ok + [StateComponent("per_rank", per_rank, SharingPattern.PER_RANK)],
                           timeout_s=60) as ckpt:
        try:
            ckpt.load()
        except CheckpointError as exc:
            strict_error = str(exc)
        lenient = ckpt.load(strict=False)
    write({"step": info.step, "model": digest(model), "global": glob.state["v"].tolist(),
           "strict_error": strict_error, "lenient_step": lenient.step}, rank)


def _failed_save(ckpt, step) -> dict:
    started = time.monotonic()
    try:
        ckpt.save(step).wait()
    except SaveFailedError as exc:
        return {"failed": True, "message": str(exc), "causes": {str(k): str(v) for k, v in exc.causes.items()},
                "cause_type": type(exc.__cause__).__name__, "seconds": time.monotonic() - started}
    except Exception as exc:  # noqa: BLE001 - the rank whose own save() raised sees its error
        return {"failed": True, "message": str(exc), "raised_in_save": True, "cause_type": type(exc).__name__,
                "causes": {}, "seconds": time.monotonic() - started}
    return {"failed": False, "seconds": time.monotonic() - started}


def scenario_replicas(rank, world, local_world, node, groups):
    """One rank's replica differs: the save fails everywhere at each level, the next one commits."""
    result = {}
    for level in ("tensor", "quick", "full"):
        model, opt = model_and_opt(seed=0)
        train(model, opt, 1)
        boom = {"on": False}

        def maybe_raise():
            if boom["on"] and rank == 2:
                raise RuntimeError("state_dict exploded on purpose")
        comps = [StateComponent("model", model, SharingPattern.REPLICATED,
                                validation_level=ValidationLevel(level)),
                 StateComponent("optim", opt, SharingPattern.REPLICATED,
                                validation_level=ValidationLevel(level)),
                 StateComponent("extra", Holder({"x": torch.zeros(2)}, maybe_raise), SharingPattern.PER_RANK)]
        with AsyncCheckpointer(f"{ROOT}/{level}", comps, timeout_s=60) as ckpt:
            weight = model[0].weight
            bf16 = model.scale16
            exp_avg = opt.state_dict()["state"][2]["exp_avg"]     # model[2].weight's moment
            originals = [t.clone() for t in (weight, bf16, exp_avg)]
            with torch.no_grad():
                if rank == 3:
                    weight[0, 0] += 0.5
                if rank == 1:
                    bf16[3] += 1
                    exp_avg[0, 0] += 0.25
            result[f"{level}_bad"] = _failed_save(ckpt, 10)
            with torch.no_grad():   # fix the replicas
                for t, original in zip((weight, bf16, exp_avg), originals):
                    t.copy_(original)
            result[f"{level}_fixed"] = _failed_save(ckpt, 11)
            if level == "tensor":
                boom["on"] = True
                result["raising_rank"] = _failed_save(ckpt, 12)
                boom["on"] = False
                result["after_raise"] = _failed_save(ckpt, 13)
            result[f"{level}_steps"] = [i.step for i in ckpt.list_checkpoints()]
    write(result, rank)


def scenario_kill(rank, world, local_world, node, groups):
    """Rank `victim` is SIGKILLed inside save(2); survivors must fail within the deadline."""
    victim, timeout = int(ARGS[0]), float(ARGS[1])

    def die():
        if rank == victim and dying["on"]:
            os.kill(os.getpid(), signal.SIGKILL)
    dying = {"on": False}
    big = Holder({"w": torch.randn(4 << 20)}, die)   # 16 MiB per rank
    comps = [StateComponent("big", big, SharingPattern.PER_RANK)]
    ckpt = AsyncCheckpointer(ROOT, comps, timeout_s=timeout)
    ckpt.save(1).wait()
    dying["on"] = True
    result = _failed_save(ckpt, 2)
    result["steps"] = [i.step for i in ckpt.list_checkpoints()]
    try:
        ckpt.close()
    except CheckpointError:
        pass
    write(result, rank)
    os._exit(0)   # the dead rank's process group cannot be torn down cleanly


def scenario_slow(rank, world, local_world, node, groups):
    """Node 1's writer takes far longer than timeout_s to write: alive and busy is not dead, so
    the save must commit on every rank."""
    timeout, delay = float(ARGS[0]), float(ARGS[1])
    comps = [StateComponent("big", Holder({"w": torch.full((1 << 16,), float(rank))}), SharingPattern.PER_RANK)]
    ckpt = AsyncCheckpointer(ROOT, comps, timeout_s=timeout)
    if rank == 2:           # node 1's writer: its data file or its node's data object
        real_open_writer, real_open_segmented = ckpt.storage.open_writer, ckpt.storage.open_segmented

        def slow_open_writer(path):
            time.sleep(delay)
            return real_open_writer(path)

        def slow_open_segmented(path, capacities):
            time.sleep(delay)
            return real_open_segmented(path, capacities)
        ckpt.storage.open_writer = slow_open_writer
        ckpt.storage.open_segmented = slow_open_segmented
    started = time.monotonic()
    result = _failed_save(ckpt, 1)
    result["steps"] = [i.step for i in ckpt.list_checkpoints()]
    result["seconds"] = time.monotonic() - started
    ckpt.close()
    write(result, rank)


def scenario_group_replicas(rank, world, local_world, node, groups):
    """PER_GROUP copies are validated within their group, and replicas are checked by default."""
    parity = rank % 2
    result = {}
    member = Holder({"w": torch.arange(8.0) + parity, "b": torch.ones(3)})
    shared = Holder({"w": torch.arange(16.0)})
    comps = [StateComponent("stage", member, SharingPattern.PER_GROUP, process_group=groups[parity],
                            validation_level=ValidationLevel.TENSOR),
             StateComponent("model", shared, SharingPattern.REPLICATED)]      # default: QUICK
    with AsyncCheckpointer(f"{ROOT}/groups", comps, timeout_s=60) as ckpt:
        if rank == 3:
            member.state["w"][5] += 1e-6                  # one member of group 1 drifted
        result["group_bad"] = _failed_save(ckpt, 1)
        if rank == 3:
            member.state["w"][5] -= 1e-6
            member.state["w"].copy_(torch.arange(8.0) + parity)
        if rank == 2:
            shared.state["w"][0] = 5.0                      # a REPLICATED replica differs
        result["default_bad"] = _failed_save(ckpt, 2)
        if rank == 2:
            shared.state["w"][0] = 0.0
        result["fixed"] = _failed_save(ckpt, 3)
        result["steps"] = [i.step for i in ckpt.list_checkpoints()]
    optout = [StateComponent("model", shared, SharingPattern.REPLICATED, validation_level=ValidationLevel.NONE)]
    with AsyncCheckpointer(f"{ROOT}/optout", optout, timeout_s=60) as ckpt:
        if rank == 2:
            shared.state["w"][0] = 5.0
        result["optout"] = _failed_save(ckpt, 1)
    write(result, rank)


def _outcome(fn) -> dict:
    started = time.monotonic()
    try:
        fn()
    except CheckpointError as exc:
        return {"failed": True, "type": type(exc).__name__, "message": str(exc),
                "seconds": time.monotonic() - started, "at": time.time()}
    return {"failed": False, "seconds": time.monotonic() - started, "at": time.time()}


def scenario_misuse(rank, world, local_world, node, groups):
    """Saving on one rank only (the usual "main process saves" habit), then the reverse: the
    waiting ranks name the rank that never called save() within seconds, not after timeout_s."""
    comps = [StateComponent("w", Holder({"w": torch.full((64,), float(rank))}), SharingPattern.PER_RANK)]
    result = {}
    with AsyncCheckpointer(f"{ROOT}/only0", comps) as ckpt:          # timeout_s: the default 600 s
        if rank == 0:
            ckpt.save(1)
            result["rank0_only"] = _outcome(lambda: ckpt.save(2))     # waits on save 1 (max_pending)
            (OUT / "rank0-done").write_text("1")
        else:
            while not (OUT / "rank0-done").exists():
                time.sleep(0.1)
    with AsyncCheckpointer(f"{ROOT}/all_but0", comps) as ckpt:
        if rank != 0:
            ckpt.save(1)
            result["all_but_rank0"] = _outcome(ckpt.wait)
            (OUT / f"rank{rank}-done").write_text("1")
        else:
            while not all((OUT / f"rank{r}-done").exists() for r in range(1, world)):
                time.sleep(0.1)
    write(result, rank)


def scenario_agent_kill(rank, world, local_world, node, groups):
    """The torchrun agent hosting the Store is SIGKILLed while the ranks save: every survivor's
    save()/wait()/close() raises, naming the Store's host, within the liveness bound."""
    timeout = float(ARGS[0])
    comps = [StateComponent("w", Holder({"w": torch.full((1 << 16,), float(rank))}), SharingPattern.PER_RANK)]
    ckpt = AsyncCheckpointer(ROOT, comps, timeout_s=timeout)
    ckpt.save(1).wait()
    (OUT / f"ready-r{rank}").write_text("1")
    while not (OUT / "killed").exists():
        time.sleep(0.05)
    killed_at = float((OUT / "killed").read_text())
    result = {"save": _outcome(lambda: ckpt.save(2).wait())}
    result["close"] = _outcome(ckpt.close)
    result["since_kill"] = time.time() - killed_at
    write(result, rank)
    os._exit(0)


class Versioned(Holder):
    def check_state_dict(self, state):
        if state.get("version") != 2:
            raise ValueError(f"saved by version {state.get('version')}")


def scenario_load_verdict(rank, world, local_world, node, groups):
    """One rank refuses its state at load: every rank raises, naming it, and none restored."""
    model, opt = model_and_opt(seed=0)
    comps = [StateComponent("model", model, SharingPattern.REPLICATED),
             StateComponent("meta", Versioned({"version": 1 if rank == 1 else 2}), SharingPattern.PER_RANK)]
    with AsyncCheckpointer(ROOT, comps, timeout_s=60) as ckpt:
        ckpt.save(1).wait()
    fresh, _ = model_and_opt(seed=99)
    before = digest(fresh)
    comps = [StateComponent("model", fresh, SharingPattern.REPLICATED),
             StateComponent("meta", Versioned({"version": 2}), SharingPattern.PER_RANK)]
    result = {}
    with AsyncCheckpointer(ROOT, comps, timeout_s=60) as ckpt:
        try:
            ckpt.load()
            result["raised"] = None
        except CheckpointError as exc:
            result["raised"], result["message"] = type(exc).__name__, str(exc)
    result["untouched"] = digest(fresh) == before
    write(result, rank)


def scenario_grow(rank, world, local_world, node, groups):
    """Saved by 2 ranks, loaded by 4 with strict=False: ranks 2-3 have no copy of a required
    PER_RANK component, so every rank raises and none restores (no silent stale replicas)."""
    model, opt = model_and_opt(seed=0)
    comps = [StateComponent("model", model, SharingPattern.REPLICATED),
             StateComponent("stage", Holder({"w": torch.full((4,), float(rank))}), SharingPattern.PER_RANK),
             StateComponent("rng", RNGState(), SharingPattern.PER_RANK, required=False)]
    if ARGS[0] == "save":
        with AsyncCheckpointer(ROOT, comps, timeout_s=60) as ckpt:
            ckpt.save(1).wait()
        write({"saved": True}, rank)
        return
    fresh, _ = model_and_opt(seed=99)
    before = digest(fresh)
    comps[0] = StateComponent("model", fresh, SharingPattern.REPLICATED)
    result = {}
    with AsyncCheckpointer(ROOT, comps, timeout_s=60) as ckpt:
        try:
            ckpt.load(strict=False)
            result["raised"] = None
        except CheckpointError as exc:
            result["raised"], result["message"] = type(exc).__name__, str(exc)
        optional_only = [comps[0], comps[2]]
    result["untouched"] = digest(fresh) == before
    with AsyncCheckpointer(ROOT, optional_only, timeout_s=60) as ckpt:
        result["optional_step"] = ckpt.load(strict=False).step      # rng: skipped where absent
    write(result, rank)


def scenario_delete(rank, world, local_world, node, groups):
    """Every rank deletes a committed step (only rank 0 acts, no collective), sees it gone when
    delete() returns, and the step is saved anew, as a divergence rollback does."""
    comps = [StateComponent("g", Holder({"w": torch.arange(64.0)}), SharingPattern.GLOBAL),
             StateComponent("r", Holder({"w": torch.full((64,), float(rank))}), SharingPattern.PER_RANK)]
    with AsyncCheckpointer(ROOT, comps, timeout_s=60) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step).wait()
        if rank == 0:
            time.sleep(1.0)        # the others must wait for rank 0, not race ahead
        ckpt.delete(2)
        gone = not (Path(ROOT) / "step-0000000002").exists()
        listed = [i.step for i in ckpt.list_checkpoints()]
        ckpt.save(2).wait()
        write({"gone": gone, "listed": listed, "after": [i.step for i in ckpt.list_checkpoints()]}, rank)


SCENARIOS = {"save": scenario_save, "load": scenario_load, "resize": scenario_resize,
             "replicas": scenario_replicas, "kill": scenario_kill, "slow": scenario_slow,
             "delete": scenario_delete, "group_replicas": scenario_group_replicas,
             "misuse": scenario_misuse, "agent_kill": scenario_agent_kill,
             "load_verdict": scenario_load_verdict, "grow": scenario_grow}


def run_plan(ctx, plan_path: str) -> None:
    """Scenario ``plan`` (support/dist.py's `run_plan`): several scenarios in one launch, one after
    the other, each as its own launch would run it (its root, its args) but writing its results
    as ``<out>/<label>-r<rank>.json``. A barrier separates them, so no rank starts the next
    scenario while another still runs the previous one. Only scenarios that leave every rank
    alive and its process group healthy belong in a plan (not kill, not agent_kill)."""
    global SCENARIO, ROOT, ARGS
    for step in json.loads(Path(plan_path).read_text()):
        SCENARIO, ROOT, ARGS = step["label"], step["root"], step["args"]
        SCENARIOS[step["scenario"]](*ctx)
        dist.barrier()


if __name__ == "__main__":
    ctx = setup()
    if SCENARIO == "plan":
        run_plan(ctx, ARGS[0])
    else:
        SCENARIOS[SCENARIO](*ctx)
    end_process()
