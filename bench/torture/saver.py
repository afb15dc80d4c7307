"""The saver of the single-process torture modes (local raw, local zstd, S3): saves a
deterministic state (`state.TortureState`) in a loop until it is SIGKILLed.

    python -m bench.torture.saver [ROOT] [--compression zstd] [--keep-last K] [--idle S] [--mib M]
                                         [--storage-options JSON]

Line protocol on stdout (one line each, flushed), as in the crash tests' saver:
  ``loaded``            imports done and state allocated; waiting for ``go [ROOT]`` on stdin
  ``ready <step>``      the checkpointer is open; the first step this process will save
  ``saving <step>``     save(step) is about to be called
  ``committed <step>``  handle.wait() returned for step: it is committed
  ``retained <step>``   then checkpointer.wait() returned: the sweep and retention after that
                        commit have run
  ``failed <step> <error>``  the save raised (the runner counts it as a failure)
The process touches the root only after reading ``go``, so the runner starts it early (torch's
import time) while another saver is still running; the root may come with ``go`` (the runner
switches to a fresh root after a failed trial).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .state import TortureState

COMPONENT = "state"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?")
    parser.add_argument("--compression", default=None)
    parser.add_argument("--keep-last", type=int, default=None)
    parser.add_argument("--idle", type=float, default=0.05, help="seconds to sleep after each commit")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--storage-options", default=None, help="JSON")
    args = parser.parse_args()

    state = TortureState(args.mib)
    print("loaded", flush=True)
    word, _, root = sys.stdin.readline().strip().partition(" ")
    if word != "go" or not (root or args.root):
        return 3
    from async_ckpt import AsyncCheckpointer, CheckpointError, SharingPattern, StateComponent

    options = json.loads(args.storage_options) if args.storage_options else None
    ckpt = AsyncCheckpointer(root or args.root, [StateComponent(COMPONENT, state, SharingPattern.GLOBAL)],
                             storage_options=options, compression=args.compression,
                             keep_last=args.keep_last)
    latest = ckpt.latest_step()
    step = 0 if latest is None else latest + 1
    print(f"ready {step}", flush=True)
    while True:
        state.set_step(step)
        print(f"saving {step}", flush=True)
        try:
            ckpt.save(step).wait()
        except CheckpointError as exc:
            print(f"failed {step} {type(exc).__name__}: {exc}".replace("\n", " | "), flush=True)
            return 4
        print(f"committed {step}", flush=True)
        ckpt.wait()
        print(f"retained {step}", flush=True)
        step += 1
        time.sleep(args.idle)


if __name__ == "__main__":
    sys.exit(main())
