"""The `async-ckpt` command line on local disk: every command on healthy checkpoints, on damaged
ones, on an empty root and on a wrong URL; export round trips; import from DCP, safetensors and
torch.save. gc and the writer lease are in test_cli_gc.py, S3 and several ranks in
test_cli_s3.py and test_cli_dist.py.

Commands run in process (`support.cli.run_cli`, the console script's entry under Click's
CliRunner) except where the process is the property (`spawn_cli`, `python -m async_ckpt`): the
installed script's --help, exit statuses 1, 2 and 3 as the parent sees them, the progress bar on
a terminal and not in a pipe, and one end-to-end run of each command (ls, inspect, verify, diff,
export, import; gc in test_cli_gc.py). `end_to_end` runs a command both ways and requires the
same status, stdout and own stderr lines (`async-ckpt: ...`) from each."""
from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import async_ckpt as ac
from support.cli import (G, as_json, end_to_end, extra, fails, model, ok, run_cli, same_tensors, save_steps,
                         spawn_cli)
from support.paths import child_env
from support.stateful import Holder
from support.corruption import resealed

COMMANDS = ["ls", "inspect", "verify", "diff", "gc", "export", "import"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "ckpts"
    save_steps(root, keep_last=2, keep_best=1, best_metric="loss", keep_every=200)
    return root


@pytest.fixture
def root(template, tmp_path) -> Path:
    """A copy of the template each test may damage."""
    dst = tmp_path / "ckpts"
    shutil.copytree(template, dst)
    return dst


def data_file(root: Path, step: int) -> Path:
    (path,) = (root / f"step-{step:010d}").glob("data-*.bin")
    return path


# -- the script, help, exit codes ------------------------------------------------------------------
def test_console_script_is_installed():
    script = Path(sys.executable).parent / "async-ckpt"
    found = str(script) if script.exists() else shutil.which("async-ckpt")
    assert found, "the async-ckpt console script is not installed (pip install -e '.[cli]')"
    proc = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Example:" in proc.stdout
    for command in COMMANDS:
        assert command in proc.stdout


def test_every_command_has_help_with_an_example():
    for command in COMMANDS:
        out = ok(run_cli(command, "--help"))
        assert "Example:" in out and f"async-ckpt {command}" in out, command


def test_usage_errors_are_one_line_with_status_2(root):
    fails(end_to_end("ls"), 2, "Missing argument")      # the status a shell sees
    fails(run_cli("ls", root, "--bogus"), 2, "--bogus")
    fails(run_cli("verify", root, "--step", "200", "--all"), 2, "--all")
    fails(run_cli("inspect", root, "--step", "-1"), 2, "--step")


# -- ls ----------------------------------------------------------------------------------------------
def test_ls_lists_committed_steps_with_retention_reasons(root):
    out = ok(end_to_end("ls", root))
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["STEP", "CREATED"]
    rows = {int(ln.split()[0]): ln for ln in lines[1:4]}
    assert sorted(rows) == [200, 300, 400]
    assert rows[200].endswith("every-200") and rows[300].endswith("last-2")
    assert "latest" in rows[400] and "best-1 loss" in rows[400] and "loss=0.001*" in rows[400]
    assert "keep_last=2, keep_best=1 by loss (lower is better), keep_every=200" in out
    doc = as_json(run_cli("ls", root, "--json"))
    got = {c["step"]: c for c in doc["checkpoints"]}
    assert got[400]["late_metrics"] == ["loss"] and got[400]["metrics"] == {"loss": 0.001}
    assert got[300]["kept_because"] == ["last-2"] and got[200]["kept_because"] == ["every-200"]
    assert got[200]["stored_nbytes"] >= got[200]["nbytes"] > 0
    assert doc["retention"]["keep_every"] == 200 and doc["leftovers"] == [] and doc["writers"] == []
    # --keep-* explains another policy (e.g. for checkpoints whose manifests predate the record)
    other = as_json(run_cli("ls", root, "--json", "--keep-last", "1", "--keep-best", "0", "--keep-every", "0"))
    kept = {c["step"]: c["kept_because"] for c in other["checkpoints"]}
    assert kept[400] == ["latest", "last-1"] and kept[200][0].startswith("not kept")


def test_ls_marks_leftovers_and_writers(root):
    (root / "step-0000000500").mkdir()
    (root / "step-0000000500" / "data-n00000-r00000-dead.bin").write_bytes(b"x" * 100)
    (root / ".writer-lease-feedbeef.json").write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600, "rank": 0}))
    out = ok(run_cli("ls", root))
    assert "LEFTOVER step-0000000500: 1 file(s), 100 B" in out and "async-ckpt gc removes it" in out
    assert "WRITER stale: no heartbeat" in out
    doc = as_json(run_cli("ls", root, "--json"))
    assert [(x["step"], x["bytes"]) for x in doc["leftovers"]] == [(500, 100)]
    assert [c["step"] for c in doc["checkpoints"]] == [200, 300, 400]


