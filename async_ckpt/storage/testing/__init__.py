"""Test support for storage backends, shipped with the package as fsspec ships its abstract tests.

- `servers`: SeaweedFS and moto S3 servers started on 127.0.0.1 (free ports, readiness check,
  stopped by PID), and `from_environment()` for a server someone else started.
- `faults`: a fault-injecting TCP proxy (503 SlowDown, connection resets) in front of a server.
- `conformance`: `StorageConformance`, the suite every backend passes; a backend's test module
  subclasses it and provides a `storage` fixture (needs pytest).
- `fixtures`: pytest fixtures `seaweedfs`, `moto`, `any_s3` (one server per session); use
  ``pytest_plugins = ["async_ckpt.storage.testing.fixtures"]`` in a top-level conftest.py.
- `serve`: ``python -m async_ckpt.storage.testing.serve {seaweedfs,moto} [--bucket NAME]`` runs
  a server in the foreground and prints the environment to export (`storage/*.sh` wrap it).

Importing `async_ckpt.storage` never imports this package; this package imports pytest, botocore
and the server executables only in the modules and functions that need them.
"""
from .faults import FaultProxy
from .servers import (BUCKET, KEY, SECRET, S3Server, free_port, from_environment, start, start_moto,
                      start_seaweed)

__all__ = ["FaultProxy", "S3Server", "start", "start_seaweed", "start_moto", "from_environment",
           "free_port", "KEY", "SECRET", "BUCKET"]
