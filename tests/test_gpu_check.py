"""benchmarks/gpu_check.py: what it would run (--dry-run), the tests it names exist, and on a
machine without a CUDA GPU it says so in one line and exits 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_dry_run_lists_every_step_within_eight_minutes(tmp_path):
    proc = _run("--dry-run", "--output-dir", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.splitlines()[0] == (f"would write {tmp_path / 'g'}/ (results.json, summary.txt, one log per step); "
                                   "steps, 480 s at most:")
    for i, name in enumerate(("cuda-tests", "train-benchmark", "compare-quick"), 1):
        assert f"\n{i}. {name} (" in out
    assert all(test in out for test in gpu_check.CUDA_TESTS)
    assert "asymlora.cli compare --quick" in out and "--bench-only" in out
    assert sum(s.timeout_s for s in gpu_check.steps(tmp_path)) <= 8 * 60
    assert not (tmp_path / "g").exists()  # a dry run writes nothing


def test_the_cuda_tests_it_runs_exist():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *gpu_check.CUDA_TESTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert sorted(collected) == sorted(gpu_check.CUDA_TESTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_one_line_and_exit_2(tmp_path):
    proc = _run("--output-dir", str(tmp_path / "g"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["gpu_check needs a CUDA GPU (torch.cuda.is_available() is False here); "
                                        "`python -m benchmarks.gpu_check --dry-run` lists what it would run"]
    assert not (tmp_path / "g").exists()