# -- inspect --------------------------------------------------------------------------------------------
def test_inspect_text_and_json(root):
    out = ok(run_cli("inspect", root, "--step", "300"))
    assert "step 300 at" in out and "topology    world_size 1" in out and "torch " in out
    assert "component model: global, validation none, required" in out
    assert "0.weight" in out and "bfloat16" in out and "rank 0 node 0" in out
    assert "lr = 0.05" in out and "name = 'run'" in out
    doc = as_json(end_to_end("inspect", root, "--json", "--component", "extra"))
    assert doc["step"] == 400 and list(doc["components"]) == ["extra"]
    cp = doc["components"]["extra"]["copies"]["global"]
    by_path = {t["path"]: t for t in cp["tensors"]}
    assert by_path["ids"]["index"] == by_path["same_ids"]["index"], "tied tensors are one record"
    assert by_path["mask"]["dtype"] == "bool" and by_path["ids"]["shape"] == [6]
    assert cp["values"] == {"step": 400, "lr": 0.05, "name": "run", "empty": {}}
    assert doc["metrics"] == {"loss": 0.001} and doc["late_metrics"] == ["loss"]
    assert doc["retention"]["keep_last"] == 2 and doc["versions"]["torch"] == torch.__version__
    fails(run_cli("inspect", root, "--component", "nope"), 1, "no component 'nope'", "extra, model")
    fails(run_cli("inspect", root, "--step", "100"), 1, "step 100", "200, 300, 400")


# -- verify ----------------------------------------------------------------------------------------------
def test_verify_intact(root):
    out = ok(run_cli("verify", root, "--all"))
    assert out.count(": intact") == 3 and "all intact" in out
    doc = as_json(run_cli("verify", root, "--json"))
    assert doc["ok"] and [s["step"] for s in doc["steps"]] == [400]


def test_verify_names_every_damaged_file(root):
    flipped, cut = data_file(root, 300), data_file(root, 400)
    with open(flipped, "r+b") as f:
        f.seek(70)
        byte = f.read(1)
        f.seek(70)
        f.write(bytes([byte[0] ^ 0x10]))
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) - 1)
    proc = spawn_cli("verify", root, "--all")           # verify end to end; status 1 as a shell sees it
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "step 200: intact" in proc.stdout
    assert f"hash mismatch in {flipped}" in proc.stdout and "component 'model'" in proc.stdout
    assert f"data file {cut} has" in proc.stdout and "truncated" in proc.stdout
    assert "2 of 3 checkpoint(s) CORRUPT" in proc.stdout
    doc = json.loads(run_cli("verify", root, "--step", "300", "--json").stdout)
    assert not doc["ok"] and any(str(flipped) in p for p in doc["steps"][0]["problems"])


def test_verify_missing_file_and_bad_manifest(root):
    data_file(root, 400).unlink()
    (root / "step-0000000300" / "manifest.json").write_text("{not json")
    proc = run_cli("verify", root, "--all")
    assert proc.returncode == 1
    assert "listed in the manifest is missing" in proc.stdout
    assert "malformed manifest" in proc.stdout and "step-0000000300" in proc.stdout


