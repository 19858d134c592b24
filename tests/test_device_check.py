"""``scripts/device-check.sh``, the prepared GPU run of issue #13, run here on the CPU (its
steps and outputs; the CUDA tests inside it skip without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "OUT": str(tmp_path),
        "DEVICE": "cpu",
        "SIZES": "12",
        "REPEATS": "1",
        "CHECK_ENTRIES": "2",
        "PY": sys.executable,
        "INSTALL": "0",
        **env,
    }
    script = ROOT / "scripts" / "device-check.sh"
    return subprocess.run(
        ["bash", str(script)], env=full, capture_output=True, text=True, timeout=300
    )


def test_device_check_runs_its_steps_on_the_cpu(tmp_path):
    done = _run(tmp_path)
    log = (tmp_path / "device-check.log").read_text()
    assert done.returncode == 0, log[-3000:]
    for step in ("tests", "floor12", "check12"):
        assert f"== {step}: ok" in log
    assert "== 0 step(s) failed" in log
    md = (tmp_path / "floor12.md").read_text()
    assert "ReLU covariance (66 off-diagonal pairs) on cpu" in md
    with tarfile.open(tmp_path / "device-check.tgz") as tar:
        names = set(tar.getnames())
    assert {"./floor12/bench_floor.json", "./floor12/bench_floor_oracle_points.json"} <= names
    # the mpmath check of the float64 entries ran on the oracle points it wrote
    assert "relu_covariance: 2 points, max abs diff" in log


def test_device_check_counts_a_failed_step(tmp_path):
    """A step that fails (here: a device torch cannot use) is reported and counted in the
    exit status; the steps after it still run."""
    done = _run(tmp_path, DEVICE="meta")
    log = (tmp_path / "device-check.log").read_text()
    assert done.returncode == 2  # the benchmark, then the check of its missing points
    assert "== floor12: FAILED" in log and "--device must be cpu or cuda" in log
    assert "== check12: FAILED" in log and "== tests: ok" in log
