"""The `async-ckpt` command line on the loopback S3 servers (SeaweedFS and moto): every command
on healthy and damaged checkpoints, options and credentials from --storage-option or the
environment, an empty prefix, a missing bucket and wrong credentials, and gc of dangling
multipart uploads. Commands run in process (`support.cli.run_cli`; the S3 backend makes a new
client per command, outside fsspec's instance cache), but for ls with credentials from a fresh
process's environment (`end_to_end`: `python -m async_ckpt`, and the same output in process).
Every command runs end to end as a subprocess on local disk (test_cli.py, test_cli_gc.py): a
subprocess that imports the S3 client costs seconds more than one in process."""
from __future__ import annotations

import json
import os
import time

from safetensors.torch import load_file

from async_ckpt.storage import open_storage
from support.cli import as_json, end_to_end, fails, model, ok, run_cli, same_tensors, save_steps
from support.s3 import Remote


def s3_args(server, **override: str) -> list[str]:
    opts = {"endpoint_url": server.endpoint, "key": server.key, "secret": server.secret,
            "client_kwargs.region_name": "us-east-1", "retry_deadline_s": "5", **override}
    return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]


def test_every_command_on_s3(any_s3, tmp_path):
    remote = Remote(any_s3)
    save_steps(remote.url, steps=(100, 200, 300), storage_options=remote.options(), keep_last=2)
    opts = s3_args(any_s3)
    doc = as_json(run_cli("ls", remote.url, "--json", *opts))
    assert [c["step"] for c in doc["checkpoints"]] == [200, 300] and doc["writers"] == []
    assert doc["checkpoints"][1]["kept_because"] == ["latest", "last-2"]
    info = as_json(run_cli("inspect", remote.url, "--step", "200", "--json", *opts))
    assert info["url"] == f"{remote.url}/step-0000000200" and set(info["components"]) == {"model", "extra"}
    assert "all intact" in ok(run_cli("verify", remote.url, "--all", *opts))
    diff = as_json(run_cli("diff", remote.url, "200", "300", "--json", *opts))
    assert {v["name"] for v in diff["values"]} == {"extra[global] step", "extra[global] lr"}
    out = tmp_path / "m.safetensors"
    ok(run_cli("export", remote.url, "--component", "model", "--to", out, *opts))
    same_tensors(load_file(out), dict(model(300).state_dict()))
    # damage one object behind async_ckpt's back: verify names it and fails
    name = remote.data_file(300)
    data = bytearray(remote.get(name))
    data[100] ^= 0xFF
    remote.put(name, bytes(data))
    proc = run_cli("verify", remote.url, "--all", *opts)
    assert proc.returncode == 1 and f"hash mismatch in {remote.url}/{name}" in proc.stdout
    assert "step 200: intact" in proc.stdout
    # the wrong bucket, the wrong secret: one line, status 3, no secret printed
    line = fails(run_cli("ls", f"s3://no-such-bucket-{os.getpid()}/x", *opts), 3, "no-such-bucket")
    assert any_s3.secret not in line
    if any_s3.name == "seaweedfs":          # moto accepts any credentials
        line = fails(run_cli("verify", remote.url, *s3_args(any_s3, secret="wrong-secret-123")), 3)
        assert "wrong-secret-123" not in line


def test_credentials_from_the_environment_empty_prefix_and_import(seaweedfs, tmp_path):
    env = {"AWS_ENDPOINT_URL": seaweedfs.endpoint, "AWS_ACCESS_KEY_ID": seaweedfs.key,
           "AWS_SECRET_ACCESS_KEY": seaweedfs.secret, "AWS_DEFAULT_REGION": "us-east-1"}
    empty = Remote(seaweedfs)
    assert "no committed checkpoints" in ok(end_to_end("ls", empty.url, env=env))   # a fresh environment
    fails(run_cli("verify", empty.url, env=env), 1, "no committed checkpoint")
    from safetensors.torch import save_file
    src = tmp_path / "w.safetensors"
    want = {k: v.contiguous() for k, v in model(3).state_dict().items()}
    save_file(want, src)
    remote = Remote(seaweedfs)
    ok(run_cli("import", src, remote.url, "--step", "3", "--compression", "zstd", env=env))
    assert remote.keys()[-1] == "step-0000000003/manifest.json" and not any(
        k.startswith(".writer-lease-") for k in remote.keys()), "import left its writer lease"
    ok(run_cli("verify", remote.url, env=env))
    doc = as_json(run_cli("inspect", remote.url, "--json", env=env))
    codecs = {t["codec"] for t in doc["components"]["model"]["copies"]["global"]["tensors"]}
    assert codecs <= {"zstd-planes1", "zstd-planes2", "zstd-planes4"}
    out = tmp_path / "back.safetensors"
    ok(run_cli("export", remote.url, "--to", out, env=env))
    same_tensors(load_file(out), want)


def test_gc_on_s3_aborts_dangling_uploads(seaweedfs):
    remote = Remote(seaweedfs)
    save_steps(remote.url, steps=(100, 200), storage_options=remote.options())
    st = open_storage(remote.url, remote.options(part_size=5 << 20))
    chunk = memoryview(os.urandom(11 << 20))
    for path in ("step-0000000500/data-n00000-r00000-cut.bin",        # a killed save's folder
                 "step-0000000200/data-n00000-r00000-cut.bin"):       # a killed first attempt at 200
        st.open_writer(path).write(chunk)                           # two parts sent, never completed
    remote.put("step-0000000200/junk.bin", b"x")
    remote.put(".write-probe-0123", b"")
    assert len(remote.uploads()) == 2
    committed = sorted(k for k in remote.keys() if k.startswith(("step-0000000100/", "step-0000000200/"))
                       and not k.endswith("junk.bin"))
    opts = s3_args(seaweedfs)
    # a live lease of a writer elsewhere: gc refuses, --dry-run still reports
    lease = {"host": "trainer-7", "pid": 42, "heartbeat": time.time(), "rank": 0}
    remote.put(".writer-lease-00aa.json", json.dumps(lease).encode())
    fails(run_cli("gc", remote.url, *opts), 4, "a writer is active", "host trainer-7 pid 42")
    dry = as_json(run_cli("gc", remote.url, "--dry-run", "--json", *opts))
    by_path = {a["path"]: a for a in dry["would_remove"]}
    assert set(by_path) == {"step-0000000500", "step-0000000200/data-n00000-r00000-cut.bin",
                            "step-0000000200/junk.bin", ".write-probe-0123"}
    assert by_path["step-0000000500"]["uploads"] == 1
    assert by_path["step-0000000200/data-n00000-r00000-cut.bin"]["uploads"] == 1
    assert len(remote.uploads()) == 2, "--dry-run changed something"
    lease["heartbeat"] = time.time() - 3600                          # that writer died an hour ago
    remote.put(".writer-lease-00aa.json", json.dumps(lease).encode())
    out = ok(run_cli("gc", remote.url, *opts))
    assert "removed 5 item(s)" in out and "stale writer lease" in out
    assert remote.uploads() == [], "gc left a dangling multipart upload"
    assert sorted(remote.keys()) == committed
    assert "all intact" in ok(run_cli("verify", remote.url, "--all", *opts))
    assert [c["step"] for c in as_json(run_cli("ls", remote.url, "--json", *opts))["checkpoints"]] == [100, 200]
