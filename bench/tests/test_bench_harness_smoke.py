"""`python -m bench` runs end to end on a tiny configuration and reports every figure of every
peer and floor, for every dimension it was asked for (no timing is asserted: speed is judged by
the harness itself)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")     # the repository
pytestmark = [pytest.mark.bench, pytest.mark.s3, pytest.mark.multiproc]   # local + S3 targets, worlds 1 and 2
PEERS = ("async_ckpt_none", "async_ckpt_zstd", "torch_save", "dcp_save1", "dcp_save2", "dcp_async",
         "dcp_async_stager")
SAVE_FIGURES = ("blocking_s", "staged_s", "committed_s", "load_s", "background_cpu_s",
                "peak_extra_rss_bytes", "stored_bytes")


def test_harness_reports_every_peer_floor_and_figure(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--preset", "quick", "--sizes", "4MiB", "--repeats", "1",
         "--layers", "4", "--worlds", "1,2", "--dist-size", "4MiB", "--targets", "local,s3",
         "--s3-size", "4MiB", "--s3-repeats", "1", "--flatness-saves", "5", "--flatness-size", "1MiB",
         "--no-drop-caches", "--out-dir", str(out), "--name", "smoke", "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "BENCH_NO_DROP": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((out / "smoke.json").read_text())

    summaries = {s["mix"]: s for s in doc["local"]["summaries"]}
    assert set(summaries) == {"fp32", "bf16_adam"}
    for mix, s in summaries.items():
        rows = s["rows"]
        assert rows["memcpy"]["figures"]["blocking_s"]["median"] > 0
        assert rows["raw_write"]["figures"]["committed_s"]["median"] > 0
        assert rows["raw_cold_read"]["figures"]["load_s"]["median"] > 0
        odirect = [c for c in doc["local"]["cases"] if c["mix"] == mix][0]["odirect_error"]
        assert "raw_odirect" in rows or odirect, "O_DIRECT neither measured nor explained"
        peers = PEERS + (("torchsnapshot",) if mix == "fp32" else ())
        for peer in peers:
            figs = rows[peer]["figures"]
            for fig in SAVE_FIGURES:
                assert figs[fig]["n"] == 1 and figs[fig]["median"] >= 0, (mix, peer, fig)
            assert figs["committed_s"]["median"] >= figs["blocking_s"]["median"] > 0, (mix, peer)
            for ratio in ("blocking_vs_floor", "committed_vs_floor", "load_vs_floor", "load_vs_dcp_load",
                          "commit_gib_per_s", "compression_ratio"):
                assert rows[peer][ratio] > 0, (mix, peer, ratio)
        assert rows["async_ckpt_zstd"]["compression_ratio"] > 1.0, "zstd stored no fewer bytes than raw"
        kinds = {v["what"].split(" ", 1)[1] for v in s["verdicts"] if v["what"].startswith("async_ckpt_none")}
        assert kinds == {"blocking vs memcpy floor", "committed vs raw write+fsync", "cold load vs raw cold read",
                         "cold load vs best dcp.load", "extra host memory (MiB) vs staged + pool budget"}
    assert "torchsnapshot (bf16_adam)" in doc["local"]["skipped_peers"]

    flat = doc["flatness"]
    assert len(flat["rss_bytes"]) == 5 and min(flat["rss_bytes"]) > 0
    assert flat["flat"] == (flat["growth_bytes"] <= flat["tolerance_bytes"])
    assert set(doc["distributed"]["results"]["2"]) == {"replicated", "per_rank"}
    assert {r["key"] for r in doc["s3"]["rows"]} == {"raw_pipe", "commit_none", "commit_zstd", "raw_cat",
                                                     "load_none", "load_zstd"}
    assert len(doc["plots"]) == 6
    for p in doc["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", p
    text = (out / "smoke.md").read_text()
    for heading in ("### Local folder", "#### fp32", "#### bf16_adam", "### Memory flatness",
                    "### Distributed", "### async_ckpt on S3"):
        assert heading in text, heading
    assert "| torchsnapshot async_take + fsync [n=1]" in text
    assert "(target <= 1.25x): M" in text, "no verdict against the blocking target"
