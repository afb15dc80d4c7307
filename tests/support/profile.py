"""How much of the long suites a run does: one switch for all of them.

``ASYNC_CKPT_TESTS=ci`` (the default; what ``bash scripts/test.sh`` and CI run) runs a short but
meaningful version of each long suite: every property it checks is checked, on fewer kills,
fuzz cases or parametrisations. ``ASYNC_CKPT_TESTS=full`` runs the full versions (the torture's
CI profile with more kills, >= 10,000 fuzz cases with a random seed, every parametrisation):

    ASYNC_CKPT_TESTS=full bash scripts/test.sh

README.md ("Set up and run") and docs/reliability.md ("Test profiles") list what each profile
runs. The fuzzer's former switch, ``ASYNC_CKPT_FUZZ``, is refused with a pointer here rather
than silently ignored.
"""
from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

if "ASYNC_CKPT_FUZZ" in os.environ:
    raise ValueError("ASYNC_CKPT_FUZZ is gone: ASYNC_CKPT_TESTS=full runs the full fuzzer "
                     "(and every other long suite's full version)")
PROFILE = os.environ.get("ASYNC_CKPT_TESTS", "ci")
if PROFILE not in ("ci", "full"):
    raise ValueError(f"ASYNC_CKPT_TESTS={PROFILE!r}: use 'ci' (the default) or 'full'")
FULL = PROFILE == "full"


def pick(ci: T, full: T) -> T:
    """`full` under ASYNC_CKPT_TESTS=full, else `ci`."""
    return full if FULL else ci

