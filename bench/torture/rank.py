"""One rank of a torture torchrun launch (started by torchrun; not meant to be run by hand).

    rank.py OUT TIMEOUT_S KEEP_LAST MIB

The runner starts launches ahead of time; the ranks import, then wait for ``OUT/go``, a JSON
object with the checkpoint root and the phase: "loop" (verify, then save steps until killed or
a save raises) or "final" (verify, save one step, close cleanly).

Two components: "shared" (REPLICATED, identical on every rank) and "mine" (PER_RANK, salted with
the rank), both `state.TortureState` of MIB MiB. Files under OUT (the runner reads them):
``pid-r<rank>`` at start; ``loaded-r<rank>`` once imports are done; ``verify-r<rank>.json``: every
listed step loaded and compared bit for bit by this rank (its own PER_RANK share included);
``events-r<rank>.log``: ``saving``, ``committed`` (handle.wait() returned) and ``retained``
(checkpointer.wait() returned: on rank 0 the sweep and retention have run) ``<step> <time>``;
``raised-r<rank>.json`` when save()/wait() raised: when, what, and what close() did then.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    out = sys.argv[1]
    timeout, keep_last, mib = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rank = int(os.environ["RANK"])
    _write(f"{out}/pid-r{rank}", str(os.getpid()))

    import torch.distributed as dist

    from async_ckpt import AsyncCheckpointer, CheckpointError, SharingPattern, StateComponent, end_process
    from bench.torture.state import TortureState, check_state

    shared, mine = TortureState(mib), TortureState(mib, salt=1 + rank)
    _write(f"{out}/loaded-r{rank}", "1")
    deadline, agent = time.monotonic() + 900, os.getppid()
    while not os.path.exists(f"{out}/go"):
        if time.monotonic() > deadline or os.getppid() != agent:   # never started, or abandoned
            sys.exit(3)
        time.sleep(0.02)
    with open(f"{out}/go") as f:
        go = json.load(f)
    root, phase = go["root"], go["phase"]
    dist.init_process_group("gloo")
    comps = [StateComponent("shared", shared, SharingPattern.REPLICATED),
             StateComponent("mine", mine, SharingPattern.PER_RANK)]
    events = os.open(f"{out}/events-r{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def event(text: str) -> None:
        os.write(events, f"{text} {time.time():.6f}\n".encode())

    ckpt = AsyncCheckpointer(root, comps, keep_last=keep_last, timeout_s=timeout)
    problems, listed, newest = [], [], None
    try:
        listed = [i.step for i in ckpt.list_checkpoints()]
        info = ckpt.load()
        newest = info.step if info is not None else None
        for step in ([newest] if newest is not None else []) + listed[:-1]:
            if step != newest:
                ckpt.load(step=step)
            for name, st in (("shared", shared), ("mine", mine)):
                wrong = check_state(st.loaded, step, mib, st.salt) if st.loaded is not None else ["not restored"]
                if wrong:
                    problems.append(f"rank {rank}: step {step} component {name!r}: {wrong}")
                st.loaded = None
    except Exception as exc:  # noqa: BLE001 - any load failure is a finding
        problems.append(f"rank {rank}: loading raised {type(exc).__name__}: {exc}")
    _write(f"{out}/verify-r{rank}.json", json.dumps({"listed": listed, "newest": newest, "problems": problems}))

    step = 0 if newest is None else newest + 1
    while True:
        shared.set_step(step)
        mine.set_step(step)
        event(f"saving {step}")
        try:
            ckpt.save(step).wait()
        except BaseException as exc:  # noqa: BLE001 - recorded; the runner judges it
            at = time.time()
            record = {"at": at, "type": type(exc).__name__, "message": str(exc), "step": step,
                      "checkpoint_error": isinstance(exc, CheckpointError)}
            if not isinstance(exc, CheckpointError):
                record["traceback"] = traceback.format_exc()
            try:
                ckpt.close()
                record["close"] = "returned"
            except BaseException as close_exc:  # noqa: BLE001
                record["close"] = f"{type(close_exc).__name__}: {close_exc}"
            record["closed_at"] = time.time()
            _write(f"{out}/raised-r{rank}.json", json.dumps(record))
            os._exit(0)      # a dead peer's process group cannot be torn down cleanly
        event(f"committed {step}")
        ckpt.wait()
        event(f"retained {step}")
        if phase == "final":
            ckpt.close()
            event("closed -1")
            end_process()    # torch's gloo exit race (async_ckpt/dist/ending.py)
        step += 1
        time.sleep(0.05)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
