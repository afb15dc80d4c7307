"""`python -m bench.scale` runs one tiny row end to end (the real planner, node writers and
coordinator over a real loopback TCPStore, data writes stubbed) and reports every column; the
counts it reports follow the protocol of docs/distributed.md."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")     # the repository
pytestmark = pytest.mark.bench


def test_scale_bench_reports_a_tiny_row(tmp_path):
    out = tmp_path / "scale"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--rows", "16x20", "--waiting", "16", "--waiters", "3",
         "--window-s", "1.5", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "scale.json").read_text())
    rows = {r["pattern"]: r for r in doc["rows"]}
    assert set(rows) == {"per_rank", "replicated"}
    for row in rows.values():
        assert row["world"] == 16 and row["nodes"] == 2 and row["manifest_bytes"] > 0
        assert row["objects"] >= 2 and row["load_bytes"] > 0 and row["coordinator_s"] > 0
        rt = row["store_round_trips"]
        # Every non-writer rank posts its job and every rank its announcement: 14 + 16 requests.
        assert rt["ranks"] == 30, rt
        # A rank's worker once the outcome is out: node 1's writer reads its event counter,
        # waits for the outcome and reads it, then deletes its own 3 keys of the save (6); the 14
        # other ranks read the outcome off their node's board (dist/relay.py): the counter, then
        # their own 2 keys (3 each).
        assert rt["workers"] == 6 + 14 * 3, row
    # 2 nodes: PER_RANK copies are in one fragment per node; objects = data object and fragment
    # per node + the root (REPLICATED: no fragment)
    assert rows["per_rank"]["largest_fragment_bytes"] > 0 and rows["per_rank"]["objects"] == 2 * 2 + 1
    assert rows["replicated"]["largest_fragment_bytes"] is None and rows["replicated"]["objects"] == 2 + 1
    assert rows["per_rank"]["load_bytes"] < rows["per_rank"]["manifest_bytes"] + 2 * rows["per_rank"]["largest_fragment_bytes"]
    waiting = doc["waiting"][0]
    assert waiting["world"] == 16 and 0 < waiting["rank_rt_per_s"] <= 5, waiting
    assert "| 16 x 20 | per_rank |" in (tmp_path / "scale.md").read_text()
