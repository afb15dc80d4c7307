"""`python -m bench.load` runs end to end on a tiny state and reports every method, cold and warm,
for both dtype mixes (no timing is asserted)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")     # the repository
pytestmark = pytest.mark.bench


def test_load_bench_reports_every_method(tmp_path):
    out = tmp_path / "load"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.load", "--size-gib", "0.004", "--repeats", "1", "--layers", "4",
         "--no-drop-caches", "--dir", str(tmp_path), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "load.json").read_text())
    assert [m["mix"] for m in doc["mixes"]] == ["fp32", "bf16_adam"]
    for mix in doc["mixes"]:
        got = {(r["method"], r["cache"]) for r in mix["rows"]}
        for method in ("raw", "async_ckpt", "async_ckpt_fresh", "async_ckpt_kept", "dcp"):
            assert {(method, "cold"), (method, "warm")} <= got, (mix["mix"], method)
        assert all(r["median_s"] > 0 for r in mix["rows"])
    assert "| async_ckpt | cold |" in (tmp_path / "load.md").read_text()
