"""The README's main job: the demo trains, checkpoints, resumes in a new process bit-exactly."""
import os
import subprocess
import sys

import pytest

DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "train_demo.py")


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_demo_resumes_bit_exact(tmp_path, compression):
    out = subprocess.run([sys.executable, DEMO, "--dir", str(tmp_path / "ck"), "--steps", "40",
                          "--every", "10", "--compression", compression],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded step 30" in out.stdout
    assert out.stdout.count("== uninterrupted run") == 5
    assert "resume is bit-exact" in out.stdout
    assert sorted(os.listdir(tmp_path / "ck")) == ["step-0000000010", "step-0000000020", "step-0000000030"]
