"""A Store lost at the instant a rank hands its staged state over: save() raises, and close()
returns at once instead of waiting for a save that never became a job.

Found by the torture's full run (torchrun-launcher trial 29, docs/reliability.md): node 0's
launcher died while rank 1 was inside save(); the ``job/1`` post failed after the save had
been recorded as pending, so save() raised but close() waited for it for ever. Here two ranks
(spawned, gloo; rank 0's process hosts the Store) save step 0; rank 1 stops its heartbeat,
SIGKILLs rank 0, breaks its own connection without the link noticing (the race of the torture
run, made certain: the hand-over's post is the first call to meet the dead Store) and saves
step 1.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import pytest

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(180)]
TIMEOUT_S = 8.0


def _rank(rank: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from async_ckpt import AsyncCheckpointer, CheckpointError, SharingPattern, StateComponent

    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    ckpt = AsyncCheckpointer(root, [StateComponent("model", model, SharingPattern.REPLICATED)],
                             timeout_s=TIMEOUT_S)
    ckpt.save(0).wait()
    if rank == 0:
        with open(f"{out}/pid-0", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)                                   # killed by rank 1
    while not os.path.exists(f"{out}/pid-0"):
        time.sleep(0.01)
    assert ckpt._heartbeat is not None
    ckpt._heartbeat.stop()
    ckpt._heartbeat._thread.join()
    os.kill(int(open(f"{out}/pid-0").read()), signal.SIGKILL)
    # Break this thread's connection behind the link's back (raw calls mark nothing lost): the
    # next call through the link, the hand-over's post in save(), is the first to fail.
    client = ckpt._link._client()
    for _ in range(500):
        try:
            client.set("probe", "1")
        except Exception:  # noqa: BLE001 - a broken pipe, as wanted
            break
        time.sleep(0.01)
    result: dict = {}
    start = time.monotonic()
    for what, call in (("save", lambda: ckpt.save(1)), ("close", ckpt.close)):
        try:
            call()
            result[what] = {"raised": None}
        except CheckpointError as exc:
            result[what] = {"raised": type(exc).__name__, "message": str(exc)}
        result[what]["seconds"] = time.monotonic() - start
    with open(f"{out}/result.json", "w") as f:
        json.dump(result, f)
    os._exit(0)                                           # a dead peer's group cannot be torn down


def test_a_store_lost_while_a_rank_hands_over_its_save_fails_save_and_close_at_once(tmp_path):
    from support.net import free_port
    ctx = mp.get_context("spawn")
    port, out = free_port(), tmp_path / "out"
    out.mkdir()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path / "ckpt"), str(out)), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 60
        while not (out / "result.json").exists():
            assert time.monotonic() < deadline, "rank 1 never reported (its close() blocked?)"
            assert procs[1].exitcode is None, f"rank 1 died (exit code {procs[1].exitcode})"
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    result = json.loads((out / "result.json").read_text())
    save, close = result["save"], result["close"]
    # The post of the hand-over is what failed (not the check at the top of save()).
    assert save["raised"] == "StoreLost" and "cannot save step" not in save["message"], result
    assert "rank 0's process at 127.0.0.1" in save["message"], result
    assert close["raised"] == "StoreLost" and close["seconds"] < 5, result
