import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))

# Fixtures of the corruption tests (checkpoints saved once per module, copied per test).
from corruption_support import saved, saved_zstd, templates  # noqa: E402,F401
# Real S3 servers on loopback (session-scoped; started on first use, stopped by PID), shipped in
# the package for third-party backends' tests too.
from async_ckpt.storage.testing.fixtures import any_s3, moto, seaweedfs  # noqa: E402,F401
