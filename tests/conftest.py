"""tests/ is on sys.path through pyproject.toml (`pythonpath`); shared code lives in support/."""
import pytest

# Plain asserts in support/ report their operands like asserts in the tests themselves.
pytest.register_assert_rewrite("support")

# Fixtures of the corruption tests (checkpoints saved once per module, copied per test).
pytest_plugins = ["support.corruption"]

# Real S3 servers on loopback (session-scoped; started on first use, stopped by PID), shipped in
# the package for third-party backends' tests too.
from async_ckpt.storage.testing.fixtures import any_s3, moto, seaweedfs  # noqa: E402,F401

S3_SERVERS = {"seaweedfs", "moto", "any_s3"}


@pytest.hookimpl(tryfirst=True)     # before `-m` selects by marker
def pytest_collection_modifyitems(items):
    """A test that asks for an S3 server is marked `s3`: by fixture (directly or through another
    fixture) or by the name a parametrized fixture requests (test_storage_conformance.py)."""
    for item in items:
        wanted = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            wanted |= {v for v in callspec.params.values() if isinstance(v, str)}
        if wanted & S3_SERVERS:
            item.add_marker(pytest.mark.s3)
