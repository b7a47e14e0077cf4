"""Whether bf16 autocast pays on this CPU, measured rather than read from CPU flags.

A CPU flag says what the hardware has, not what the kernels do under the instruction-set caps in
force (``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``, ``ATEN_CPU_CAPABILITY``) or on a
CPU whose bf16 path is emulated: on an AVX2-only CPU a bf16 linear runs at ~2 % of fp32's speed,
with AMX at several times fp32's. So "auto" times the thing a training step does most — a linear
layer of a transformer's feed-forward shape under bf16 autocast against the same in fp32 — and
picks bf16 only when it is clearly faster (:data:`BF16_MIN_SPEEDUP`).

The probe: warm-up, then the best of :data:`REPEATS` alternated calls of each (the minimum is the
least disturbed by other work on the machine); a bf16 call already slower than fp32's best stops
it at once, so even an emulated bf16 path costs two calls (~0.1 s each). One measurement per process,
and a process started by this one (a sweep worker, spawned after the measurement) inherits it
through :data:`_INHERITED`, so every run of one sweep computes at the same precision.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

__all__ = ["BF16_MIN_SPEEDUP", "CpuPrecision", "cpu_precision"]

# bf16 is chosen when its linear is at least this many times faster than fp32's: a whole MiniLM
# step gains less than its GEMMs do (much of it is not GEMM). Emulated bf16 measures 0.03-0.15;
# AVX512-BF16 without AMX about 2 (133 against 60 GFLOP/s on a Zen 4), AMX more.
BF16_MIN_SPEEDUP = 1.2
REPEATS = 5
# rows × in × out of the probe: 256 tokens through a 384 → 1536 feed-forward layer (MiniLM's)
PROBE_SHAPE = (256, 384, 1536)
_INHERITED = "_ASYMLORA_CPU_BF16_SPEEDUP"


@dataclass(frozen=True)
class CpuPrecision:
    """The precision "auto" computes at on this CPU: ``precision`` is "bf16" or "no" (fp32);
    ``bf16_speedup``: fp32 time / bf16-autocast time of the probe's linear (> 1: bf16 faster)."""

    precision: str
    bf16_speedup: float

    @property
    def reason(self) -> str:
        verb = "picked" if self.precision == "bf16" else "not picked"
        return (f"bf16 autocast {verb}: a {PROBE_SHAPE[0]}×{PROBE_SHAPE[1]}→{PROBE_SHAPE[2]} linear ran "
                f"{self.bf16_speedup:.2f}× as fast as in fp32 (bf16 needs ≥ {BF16_MIN_SPEEDUP:g}×)")

    def describe(self) -> str:
        """For a command's header line."""
        name = "bf16 autocast" if self.precision == "bf16" else "fp32"
        return f"{name} (bf16 measured at {self.bf16_speedup:.2f}× fp32's speed)"

    def as_record(self) -> dict[str, object]:
        return {"precision": self.precision, "bf16_speedup": round(self.bf16_speedup, 3), "reason": self.reason}


def _linear_seconds(x: torch.Tensor, w: torch.Tensor, bf16: bool) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        return time.perf_counter() - t


def measure_bf16_speedup(shape: tuple[int, int, int] = PROBE_SHAPE, repeats: int = REPEATS) -> float:
    """fp32 time / bf16-autocast time of one ``shape`` linear on the CPU (best of ``repeats``)."""
    rows, d_in, d_out = shape
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, d_in, generator=gen), torch.randn(d_out, d_in, generator=gen)
    _linear_seconds(x, w, bf16=False)  # warm-up: first-call allocation and kernel selection
    fp32 = _linear_seconds(x, w, bf16=False)
    bf16 = _linear_seconds(x, w, bf16=True)  # warm-up too (oneDNN builds its kernel)
    if bf16 > fp32:  # maybe only the warm-up's cost: one more call decides
        bf16 = _linear_seconds(x, w, bf16=True)
        if bf16 > 2 * fp32:  # emulated bf16: no need to time it again
            return fp32 / bf16
    for _ in range(repeats):
        fp32 = min(fp32, _linear_seconds(x, w, bf16=False))
        bf16 = min(bf16, _linear_seconds(x, w, bf16=True))
    return fp32 / max(bf16, 1e-9)


@functools.cache
def cpu_precision() -> CpuPrecision:
    """What "auto" picks on this CPU (measured once per process; see the module docstring)."""
    inherited = os.environ.get(_INHERITED)
    try:
        speedup = float(inherited) if inherited else measure_bf16_speedup()
    except ValueError:
        speedup = measure_bf16_speedup()
    os.environ[_INHERITED] = repr(speedup)
    return CpuPrecision("bf16" if speedup >= BF16_MIN_SPEEDUP else "no", speedup)
