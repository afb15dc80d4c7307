"""pytest fixtures over the loopback S3 servers of `servers.py`.

Each server starts on first use and serves the whole session, then is stopped by its PID. Load
them with ``pytest_plugins = ["async_ckpt.storage.testing.fixtures"]`` in a top-level conftest.py,
or import the fixture names into one (as this project's tests/conftest.py does).
"""
from __future__ import annotations

import pytest

from .servers import S3Server, start_moto, start_seaweed


@pytest.fixture(scope="session")
def seaweedfs():
    """SeaweedFS `weed mini` (real storage, SigV4 checked with the dummy test credentials)."""
    server: S3Server = start_seaweed()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto():
    """moto's server (AWS semantics; objects in memory: keep them small)."""
    server: S3Server = start_moto()
    yield server
    server.stop()


@pytest.fixture(params=["seaweedfs", "moto"])
def any_s3(request):
    """Each S3 server in turn (moto: keep objects small)."""
    return request.getfixturevalue(request.param)
