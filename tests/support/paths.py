"""The checkout's folders, and the environment of the tests' child processes.

A helper under tests/helpers/ runs as a script (python helpers/x.py, torchrun, spawn), so its
sys.path starts at helpers/. Every runner starts it with `child_env()`: PYTHONPATH then begins
with this checkout (async_ckpt, bench) and tests/ (support), and the helper imports
`from support.<module> import ...` exactly as the tests do.
"""
from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
HELPERS = TESTS / "helpers"
FIXTURES = TESTS / "fixtures"


def child_env(**extra: str) -> dict[str, str]:
    """os.environ updated with `extra`, with this checkout and tests/ first on PYTHONPATH."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(TESTS), env.get("PYTHONPATH", "")) if p)
    return env
