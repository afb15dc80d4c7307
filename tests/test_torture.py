"""The torture suite's CI profile: 19 random SIGKILLs through `python -m bench.torture` (with the
crash tests', a few dozen kills in CI), the command the full run uses (>= 1,000 kills,
docs/reliability.md), and its disk-full case. ASYNC_CKPT_TESTS=full (tests/support/profile.py)
runs each test with three to five times the kills.

Every kill is followed by the torture's checks (bench/torture/checks.py): the newest committed
step loads bit-exactly, every listed step loads, retention kept exactly what keep_last promises,
nothing a kill left (uncommitted folders, unlisted files, multipart uploads, scratch files past
the sweep's grace period) survives the next commit, and after a rank or launcher kill every
survivor raises a CheckpointError and exits within min(timeout_s, 30) + 10 s. Each test asserts
zero failures and prints them otherwise (mode, trial, seed, what was left where).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.paths import REPO, child_env
from support.profile import pick

pytestmark = pytest.mark.crash
SEED = 20240611


def torture(tmp_path, modes: str, env: dict | None = None, timeout: float = pick(600, 3000)) -> dict:
    out = tmp_path / "torture.json"
    proc = subprocess.run([sys.executable, "-m", "bench.torture", "--modes", modes, "--seed", str(SEED),
                           "--out", str(out), "--dir", str(tmp_path), "--quiet"],
                          cwd=REPO, env=child_env(**(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    assert out.exists(), f"bench.torture wrote no results (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
    doc = json.loads(out.read_text())
    failures = [f"{m['mode']} trial {f['trial']} (landed {f['landing']}, {f['plan']}; root {f['root']}): "
                + "; ".join(f["problems"]) for m in doc["modes"] for f in m["failures"]]
    assert not failures, "\n\n".join(failures)[-12000:]
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    return {m["mode"]: m for m in doc["modes"]}


def check_counts(modes: dict, want: dict[str, int]) -> None:
    for name, count in want.items():
        mode = modes[name]
        assert mode["kills"] == count, (name, mode)
        assert mode["final_checked"], f"{name}: the save after the last kill was not checked"
        assert sum(mode["landings"].values()) == count, (name, mode["landings"])


@pytest.mark.timeout(pick(420, 3600))
def test_local_raw_and_zstd_savers_survive_random_kills(tmp_path):
    want = pick({"local-raw": 9, "local-zstd": 4}, {"local-raw": 40, "local-zstd": 20})
    modes = torture(tmp_path, ",".join(f"{k}={v}" for k, v in want.items()))
    check_counts(modes, want)
    assert modes["local-raw"]["commits"] and modes["local-raw"]["loads"] >= want["local-raw"]
    landed = set(modes["local-raw"]["landings"]) | set(modes["local-zstd"]["landings"])
    assert landed - {"idle", "opening"}, f"no kill landed inside a save: {landed}"


@pytest.mark.timeout(pick(300, 3600))
def test_s3_saver_survives_random_kills(tmp_path, seaweedfs):
    kills = pick(4, 20)
    modes = torture(tmp_path, f"s3={kills}", env=seaweedfs.environment())
    check_counts(modes, {"s3": kills})


@pytest.mark.multiproc
@pytest.mark.timeout(pick(480, 3600))
def test_torchrun_group_rank_and_launcher_kills(tmp_path):
    """CI: a whole-group kill and a launcher kill (each is two 2 x 2 launches: the killed one and
    the next, which verifies and saves). A single rank's kill, whose survivors'
    bound tests/test_distributed.py checks in CI too, joins them in the full profile."""
    want = pick({"torchrun-group": 1, "torchrun-launcher": 1},
                {"torchrun-group": 3, "torchrun-rank": 3, "torchrun-launcher": 3})
    modes = torture(tmp_path, ",".join(f"{k}={v}" for k, v in want.items()))
    check_counts(modes, want)
    for name in [m for m in ("torchrun-rank", "torchrun-launcher") if m in want]:
        notes = modes[name]["notes"]
        assert notes["survivor_raise_s"], f"{name}: no survivor was timed"
        assert max(notes["survivor_exit_s"]) <= notes["bound_s"], notes


@pytest.mark.timeout(pick(180, 3600))
def test_a_full_disk_fails_the_save_clearly_and_the_next_save_commits(tmp_path):
    """tmpfs where this process may mount one, injected ENOSPC everywhere."""
    trials = pick(6, 20)
    modes = torture(tmp_path, f"disk-full={trials}")
    full = modes["disk-full"]
    assert full["kills"] == trials and full["commits"] == trials and full["final_checked"], full
    assert all(w.startswith(("tmpfs", "inject")) for w in full["landings"]), full["landings"]
    assert any(w.startswith("inject") for w in full["landings"])
    if os.geteuid() == 0 and full["notes"]["tmpfs"]:
        assert any(w.startswith("tmpfs") for w in full["landings"])
