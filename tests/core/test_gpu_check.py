"""bench/gpu_check.sh, the one-call GPU check (issue 21): its dry run on CPU finds every test and benchmark
it names, and fails on one that is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _dry_run(script: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_REPO": str(REPO), "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", str(script), "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_dry_run_lists_every_check_and_finds_every_reference():
    proc = _dry_run(SCRIPT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    names = [line.split("[")[1].split(",")[0] for line in lines if line.startswith("would run [")]
    assert {"trainer_gpu", "trainer_cpu_pinned", "clip_gpu", "recaption_gpu", "bench_clip", "bench_train_loader",
            "bench_recaption"} <= set(names)
    assert "all present" in lines[-1] and "MISSING" not in proc.stdout
    assert not any(line.startswith("== ") for line in lines)  # nothing was run
    # the limits fit the single 8-minute call
    limits = [int(line.split(", ")[1].split("s]")[0]) for line in lines if line.startswith("would run [")]
    assert sum(limits) <= 470


def test_dry_run_fails_on_a_missing_test_benchmark_flag(tmp_path):
    text = SCRIPT.read_text()
    broken = tmp_path / "gpu_check.sh"
    gone = "tests/clip/test_models.py::test_dali_mixed_gpu_within_tolerance"
    assert gone in text and "--gpu-steps" in text
    broken.write_text(text.replace(gone, gone + "_renamed").replace("--gpu-steps", "--gpu-stepz"))
    proc = _dry_run(broken)
    assert proc.returncode == 1
    assert f"MISSING test: {gone}_renamed" in proc.stdout
    assert "MISSING flag --gpu-stepz in bench/train_loader.py" in proc.stdout