def test_verify_padding_byte_is_caught(root):
    """A byte no record covers (alignment padding) is still checked: the whole-file hash."""
    doc = json.loads((root / "step-0000000200" / "manifest.json").read_text())
    records = sorted((t["offset"], t["offset"] + t["length"]) for c in doc["components"].values()
                     for s in c["shards"].values() for t in s["tensors"])
    gap = next(end for (_, end), (nxt, _) in zip(records, records[1:], strict=False) if nxt > end)
    path = data_file(root, 200)
    with open(path, "r+b") as f:
        f.seek(gap)
        f.write(b"\x01")
    proc = run_cli("verify", root, "--step", "200")
    assert proc.returncode == 1 and "whole file's xxh3-128 differs" in proc.stdout and str(path) in proc.stdout


class _Unmapped:
    """A Storage without map_private: verify reads fresh windows, as on S3 or fsspec."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        if name == "map_private":
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("mapped", [True, False])
def test_verify_file_across_windows(root, monkeypatch, mapped):
    """Records that span several read windows are hashed right, and a flipped byte in a later
    window is found (in process, with tiny windows)."""
    from async_ckpt.format.names import read_manifest, step_dir
    from async_ckpt.load import reader
    from async_ckpt.storage import open_storage
    monkeypatch.setattr(reader, "VERIFY_WINDOW", 256)
    monkeypatch.setattr(reader, "VERIFY_WINDOW_READ", 256)
    storage = open_storage(str(root))
    storage = storage if mapped else _Unmapped(storage)
    manifest = read_manifest(storage, step_dir(300), 300)
    (name,) = manifest.files
    seen = []
    assert reader.verify_file(storage, step_dir(300), manifest, name, seen.append) == []
    assert sum(seen) == manifest.files[name].size and len(seen) > 4
    big = max((t for c in manifest.components.values() for s in c.shards.values() for t in s.tensors),
              key=lambda t: t.length)
    assert big.length > 512, "the test needs a record that spans windows"
    path = data_file(root, 300)
    with open(path, "r+b") as f:
        f.seek(big.offset + big.length - 3)
        byte = f.read(1)
        f.seek(big.offset + big.length - 3)
        f.write(bytes([byte[0] ^ 1]))
    problems = reader.verify_file(storage, step_dir(300), manifest, name)
    assert len(problems) == 2 and f"{big.dtype}{list(big.shape)}" in problems[0] and str(path) in problems[0]


def test_progress_bar_only_on_a_terminal(root):
    proc = spawn_cli("verify", root, "--all")           # a pipe, in a real process
    assert "verifying" not in proc.stderr and "\x1b[" not in proc.stdout + proc.stderr
    master, slave = pty.openpty()
    env = child_env(COLUMNS="100")
    p = subprocess.Popen([sys.executable, "-m", "async_ckpt", "verify", str(root), "--all"],
                         stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    out, _ = p.communicate(timeout=120)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert p.returncode == 0 and b"all intact" in out
    assert b"verifying" in seen, seen[-500:]


# -- diff --------------------------------------------------------------------------------------------------
def test_diff_reports_changed_tensors_and_values(root):
    out = ok(run_cli("diff", root, "200", "300"))
    assert "extra[global] ids" in out and "model[global] 0.weight" in out
    assert "value extra[global] lr: 0.1 -> 0.05" in out and "value extra[global] step: 200 -> 300" in out
    doc = as_json(run_cli("diff", root, "200", "300", "--json", "--component", "extra"))
    rows = {t["name"].split(" ", 1)[1]: t for t in doc["tensors"]}
    assert rows["mask"] == {**rows["mask"], "status": "equal", "by": "hash"}
    assert rows["ids"]["status"] == "changed" and rows["ids"]["max_abs_diff"] == 100.0
    assert rows["ids"]["rel_norm"] == pytest.approx(
        float(torch.full((6,), 100.0).norm() / (torch.arange(6.0) + 200).norm()))
    assert {v["name"].split(" ", 1)[1] for v in doc["values"]} == {"step", "lr"}
    same = as_json(run_cli("diff", root, "300", "300", "--json"))
    assert same["changed"] == 0 and all(t["by"] == "hash" for t in same["tensors"])
    assert end_to_end("diff", root, "200", "300", "--exit-code").returncode == 1   # as a shell sees it
    assert run_cli("diff", root, "300", "300", "--exit-code").returncode == 0


def test_diff_compares_bytes_when_codecs_differ(tmp_path):
    """Same values stored raw and zstd: the hashes cannot say, the bytes do (equal)."""
    raw, z = tmp_path / "raw", tmp_path / "z"
    save_steps(raw, steps=(200,))
    save_steps(z, steps=(200,), compression="zstd")
    shutil.copytree(z / "step-0000000200", raw / "step-0000000201")
    doc = json.loads((raw / "step-0000000201" / "manifest.json").read_text())
    doc["step"] = 201
    (raw / "step-0000000201" / "manifest.json").write_bytes(resealed(doc))   # a valid manifest
    out = as_json(run_cli("diff", raw, "200", "201", "--json", "--component", "model"))
    assert out["changed"] == 0 and {t["by"] for t in out["tensors"]} == {"bytes"}


# -- export ------------------------------------------------------------------------------------------------
def test_export_safetensors_round_trip(root, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    out = tmp_path / "model.safetensors"
    ok(spawn_cli("export", root, "--step", "300", "--component", "model", "--to", out))   # end to end
    same_tensors(load_file(out), dict(model(300).state_dict()))
    both = tmp_path / "all.safetensors"
    ok(run_cli("export", root, "--to", both))
    got = load_file(both)
    want = {f"model.{k}": v for k, v in model(400).state_dict().items()}
    want.update({f"extra.{k}": v for k, v in extra(400).items() if isinstance(v, torch.Tensor)})
    same_tensors(got, want)
    with safe_open(str(both), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    values = json.loads(meta["async_ckpt"])["values"]
    assert values == {"extra.step": 400, "extra.lr": 0.05, "extra.name": "run", "extra.empty": {}}
    fails(run_cli("export", root, "--to", both), 1, "exists", "--force")
    ok(run_cli("export", root, "--to", both, "--force", "--step", "200"))
    assert torch.equal(load_file(both)["extra.ids"], extra(200)["ids"])


def test_export_torch_save_round_trip(root, tmp_path):
    out = tmp_path / "state.pt"
    ok(run_cli("export", root, "--step", "200", "--to", out))
    state = torch.load(out, weights_only=True)
    same_tensors(dict(state["model"]), dict(model(200).state_dict()))
    want = extra(200)
    assert state["extra"]["step"] == 200 and state["extra"]["empty"] == {} and state["extra"]["name"] == "run"
    assert torch.equal(state["extra"]["ids"], want["ids"]) and torch.equal(state["extra"]["mask"], want["mask"])
    one = tmp_path / "model.pth"
    ok(run_cli("export", root, "--component", "model", "--to", one))
    same_tensors(dict(torch.load(one, weights_only=True)), dict(model(400).state_dict()))


def test_export_hugging_face_folder(root, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "hf"
    text = ok(run_cli("export", root, "--component", "model", "--to", out, "--shard-size", "600B"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and f"in {len(files)} shard(s)" in text
    assert sorted(set(index["weight_map"].values())) == files
    want = dict(model(400).state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    got = {}
    for name in files:
        got.update(load_file(out / name))
    same_tensors(got, want)
    assert all(index["weight_map"][k] in files for k in want)
    fails(run_cli("export", root, "--to", out), 1, "not empty", "--force")
    fails(run_cli("export", root, "--to", tmp_path / "x.zip"), 2, "cannot tell the format")


# -- import ------------------------------------------------------------------------------------------------
def test_import_dcp_checkpoint_loads_bit_exactly(tmp_path):
    import torch.distributed.checkpoint as dcp
    net = model(7)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    for _ in range(2):
        net(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    values = {"epoch": 3, "note": "from dcp", "betas": [0.9, 0.99]}
    src = tmp_path / "dcp"
    with pytest.warns(UserWarning):     # dcp.save without a process group says it runs alone
        dcp.save({"model": net.state_dict(), "optim": opt.state_dict(), "meta": values}, checkpoint_id=src)
    root = tmp_path / "imported"
    out = ok(spawn_cli("import", src, root, "--step", "1000", "--metric", "loss=0.5"))   # end to end
    assert "DCP checkpoint" in out and "model, optim, meta" in out
    net2 = model(99)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.5)
    meta = Holder(None)
    with ac.AsyncCheckpointer(root, [ac.StateComponent("model", net2, G), ac.StateComponent("optim", opt2, G),
                                     ac.StateComponent("meta", meta, G)]) as ck:
        info = ck.load()
    assert info is not None and info.step == 1000 and info.metrics == {"loss": 0.5}
    same_tensors(dict(net2.state_dict()), dict(net.state_dict()))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"] and sorted(a["state"]) == sorted(b["state"])
    for i, st in a["state"].items():
        same_tensors(b["state"][i], st)
    assert meta.state == values
    ok(run_cli("verify", root))
    fails(run_cli("import", src, root, "--step", "1000"), 1, "already committed")


def test_import_safetensors_and_torch_save(tmp_path, root):
    from safetensors.torch import save_file
    want = dict(model(5).state_dict())
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in want.items()}, st)
    dst = tmp_path / "dst"
    ok(run_cli("import", st, dst, "--step", "5"))
    net = model(0)
    with ac.AsyncCheckpointer(dst, [ac.StateComponent("model", net, G)]) as ck:
        ck.load()
    same_tensors(dict(net.state_dict()), want)
    # an exported Hugging Face folder comes back as one component
    hf = tmp_path / "hf"
    ok(run_cli("export", root, "--component", "model", "--to", hf, "--shard-size", "1KB"))
    ok(run_cli("import", hf, dst, "--step", "6", "--component", "weights"))
    holder = Holder(None)
    with ac.AsyncCheckpointer(dst, [ac.StateComponent("weights", holder, G)]) as ck:
        ck.load(6)
    same_tensors(holder.state, dict(model(400).state_dict()))
    pt = tmp_path / "w.pt"
    torch.save({"model": want, "epoch": 2}, pt)
    fails(run_cli("import", pt, dst, "--step", "7"), 1, "--allow-pickle")
    assert not (dst / "step-0000000007").exists()
    ok(run_cli("import", pt, dst, "--step", "7", "--allow-pickle", "--compression", "zstd"))
    doc = as_json(run_cli("inspect", dst, "--step", "7", "--json"))
    assert list(doc["components"]) == ["model"], "a torch.save dict with a non-dict value is one component"
    assert doc["components"]["model"]["copies"]["global"]["values"] == {"epoch": 2}


def test_import_refuses_a_dcp_metadata_that_would_run_code(tmp_path):
    import torch.distributed.checkpoint as dcp
    src = tmp_path / "dcp"
    with pytest.warns(UserWarning):
        dcp.save({"w": torch.ones(2)}, checkpoint_id=src)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    import pickle
    (src / ".metadata").write_bytes(pickle.dumps(Payload()))
    fails(run_cli("import", src, tmp_path / "dst", "--step", "1"), 1, "posix.system", "--allow-pickle")
    assert not marker.exists()


# -- empty roots and wrong URLs ---------------------------------------------------------------------------
def test_empty_root(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no committed checkpoints" in ok(run_cli("ls", empty))
    assert as_json(run_cli("ls", empty, "--json"))["checkpoints"] == []
    for args in (["inspect"], ["verify"], ["verify", "--all"], ["export", "--to", tmp_path / "x.pt"]):
        fails(run_cli(args[0], empty, *args[1:]), 1, "no committed checkpoint")
    fails(run_cli("diff", empty, "1", "2"), 1, "step 1")
    assert "nothing to remove" in ok(run_cli("gc", empty))


def test_wrong_roots(tmp_path):
    fails(run_cli("ls", tmp_path / "missing"), 1, "does not exist")
    (tmp_path / "file").write_text("x")
    fails(end_to_end("verify", tmp_path / "file"), 3, "file")     # status 3 as a shell sees it
    fails(run_cli("ls", "nosuchscheme://bucket/x"), 3, "nosuchscheme")
    fails(run_cli("import", tmp_path / "nothing", tmp_path / "dst", "--step", "1"), 1, "does not exist")
