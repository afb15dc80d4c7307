"""The benchmark keeps running (no timing is asserted here: speed is judged by bench/ itself)."""
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


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
