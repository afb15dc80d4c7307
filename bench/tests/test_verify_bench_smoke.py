"""`python -m bench.verify` runs end to end on a tiny checkpoint and reports both methods and the
speed ratio (no timing is asserted)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")     # the repository
pytestmark = pytest.mark.bench


def test_verify_bench_reports_raw_and_verify(tmp_path):
    out = tmp_path / "verify"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.verify", "--size-gib", "0.004", "--repeats", "2", "--layers", "4",
         "--no-drop-caches", "--dir", str(tmp_path), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "verify.json").read_text())
    rows = {r["method"]: r for r in doc["summary"]["rows"]}
    assert set(rows) == {"raw", "verify"} and all(len(r["samples_s"]) == 2 for r in rows.values())
    assert doc["summary"]["speed_vs_raw"] > 0 and doc["summary"]["files"] == 2
    assert "| verify |" in (tmp_path / "verify.md").read_text()
