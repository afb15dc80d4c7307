"""The one-command S3 launchers (storage/*.sh over `python -m async_ckpt.storage.testing.serve`)
start a server, print the endpoint and the environment to export, create the bucket asked for,
and stop the server by PID on SIGTERM or Ctrl-C."""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from async_ckpt import AsyncCheckpointer, StateComponent
from async_ckpt.storage.testing import servers
from support.compare import assert_same
from support.corruption import G, b_state
from support.stateful import Box

ROOT = Path(__file__).resolve().parent.parent


def _launch(cmd: list[str], tmp_path: Path) -> tuple[subprocess.Popen, dict, int]:
    """Start a launcher; return it, the variables it says to export, and its server's PID."""
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    seen, exports, deadline = [], {}, time.monotonic() + 120
    while "ASYNC_CKPT_S3_ENDPOINT" not in exports:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line is None:
            pytest.fail(f"{cmd} exited with {proc.wait()} before printing its exports:\n{''.join(seen)}")
        seen.append(line)
        if m := re.match(r"export (\w+)=(\S+)$", line.strip()):
            exports[m[1]] = m[2]
    pid = int(re.search(r"\(pid (\d+)", "".join(seen))[1])
    return proc, exports, pid


def _stop(proc: subprocess.Popen, sig: int, server_pid: int) -> None:
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while _alive(server_pid):
        assert time.monotonic() < deadline, f"the server (pid {server_pid}) outlived its launcher"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_moto_creates_the_bucket_and_stops_on_sigterm(tmp_path):
    proc, env, pid = _launch([sys.executable, "-m", "async_ckpt.storage.testing.serve", "moto",
                              "--bucket", "launched", "--bucket", "second"], tmp_path)
    try:
        endpoint = env["ASYNC_CKPT_S3_ENDPOINT"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", endpoint) and env["AWS_ENDPOINT_URL"] == endpoint
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (servers.KEY, servers.SECRET)
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
        names = {b["Name"] for b in servers.client(endpoint).list_buckets()["Buckets"]}
        assert names == {"launched", "second"}
    finally:
        if proc.poll() is None:
            _stop(proc, signal.SIGTERM, pid)


def test_storage_seaweedfs_sh_serves_s3_and_stops_on_ctrl_c(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc, env, pid = _launch(["bash", str(ROOT / "storage" / "seaweedfs.sh"), "--bucket", "ckpt",
                              "--dir", "work"], tmp_path)         # --dir relative to the caller
    try:
        assert [p.name.split("-")[0] for p in work.iterdir()] == ["seaweed"]
        saved = AsyncCheckpointer("s3://ckpt/run", [StateComponent("b", Box(b_state(3)), G)],
                                  storage_options={"endpoint_url": env["AWS_ENDPOINT_URL"],
                                                   "key": env["AWS_ACCESS_KEY_ID"],
                                                   "secret": env["AWS_SECRET_ACCESS_KEY"]})
        saved.save(3).wait()
        saved.close()
        back = Box(None)
        options = {"endpoint_url": env["ASYNC_CKPT_S3_ENDPOINT"], "key": servers.KEY,
                   "secret": servers.SECRET}
        assert AsyncCheckpointer("s3://ckpt/run", [StateComponent("b", back, G)],
                                 storage_options=options).load().step == 3
        assert_same(back.loaded, b_state(3))
    finally:
        if proc.poll() is None:
            _stop(proc, signal.SIGINT, pid)
    assert list(work.iterdir()) == [], "the server's data was left behind"


def test_from_environment_describes_an_external_server():
    assert servers.from_environment({}) is None
    ext = servers.from_environment({"ASYNC_CKPT_S3_ENDPOINT": "http://127.0.0.1:5304/",
                                    "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    assert ext.endpoint == "http://127.0.0.1:5304" and ext.pid is None
    assert ext.storage_options()["key"] == "k" and ext.environment()["ASYNC_CKPT_S3_ENDPOINT"] == ext.endpoint
    ext.stop()   # someone else's server: nothing to stop


def test_ceph_rgw_sh_is_valid_and_refuses_without_ceph(tmp_path):
    script = ROOT / "storage" / "ceph_rgw.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "127.0.0.1" in text and "0.0.0.0" not in text
    if shutil.which("ceph-mon") or shutil.which("radosgw"):
        pytest.skip("Ceph is installed here; the launcher is for the benchmark, not for CI")
    proc = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, CEPH_DIR=str(tmp_path / "ceph")))
    assert proc.returncode == 2 and "apt-get install" in proc.stderr
    assert not (tmp_path / "ceph").exists()
