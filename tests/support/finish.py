"""How the pytest process itself ends: through `async_ckpt.end_process`, once pytest is done.

The pytest process runs a few gloo process groups in-process (world size 1: DTensor units,
bench.gpu's dry run, DCP's async save) and starts checkpointers' and DCP's threads. torch 2.13's
gloo threads race the interpreter's finalization (async_ckpt/dist/ending.py): once in a full run
here, every test passed and pytest then died with "terminate called without an active
exception" (exit status 134), which CI reads as a failure. So the last `pytest_unconfigure`
ends the process the way the library tells torchrun workers to: threading's exit hooks, the
``atexit`` handlers, then ``os._exit`` with pytest's own exit status. What a test checks about
exiting runs in a child process of its own (tests/test_exit_in_store.py).
"""
from __future__ import annotations

import pytest

_status: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if "code" not in _status:
        return                  # pytest never ran a session (usage error, --help): its own exit
    from async_ckpt import end_process
    config.get_terminal_writer().flush()
    end_process(_status["code"])
