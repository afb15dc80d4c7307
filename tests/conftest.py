"""tests/ is on sys.path through pyproject.toml (`pythonpath`); shared code lives in support/."""
import pytest

# Plain asserts in support/ report their operands like asserts in the tests themselves.
pytest.register_assert_rewrite("support")

# Fixtures of the corruption tests (checkpoints saved once per module, copied per test; `guarded`
# of the hostile-folder tests), and the
# 4-rank checkpoint test_distributed.py and test_cli_dist.py read (launched once per session).
pytest_plugins = ["support.corruption", "support.dist", "support.hostile", "support.finish"]

# Real S3 servers on loopback (session-scoped; started on first use, stopped by PID), shipped in
# the package for third-party backends' tests too.
from async_ckpt.storage.testing.fixtures import any_s3, moto, seaweedfs  # noqa: E402,F401

S3_SERVERS = {"seaweedfs", "moto", "any_s3"}


@pytest.hookimpl(tryfirst=True)     # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    """A test that asks for an S3 server is marked `s3`: by fixture (directly or through another
    fixture) or by the name a parametrized fixture requests (test_storage_conformance.py)."""
    for item in items:
        wanted = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            wanted |= {v for v in callspec.params.values() if isinstance(v, str)}
        if wanted & S3_SERVERS:
            item.add_marker(pytest.mark.s3)
    # Long variants (marker `long`) run only in the full profile (support/profile.py); in the CI
    # profile they are deselected, not skipped: their property is checked by another test.
    from support.profile import FULL
    if not FULL:
        long = [item for item in items if item.get_closest_marker("long")]
        if long:
            config.hook.pytest_deselected(items=long)
            items[:] = [item for item in items if not item.get_closest_marker("long")]


# ASYNC_CKPT_TEST_TIMES=path: per test, wall seconds and CPU seconds (this process and every
# child process reaped meanwhile), as JSON. The CPU figure is what a test costs a shared machine,
# whatever else runs beside it (wall times on a loaded machine say little); docs/reliability.md.
_TIMES: dict[str, dict[str, float]] = {}


def _cpu() -> float:
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import os
    import time
    if not os.environ.get("ASYNC_CKPT_TEST_TIMES"):
        yield
        return
    wall, cpu = time.monotonic(), _cpu()
    yield
    _TIMES[item.nodeid] = {"wall_s": round(time.monotonic() - wall, 3), "cpu_s": round(_cpu() - cpu, 3)}


def pytest_sessionfinish(session):
    import json
    import os
    path = os.environ.get("ASYNC_CKPT_TEST_TIMES")
    if path and _TIMES:
        with open(path, "w") as f:
            json.dump({"wall_s": round(sum(t["wall_s"] for t in _TIMES.values()), 1),
                       "cpu_s": round(sum(t["cpu_s"] for t in _TIMES.values()), 1), "tests": _TIMES}, f, indent=1)
