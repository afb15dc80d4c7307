"""The training-loop and GPU benchmarks keep running and write every figure (no timing is asserted
here: speed is judged by the benchmarks themselves)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from support.profile import pick

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")     # the repository
pytestmark = pytest.mark.bench
SAVERS = ("async_ckpt", "dcp_default", "dcp_stager")
STAGING_ROWS = ("floor", "pageable", "ack_overlap0", "ack_overlap1", "dcp_default", "dcp_stager_sync",
                "dcp_stager_async")
OVERLAP_SAVERS = ("ack_blocking", "ack_overlap", "dcp_stager_sync", "dcp_stager_async")


def run_module(args, tmp_path, prelude="pass"):
    code = f"import sys, runpy; {prelude}; runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_training_loop_quick_writes_every_figure(tmp_path):
    out = tmp_path / "loop.json"
    proc = run_module(["bench.training_loop", "--quick", "--out", str(out), "--dir", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    cfg, methods = doc["config"], doc["methods"]
    assert cfg["cycles_per_round"] == cfg["steps"] // cfg["every"] >= 2 and cfg["threads"] >= 1
    assert set(methods) == {"none", *SAVERS}
    assert methods["none"]["plain_step_s"]["median"] > 0 and methods["none"]["save_step_s"]["median"] is None
    for m in SAVERS:
        fig = methods[m]
        assert fig["plain_step_s"]["median"] > 0 and fig["save_step_s"]["median"] > 0, m
        assert fig["save_call_s"]["median"] > 0, m
        assert fig["slowdown_per_save_pooled"]["n"] == cfg["repeats"] * cfg["cycles_per_round"], m
        for key in ("slowdown_per_save_s", "overhead_pct", "drain_s", "window_s", "extra_cpu_per_save_s"):
            assert fig[key]["median"] is not None and len(fig[key]["samples"]) == cfg["repeats"], (m, key)
    # every cycle ran one window of every method, each window `every` steps long
    cycles = {(w["round"], w["cycle"]) for w in doc["windows"]}
    assert len(cycles) == cfg["repeats"] * cfg["cycles_per_round"]
    assert sorted((w["method"], w["round"], w["cycle"]) for w in doc["windows"]) == sorted(
        (m, r, c) for m in methods for r, c in cycles)
    assert all(len(w["steps_s"]) == cfg["every"] and w["saved"] == (w["method"] != "none") and w["cpu_s"] > 0
               for w in doc["windows"])
    md = (tmp_path / "loop.md").read_text()
    for m in methods.values():
        assert f"| {m['label']} |" in md
    for what in ("save() call", "extra CPU per save", "slowdown per save"):
        assert sum(line.startswith(f"- {what}: async_ckpt") for line in md.splitlines()) == 2, what
    assert not any(p.name.startswith("async_ckpt_loop-") for p in tmp_path.iterdir()), "bench folder left"


def test_training_loop_refuses_steps_that_are_not_whole_windows(capsys):
    from bench.training_loop import parse_args
    try:
        parse_args(["--steps", "10", "--every", "4"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--steps 10 --every 4 was accepted")
    assert "multiple of --every" in capsys.readouterr().err


def check_gpu_doc(doc, with_ack: bool) -> None:
    assert [s["size_gb"] for s in doc["staging"]] == [0.004, 0.008]
    for sec in doc["staging"]:
        rows = sec["rows"]
        want = [r for r in STAGING_ROWS if with_ack or not r.startswith("ack")]
        assert set(want) <= set(rows) and (with_ack or not any(k.startswith("ack") for k in rows))
        for key in want:
            assert rows[key]["staged"]["median_s"] > 0 and rows[key]["staged_vs_floor"] > 0, key
            if key not in ("floor", "pageable"):
                assert rows[key]["durable"]["median_s"] >= rows[key]["staged"]["median_s"], key
    methods = doc["overlap"]["methods"]
    want = ["none"] + [m for m in OVERLAP_SAVERS if with_ack or not m.startswith("ack")]
    assert list(methods) == want
    for m in want[1:]:
        assert methods[m]["exposed_per_save"]["median_s"] is not None, m
        assert methods[m]["run_overhead_per_save"]["median_s"] is not None, m
    assert doc["skipped"] == [] and doc["errors"] == []


# zstandard is only for compression: without it async_ckpt is still measured. CI runs the dry run
# once, without zstandard (every figure, nothing missing); the full profile also with it.
WITHOUT_ZSTD = "sys.modules.update(zstandard=None, s3fs=None)"


@pytest.mark.parametrize("prelude", pick([WITHOUT_ZSTD], ["pass", WITHOUT_ZSTD]),
                         ids=pick(["without-zstandard"], ["all-installed", "without-zstandard"]))
def test_gpu_dry_run_on_cpu_writes_every_figure(tmp_path, prelude):
    out = tmp_path / "gpu.json"
    proc = run_module(["bench.gpu", "--dry-run", "--out", str(out), "--dir", str(tmp_path)], tmp_path,
                      prelude)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["machine"]["dry_run"] is True and doc["missing"] == []
    check_gpu_doc(doc, with_ack=True)
    assert doc["ack_timings"], "async_ckpt's own timings missing"
    md = (tmp_path / "gpu.md").read_text()
    assert "| async_ckpt save(), overlap_staging=True, wait_staged() before optimizer.step() |" in md


def test_gpu_without_xxhash_measures_the_rest_and_says_what_to_install(tmp_path):
    out = tmp_path / "gpu.json"
    # None in sys.modules: `import` fails and find_spec reports the module absent, as when not installed
    block = "sys.modules.update(zstandard=None, xxhash=None, s3fs=None)"
    proc = run_module(["bench.gpu", "--dry-run", "--out", str(out), "--dir", str(tmp_path)], tmp_path, block)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install xxhash" in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["missing"] == ["xxhash"]
    check_gpu_doc(doc, with_ack=False)


def test_gpu_without_cuda_measures_nothing_and_exits_0(monkeypatch, capsys, tmp_path):
    from bench import gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path / "g.json")]) == 0
    assert "no CUDA device: nothing measured" in capsys.readouterr().out
    assert not (tmp_path / "g.json").exists()


def test_gpu_records_a_failing_method_and_measures_the_rest(monkeypatch, tmp_path):
    """The script runs once, unattended, on a lent machine: one broken method must not cost the
    other figures."""
    from bench import gpu

    def broken(self, state, add):
        def run(r):
            raise RuntimeError("simulated copy failure")
        return run
    monkeypatch.setattr(gpu.StagingBench, "_pageable", broken)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--out", str(out), "--dir", str(tmp_path)]) == 1
    doc = json.loads(out.read_text())
    assert doc["errors"] == [f"{size:g} GB pageable round 1: RuntimeError: simulated copy failure"
                             for size in (0.004, 0.008)]
    for sec in doc["staging"]:
        assert "pageable" not in sec["rows"] and sec["rows"]["ack_overlap0"]["staged"]["median_s"] > 0
    assert doc["overlap"]["methods"]["ack_overlap"]["exposed_per_save"]["median_s"] is not None
    assert "FAILED: 0.004 GB pageable round 1" in (tmp_path / "gpu.md").read_text()


def test_reused_dcp_stager_survives_a_release_that_closes_it_after_each_stage(tmp_path, monkeypatch):
    """torch 2.11's DefaultStager._stage closes its inner StateDictStager after every stage, so a
    reused stager fails on the second save; bench.gpu_common.reusable_stager must keep DCP's best
    setting working there. The 2.11 behaviour is reproduced by patching _stage."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import staging

    from bench.gpu_common import dcp_parts, reusable_stager

    original = staging.DefaultStager._stage

    def closing_stage(self, state_dict, **kwargs):
        out = original(self, state_dict, **kwargs)
        self._state_dict_stager.close()
        return out

    monkeypatch.setattr(staging.DefaultStager, "_stage", closing_stage)
    options = staging.StagingOptions(False, False, False, False)
    state = {"w": torch.randn(1000)}
    dist.init_process_group("gloo", store=dist.TCPStore("127.0.0.1", 0, 1, True), rank=0, world_size=1)
    try:
        plain = staging.DefaultStager(options)
        dcp_parts(dcp.async_save(state, checkpoint_id=str(tmp_path / "p0"), async_stager=plain))[1].result()
        with pytest.raises(KeyError):    # the bug the wrapper exists for
            dcp_parts(dcp.async_save(state, checkpoint_id=str(tmp_path / "p1"), async_stager=plain))[1].result()
        kept = reusable_stager(options)
        for i in range(3):
            dcp_parts(dcp.async_save(state, checkpoint_id=str(tmp_path / f"k{i}"), async_stager=kept))[1].result()
        kept.release()
        loaded = {"w": torch.zeros(1000)}
        dcp.load(loaded, checkpoint_id=str(tmp_path / "k2"))
        assert torch.equal(loaded["w"], state["w"])
    finally:
        dist.destroy_process_group()
