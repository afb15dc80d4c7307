"""Child process for tests/test_crash.py: saves a ~256 MiB state in a loop until it is SIGKILLed.

Protocol on stdout (one line each, flushed):
  ``loaded``             imports done and state allocated; now waiting for ``go`` on stdin
  ``ready <step>``       the checkpointer is open; the first step this child will save
  ``saving <step>``      save(step) is about to be called
  ``committed <step>``   handle.wait() returned for step
The child touches the checkpoint root only after reading ``go``, so the parent can start it
early (torch import time) while another child is still running.

The content of every step is a cheap deterministic function of the step (support/crash_state.py),
recomputed by the tests with `check_state`.
"""
from __future__ import annotations

import argparse
import sys
import time

# tests/ is on PYTHONPATH (support.paths.child_env())
from support.crash_state import COMPONENT, CrashState


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--compression", default=None)
    parser.add_argument("--keep-last", type=int, default=None)
    parser.add_argument("--idle", type=float, default=0.1, help="seconds to sleep after each commit")
    args = parser.parse_args()

    state = CrashState()
    print("loaded", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 3
    from async_ckpt import AsyncCheckpointer, SharingPattern, StateComponent

    ckpt = AsyncCheckpointer(args.root, [StateComponent(COMPONENT, state, SharingPattern.GLOBAL)],
                             compression=args.compression, keep_last=args.keep_last)
    latest = ckpt.latest_step()
    step = 0 if latest is None else latest + 1
    print(f"ready {step}", flush=True)
    while True:
        state.set_step(step)
        print(f"saving {step}", flush=True)
        ckpt.save(step).wait()
        print(f"committed {step}", flush=True)
        step += 1
        time.sleep(args.idle)


if __name__ == "__main__":
    sys.exit(main())
