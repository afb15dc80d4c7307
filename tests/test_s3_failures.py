"""S3 failures: wrong configuration gives a clear error in bounded time; transient faults are
retried within a bounded total time; a server that ignores If-None-Match is refused; a saver
killed with SIGKILL mid-upload leaves nothing listed and, after the next run's save, no dangling
multipart upload. All against real servers (SeaweedFS with SigV4 identities, a real TCP proxy for
faults, a real child process and a real kill -9)."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from async_ckpt import (AsyncCheckpointer, CheckpointError, InvalidArgumentError, SaveFailedError,
                        StateComponent, StorageConfigError, StorageUnavailableError)
from async_ckpt.storage import open_storage
from async_ckpt.storage.testing.faults import FaultProxy
from support.compare import assert_same
from support.corruption import G, b_state
from support.crash_state import COMPONENT, CrashState, check_state
from support.net import free_port
from support.paths import HELPERS, child_env
from support.stateful import Box
from support.s3 import Remote

HELPER = HELPERS / "crash_saver.py"


def construct(url: str, options: dict) -> tuple[BaseException, float]:
    start = time.monotonic()
    with pytest.raises(StorageConfigError) as info:
        AsyncCheckpointer(url, [StateComponent("b", Box(b_state(1)), G)], storage_options=options)
    err = info.value
    assert isinstance(err, InvalidArgumentError) and isinstance(err, CheckpointError)
    assert url in str(err)
    assert options["secret"] not in str(err), "a credential leaked into the message"
    return err, time.monotonic() - start


# -- configuration errors, at the constructor ------------------------------------------------------
def test_unreachable_endpoint(seaweedfs):
    dead = f"http://127.0.0.1:{free_port()}"
    err, took = construct("s3://ckpt-tests/run", {**seaweedfs.storage_options(), "endpoint_url": dead})
    assert "cannot reach" in str(err) and dead in str(err) and "endpoint_url" in str(err)
    assert took < 20, f"took {took:.1f} s"


def test_missing_bucket(any_s3):
    err, took = construct("s3://no-such-bucket-here/run", any_s3.storage_options())
    assert "'no-such-bucket-here'" in str(err) and "does not exist" in str(err) and "create it" in str(err)
    assert took < 5


def test_wrong_credentials(seaweedfs):
    root = seaweedfs.fresh_root()
    err, took = construct(root, seaweedfs.storage_options(secret="not-the-secret"))
    assert "credentials" in str(err) and "SignatureDoesNotMatch" in str(err)
    assert "not-the-secret" not in str(err)
    err, _ = construct(root, seaweedfs.storage_options(key="nobody", secret="no-such-secret-42"))
    assert "credentials" in str(err)
    assert took < 5


def test_server_that_ignores_if_none_match_is_refused(seaweedfs):
    remote = Remote(seaweedfs)
    ck = AsyncCheckpointer(remote.url, [StateComponent("b", Box(b_state(1)), G)],
                           storage_options=remote.options())
    real_call = ck.storage.call

    def without_condition(method, path, **kwargs):   # the request reaches the server unconditional
        kwargs.pop("IfNoneMatch", None)
        return real_call(method, path, **kwargs)
    ck.storage.call = without_condition
    with pytest.raises(StorageConfigError, match="ignored 'If-None-Match"):
        ck.save(1)
    assert remote.keys() == [], "the probe was left behind"


# -- transient faults ------------------------------------------------------------------------------
@pytest.fixture
def proxy(seaweedfs):
    p = FaultProxy(int(seaweedfs.endpoint.rsplit(":", 1)[1]))
    yield p
    p.close()


def test_transient_faults_are_retried(seaweedfs, proxy):
    remote = Remote(seaweedfs)
    options = remote.options(endpoint_url=proxy.endpoint)
    proxy.fail_next(3, "slowdown")
    with AsyncCheckpointer(remote.url, [StateComponent("b", Box(b_state(1)), G)],
                           storage_options=options) as ck:
        ck.save(1).wait()
    assert proxy.injected == ["slowdown"] * 3
    proxy.fail_next(2, "reset")
    back = Box(None)
    ck = AsyncCheckpointer(remote.url, [StateComponent("b", back, G)], storage_options=options)
    assert ck.load().step == 1
    assert_same(back.loaded, b_state(1))
    assert proxy.injected[3:] == ["reset"] * 2


def test_persistent_faults_fail_in_bounded_time(seaweedfs, proxy):
    remote = Remote(seaweedfs)
    options = remote.options(endpoint_url=proxy.endpoint, retry_deadline_s=3)
    with AsyncCheckpointer(remote.url, [StateComponent("b", Box(b_state(1)), G)],
                           storage_options=options) as ck:
        ck.save(1).wait()
    reader = AsyncCheckpointer(remote.url, [StateComponent("b", Box(None), G)],
                               storage_options=options)
    proxy.fail_always("slowdown")
    start = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="kept failing") as info:
        reader.load()
    assert "retry_deadline_s" in str(info.value)
    assert time.monotonic() - start < 8
    start = time.monotonic()
    with pytest.raises(StorageConfigError, match="kept failing"):
        AsyncCheckpointer(remote.url, [StateComponent("b", Box(None), G)], storage_options=options)
    assert time.monotonic() - start < 8


def test_a_save_during_an_outage_fails_cleanly_and_the_next_one_works(seaweedfs, proxy):
    remote = Remote(seaweedfs)
    options = remote.options(endpoint_url=proxy.endpoint, retry_deadline_s=2)
    box = Box({"t": torch.arange(100.0)})
    ck = AsyncCheckpointer(remote.url, [StateComponent("b", box, G)], storage_options=options)
    ck.save(1).wait()
    handle = ck.save(2)
    proxy.fail_always("slowdown")
    with pytest.raises(SaveFailedError) as info:
        handle.wait(timeout=30)              # resolves (no hang) even though cleanup fails too
    assert isinstance(info.value.__cause__, StorageUnavailableError)
    proxy.always = None
    ck.save(3).wait()
    ck.close()
    assert [i.step for i in AsyncCheckpointer(remote.url, [StateComponent("b", Box(None), G)],
                                              storage_options=options).list_checkpoints()] == [1, 3]


# -- multipart uploads that never complete -------------------------------------------------------
def test_unfinished_uploads_are_listed_and_cleaned(seaweedfs):
    remote = Remote(seaweedfs)
    st = open_storage(remote.url, remote.options(part_size=5 << 20))
    w = st.open_writer("step-0000000009/data.bin")
    w.write(memoryview(os.urandom(11 << 20)))        # two parts sent, the upload left open
    assert len(remote.uploads()) == 1 and remote.keys() == []
    assert st.list_dir("") == ["step-0000000009"]     # found, so that cleanup can remove it
    st.delete_dir("step-0000000009")
    assert remote.uploads() == []
    aborted = st.open_writer("x/data.bin")
    aborted.write(memoryview(os.urandom(11 << 20)))
    aborted.abort()
    assert remote.uploads() == [] and not st.exists("x/data.bin")


# -- a saver killed with SIGKILL in the middle of an upload --------------------------------------
def _lines(proc: subprocess.Popen) -> "queue.Queue[str | None]":
    lines: queue.Queue = queue.Queue()

    def read():
        for raw in proc.stdout:
            lines.put(raw.decode().strip())
        lines.put(None)
    threading.Thread(target=read, daemon=True).start()
    return lines


def _expect(lines: queue.Queue, prefix: str, timeout: float, err: Path) -> str:
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line is None:
            pytest.fail(f"the saver exited before {prefix!r}; stderr:\n{err.read_text()[-3000:]}")
        if line.startswith(prefix):
            return line


@pytest.mark.crash
def test_sigkill_mid_upload(seaweedfs, tmp_path):
    remote = Remote(seaweedfs)
    env = child_env(OMP_NUM_THREADS="1", AWS_ENDPOINT_URL=seaweedfs.endpoint,
                    AWS_ACCESS_KEY_ID="testkey", AWS_SECRET_ACCESS_KEY="testsecret",
                    AWS_DEFAULT_REGION="us-east-1")
    err = tmp_path / "saver.stderr"
    with open(err, "wb") as err_file:
        proc = subprocess.Popen([sys.executable, str(HELPER), remote.url, "--idle", "0"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_file)
    try:
        lines = _lines(proc)
        _expect(lines, "loaded", 120, err)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        _expect(lines, "committed 0", 120, err)
        _expect(lines, "saving 1", 30, err)
        deadline = time.monotonic() + 30
        while not remote.uploads():           # step 1's data is being uploaded right now
            assert time.monotonic() < deadline, "the saver never started an upload for step 1"
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [k.split("/")[0] for k in remote.uploads()] == ["step-0000000001"], "no upload was cut short"
    assert not any(k.startswith("step-0000000001/manifest") for k in remote.keys())

    state = CrashState()
    options = remote.options()
    ck = AsyncCheckpointer(remote.url, [StateComponent(COMPONENT, state, G)], storage_options=options)
    assert [i.step for i in ck.list_checkpoints()] == [0] and ck.latest_step() == 0
    assert ck.load().step == 0 and check_state(state.loaded, 0) == []
    state.set_step(1)                        # the next run resumes where the killed one stopped
    ck.save(1).wait()
    ck.close()
    assert remote.uploads() == [], "the killed saver's multipart upload is still dangling"
    again = CrashState()
    ck = AsyncCheckpointer(remote.url, [StateComponent(COMPONENT, again, G)], storage_options=options)
    assert [i.step for i in ck.list_checkpoints()] == [0, 1]
    assert ck.load(1).step == 1 and check_state(again.loaded, 1) == []
