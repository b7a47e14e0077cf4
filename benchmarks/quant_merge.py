"""How much of an adapter's update survives a merge into a quantized base: Q(Ŵ + ΔW) vs Ŵ + ΔW.

``python -m benchmarks.quant_merge [-o benchmarks]`` prints the table of BENCHMARKS.md (and, with
``--output-dir/-o DIR``, writes it to ``DIR/results-quant-merge.md``).

W: a 1024×1024 weight, N(0, 0.02²) entries (LLaMA's init scale); Ŵ = dequant(Q(W)) is the base the
adapter was trained on. ΔW = B·A with A a random orthonormal 16×1024 (asymlora's frozen factor)
and B Gaussian, scaled so that ‖ΔW‖_F = ρ·‖W‖_F for ρ in {1e-3, 1e-2, 1e-1}. A merge into the
quantized base stores Q(Ŵ + ΔW); what it gets wrong is

    lost = ‖dequant(Q(Ŵ + ΔW)) − (Ŵ + ΔW)‖_F / ‖ΔW‖_F

(0: the update is kept exactly; 1: as wrong as dropping the update; above 1: worse than
dropping it — the re-rounding also moves weights the update did not touch). Three seeds,
mean reported. Quantizers: bitsandbytes nf4/fp4 (blocks of 64, double quantization) and
LLM.int8 row-wise int8, torchao int8 weight-only, each through the library's own functions.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from .common import table_parser, table_script

RATIOS = (1e-3, 1e-2, 1e-1)


def quantizers() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """scheme -> (W ↦ dequant(Q(W))) through each backend's own quantize/dequantize."""
    import bitsandbytes.functional as bf

    def four_bit(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def q(w: torch.Tensor) -> torch.Tensor:
            packed, state = bf.quantize_4bit(w, quant_type=kind, compress_statistics=True)
            return bf.dequantize_4bit(packed, state)
        return q

    def int8(w: torch.Tensor) -> torch.Tensor:
        codes, scales, _ = bf.int8_vectorwise_quant(w.half())
        return bf.int8_vectorwise_dequant(codes, scales)

    def torchao_int8(w: torch.Tensor) -> torch.Tensor:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        layer = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
        layer[0].weight.data = w.clone()
        quantize_(layer, Int8WeightOnlyConfig())
        return layer[0].weight.dequantize()

    return {"nf4": four_bit("nf4"), "fp4": four_bit("fp4"), "int8": int8, "torchao-int8": torchao_int8}


def lost_fraction(q: Callable[[torch.Tensor], torch.Tensor], ratio: float, seed: int, d: int = 1024,
                  r: int = 16) -> tuple[float, float]:
    """(lost fraction of ΔW, relative error ‖Ŵ − W‖/‖W‖ of the base itself) for one draw."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=g) * 0.02
    a = torch.linalg.qr(torch.randn(d, r, generator=g))[0].T
    delta = torch.randn(d, r, generator=g) @ a
    delta *= ratio * w.norm() / delta.norm()
    w_hat = q(w)
    merged = q(w_hat + delta)
    return float((merged - (w_hat + delta)).norm() / delta.norm()), float((w_hat - w).norm() / w.norm())


def measure(seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, dict]:
    out = {}
    for scheme, q in quantizers().items():
        rows = {ratio: [lost_fraction(q, ratio, s) for s in seeds] for ratio in RATIOS}
        out[scheme] = {"base_error": sum(b for v in rows.values() for _, b in v) / (len(seeds) * len(RATIOS)),
                       "lost": {ratio: sum(x for x, _ in v) / len(v) for ratio, v in rows.items()}}
    return out


def markdown(results: dict[str, dict]) -> str:
    head = " | ".join(f"lost at ‖ΔW‖ = {ratio:g}·‖W‖" for ratio in RATIOS)
    lines = [f"| scheme | base error ‖Ŵ−W‖/‖W‖ | {head} |", "|---" * (2 + len(RATIOS)) + "|"]
    for scheme, res in results.items():
        lost = " | ".join(f"{100 * res['lost'][ratio]:.0f} %" for ratio in RATIOS)
        lines.append(f"| {scheme} | {100 * res['base_error']:.2f} % | {lost} |")
    return "\n".join(lines)


FILENAME = "results-quant-merge.md"


def build_parser() -> argparse.ArgumentParser:
    return table_parser(__doc__.splitlines()[0], FILENAME)


def main(argv: list[str] | None = None) -> int:
    return table_script(build_parser(), FILENAME, lambda: markdown(measure()), argv)


if __name__ == "__main__":
    raise SystemExit(main())
