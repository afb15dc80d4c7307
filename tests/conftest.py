"""tests/ is on sys.path through pyproject.toml (`pythonpath`); shared code lives in support/."""
import pytest

# Plain asserts in support/ report their operands like asserts in the tests themselves.
pytest.register_assert_rewrite("support")

# Fixtures of the corruption tests (checkpoints saved once per module, copied per test).
pytest_plugins = ["support.corruption"]

# Real S3 servers on loopback (session-scoped; started on first use, stopped by PID).
from s3_servers import any_s3, moto, seaweedfs  # noqa: E402,F401
