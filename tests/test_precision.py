"""--mixed-precision auto on a CPU decides by measuring bf16 against fp32 (asymlora.precision).

Each check runs in a fresh process, so that the instruction-set caps of its environment are the
ones the kernels see, and nothing measured by this process (or inherited) decides for it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from asymlora.precision import _INHERITED, BF16_MIN_SPEEDUP

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
# what an AVX2-only CPU runs: oneDNN, MKL and ATen's own kernels all capped at AVX2
AVX2_CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
CAP_NAMES = (*AVX2_CAPS, "DNNL_MAX_CPU_ISA")
PROBE = "import json; from asymlora.precision import cpu_precision as c; print(json.dumps(c().as_record()))"


def _choice(env_changes: dict[str, str], drop: tuple[str, ...] = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (_INHERITED, *drop)}
    env.update(env_changes, PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


def test_auto_picks_fp32_where_bf16_is_emulated():
    # under AVX2 caps a bf16 linear runs at a few % of fp32's speed, whatever the CPU
    rec = _choice(AVX2_CAPS)
    assert rec["precision"] == "no" and rec["bf16_speedup"] < BF16_MIN_SPEEDUP
    assert "not picked" in rec["reason"]


@pytest.mark.skipif(not _cpu_flags() & {"avx512_bf16", "amx_bf16"},
                    reason="the CPU has no native bf16 (AVX512-BF16 or AMX) to measure")
def test_auto_picks_bf16_where_the_cpu_runs_it_natively():
    rec = _choice({}, drop=CAP_NAMES)  # the CPU as it is, whatever caps this test process runs under
    assert rec["precision"] == "bf16" and rec["bf16_speedup"] >= BF16_MIN_SPEEDUP, rec


def test_a_process_started_by_a_measured_one_keeps_its_choice():
    # a sweep worker follows its parent's measurement (here one saying bf16 is 3x faster), even
    # under caps that would make it measure otherwise: every run of a sweep computes alike
    rec = _choice({**AVX2_CAPS, _INHERITED: "3.0"})
    assert rec["precision"] == "bf16" and rec["bf16_speedup"] == 3.0
