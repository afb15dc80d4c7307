"""The benchmark keeps running (no timing is asserted here: speed is judged by bench/ itself)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")     # the repository
pytestmark = pytest.mark.bench


def test_single_process_bench_runs_and_reports_every_method(tmp_path):
    out_json = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench.single_process", "--size-gib", "0.02",
                           "--tensors", "4", "--repeats", "1", "--no-drop-caches", "--out", str(out_json),
                           "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out_json.read_text())
    rows = {r["key"]: r for r in doc["rows"]}
    for key in ("memcpy", "raw", "raw_early", "ack_none", "ack_none_durable", "ack_zstd_durable",
                "dcp_async", "dcp_async_reuse_durable", "dcp_sync1", "dcp_sync2"):
        assert key in rows and rows[key]["median_s"] > 0, key
    assert rows["ack_none"]["ratio_vs"] == "memcpy" and rows["ack_none_durable"]["ratio_vs"] == "raw write"
    assert "| async_ckpt save(), compression=None" in proc.stdout


@pytest.mark.multiproc
def test_distributed_bench_runs_and_reports_every_figure(tmp_path):
    out_json = tmp_path / "d.json"
    proc = subprocess.run([sys.executable, "-m", "bench.distributed", "--size-gib", "0.01", "--repeats", "1",
                           "--worlds", "2", "--out", str(out_json), "--dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BENCH_NO_DROP": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out_json.read_text())
    for case in ("replicated", "per_rank"):
        summary = doc["results"]["2"][case]
        assert [b["rank"] for b in summary["blocking"]] == [0, 1]
        assert all(b["ack"]["median_s"] > 0 and b["memcpy"]["median_s"] > 0 for b in summary["blocking"])
        assert summary["commit"]["dcp_save2"]["median_s"] > 0 and summary["commit"]["ack"]["median_s"] > 0
        assert sum(summary["node_bytes"].values()) >= 0.01 * (1 << 30) * 0.99
    # replicated: each rank staged half of the state
    halves = [b["staged_gib"] for b in doc["results"]["2"]["replicated"]["blocking"]]
    assert abs(sum(halves) - 0.01) < 1e-3 and max(halves) < 0.01
    assert (tmp_path / "d.md").exists()
