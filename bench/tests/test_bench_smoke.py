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
                           "--worlds", "2", "--cases", "replicated,replicated_checked,per_rank",
                           "--out", str(out_json), "--dir", str(tmp_path)],
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
        # the node object and one file per rank, paired round by round
        assert summary["commit"]["files"]["median_s"] > 0
        assert len(summary["commit"]["paired_ratios_vs_files"]) == 1
    # replicated: each rank staged half of the state
    halves = [b["staged_gib"] for b in doc["results"]["2"]["replicated"]["blocking"]]
    assert abs(sum(halves) - 0.01) < 1e-3 and max(halves) < 0.01
    assert "median of the rounds' ratios" in (tmp_path / "d.md").read_text()


@pytest.mark.multiproc
def test_sharded_bench_saves_at_2_loads_at_1_and_checks_every_load(tmp_path):
    """World 2 -> 1 to stay fast (the benchmark itself runs 4 on two nodes -> 2): still a reshard,
    two saved chunks per tensor into one box."""
    out_json = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "-m", "bench.distributed", "--cases", "sharded", "--size-gib",
                           "0.004", "--repeats", "1", "--sharded-worlds", "2,1", "--out", str(out_json),
                           "--dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BENCH_NO_DROP": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out_json.read_text())
    s = doc["sharded"]
    assert (s["save_world"], s["save_nodes"], s["load_world"]) == (2, 1, 1)
    assert [b["rank"] for b in s["blocking"]] == [0, 1]
    # FSDP2 over 2 ranks: every rank stages its half of the state, all of it written once
    assert all(abs(b["staged_gib"] - s["state_gib"] / 2) < 1e-4 for b in s["blocking"])
    assert sorted(s["node_bytes"]) == ["data-n00000"]
    assert s["state_gib"] * (1 << 30) <= sum(s["node_bytes"].values()) < s["state_gib"] * (1 << 30) * 1.1
    for figure in (s["commit"]["ack"], s["commit"]["dcp_save2"], s["commit"]["dcp_async"],
                   s["load"]["ack"], s["load"]["dcp"]):
        assert figure["median_s"] > 0 and figure["n"] == 1
    # both loads of the one round were digest-checked, every slab present (4 slabs of each of
    # 4 weights and their 2 moments, plus the 4 step scalars)
    assert s["load"]["digests_checked"] == 2 and s["load"]["slabs"] == 4 * 3 * 4 + 4
    assert set(s["verdicts"]) == {"blocking_vs_memcpy", "commit_vs_dcp_save2", "load_vs_dcp_load"}
    assert "| async_ckpt load() (hashes verified)" in (tmp_path / "s.md").read_text()


DIGEST_PROBE = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.getcwd())
from bench import dist_sharded as ds
dist.init_process_group("gloo", rank=0, world_size=1)
model, opt = ds.build(0.001, 1)
ds.fill(model, opt, 0)
before = ds.digest(model, opt, 0, 1)
p = next(iter(model.parameters()))
exp_avg = opt.state[p]["exp_avg"].to_local()
with torch.no_grad():
    exp_avg.view(-1)[-1] = torch.nextafter(exp_avg.view(-1)[-1], torch.tensor(float("inf")))
after = ds.digest(model, opt, 0, 1)
print(sorted(k for k in before if before[k] != after[k]), len(before))
"""


def test_sharded_bench_digest_sees_one_ulp_in_one_slab(tmp_path):
    """The check that makes the load figures count: one ulp in the last element of one tensor
    changes exactly the slab holding it."""
    proc = subprocess.run([sys.executable, "-c", DIGEST_PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
                                            "MASTER_PORT": str(_free_port())})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[-2] == "['optim/0.weight/exp_avg#3'] 52", proc.stdout


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_docs_page_rewrite_keeps_hand_written_sections(tmp_path, monkeypatch):
    from bench.harness import docs_page
    page = tmp_path / "benchmarks.md"
    page.write_text("# old\n\nstale generated text\n\n<!-- hand-written: a -->\n## A\n\nkept one\n"
                    "<!-- /hand-written -->\n\nmore stale text\n<!-- hand-written: b -->\n## B\n"
                    "<!-- /hand-written -->\n")
    monkeypatch.setattr(docs_page, "DOC", str(page))
    doc = {"preset": "quick", "command": "python -m bench", "machine": {}, "load_average_start": [0.0],
           "load_average_end": [0.0]}
    docs_page.write(doc, "NEW TABLES", str(tmp_path / "r"))
    text = page.read_text()
    assert "stale" not in text and "NEW TABLES" in text
    a, b, other = text.index("## A\n\nkept one"), text.index("## B"), text.index("## Other benchmarks")
    assert a < b < other and text.count("<!-- hand-written:") == 2
