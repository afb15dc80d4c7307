"""bench/s3.py keeps running end to end on a tiny state (speed is judged by the benchmark itself)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")     # the repository
pytestmark = [pytest.mark.bench, pytest.mark.s3]     # bench.s3 starts its own SeaweedFS


def test_s3_bench_runs_and_reports_every_method(tmp_path):
    out = tmp_path / "s3.json"
    env = {k: v for k, v in os.environ.items() if k != "ASYNC_CKPT_S3_ENDPOINT"}   # its own server
    proc = subprocess.run([sys.executable, "-m", "bench.s3", "--size-gib", "0.01", "--tensors", "2",
                           "--repeats", "1", "--out", str(out), "--dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    rows = {r["key"]: r for r in doc["rows"]}
    for key in ("raw_pipe", "commit_none", "commit_zstd", "raw_cat", "load_none", "load_zstd"):
        assert rows[key]["median_s"] > 0, key
    assert rows["commit_zstd"]["ratio_vs"] == "raw_pipe" and rows["load_none"]["ratio_vs"] == "raw_cat"
    assert 0 < doc["stored"]["zstd"][0] < doc["nbytes"] <= doc["stored"]["none"][0]   # + alignment
    assert out.with_suffix(".md").read_text().startswith("### async_ckpt on S3")
    assert list(tmp_path.glob("bench-s3-*/seaweed-*")) == [], "the benchmark left its server's data behind"
