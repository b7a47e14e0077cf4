"""Benchmarks 1 and 2: time and peak memory of one training step, all variants side by side.

For each model family × rank × target set, every variant of ``benchmarks.models.VARIANTS``
is built from the same random base, timed interleaved (shuffled order per round), then one
more step runs under the memory meter (``benchmarks.common``).
"""
from __future__ import annotations

import gc
import time

import torch

from .common import (
    SavedTensorMeter,
    cuda_peak,
    grad_bytes,
    interleaved_times,
    load_average,
    model_storages,
    optimizer_state_bytes,
    summarize,
    weight_bytes,
)
from .models import VARIANTS, build_base, build_variant, forward_loss, make_inputs


def measure_memory(variant, inputs: torch.Tensor) -> dict:
    """One training step under the saved-tensor meter (and the CUDA peak counter if any)."""
    model, opt = variant.model, variant.optimizer
    if opt is not None:
        opt.zero_grad(set_to_none=True)
    emb = inputs.detach().requires_grad_(variant.input_grad)
    meter = SavedTensorMeter(exclude=model_storages(model))
    with cuda_peak() as cuda:
        with meter:
            loss = forward_loss(model, emb)
        activations = meter.bytes
        loss.backward()
        if opt is not None:
            opt.step()
    del loss
    row = {
        "activation_bytes": activations,
        "weight_bytes": weight_bytes(model),
        "grad_bytes": grad_bytes(model),
        "optimizer_bytes": optimizer_state_bytes(opt),
    }
    row["tracked_peak_bytes"] = sum(row.values())
    if "peak_bytes" in cuda:
        row["cuda_peak_bytes"] = cuda["peak_bytes"]
    return row


def run_group(kind: str, r: int, targets: str, quick: bool, repeats: int, variants=VARIANTS) -> dict:
    base, shapes = build_base(kind, quick)
    inputs = make_inputs(shapes)
    built = {name: build_variant(name, base, kind, r, targets) for name in variants}
    del base
    steps = {name: v.step_fn(inputs) for name, v in built.items()}
    load_before = load_average()
    t0 = time.perf_counter()
    times = interleaved_times(steps, repeats=repeats, warmup=1, seed=r)
    elapsed = time.perf_counter() - t0
    summary = summarize(times, ref="floor")
    for name, row in summary.items():
        vs_peft = summarize({name: times[name], "peft-lora": times["peft-lora"]}, ref="peft-lora")[name]
        row["wall_ratio_vs_peft-lora"] = vs_peft["wall_ratio_vs_peft-lora"]
        row["cpu_ratio_vs_peft-lora"] = vs_peft["cpu_ratio_vs_peft-lora"]
        row["trainable_params"] = built[name].trainable
        row["adapted_layers"] = built[name].n_adapted
        row["memory"] = measure_memory(built[name], inputs)
        row["raw_wall_s"] = times[name]["wall"]
        row["raw_cpu_s"] = times[name]["cpu"]
    out = {
        "model": kind,
        "r": r,
        "targets": targets,
        "tokens": shapes["batch"] * shapes["seq"],
        "shapes": shapes,
        "repeats": repeats,
        "seconds": elapsed,
        "load_average": [load_before, load_average()],
        "variants": summary,
    }
    del built, steps
    gc.collect()
    return out


def run(quick: bool = False, repeats: int | None = None, log=print) -> list[dict]:
    repeats = repeats or (2 if quick else 7)
    groups = []
    for kind in ("bert", "llama"):
        for targets in ("qv", "all-linear"):
            for r in (8, 64) if not quick else (8,):
                g = run_group(kind, r, targets, quick, repeats)
                v = g["variants"]
                log(
                    f"  train {kind:5s} r={r:<3d} {targets:10s} floor {v['floor']['wall_s']:.3f}s  "
                    + "  ".join(
                        f"{n} {v[n]['wall_ratio_vs_floor']:.3f}xF/{v[n]['wall_ratio_vs_peft-lora']:.3f}xP"
                        for n in ("asym-b-only", "peft-lora", "peft-lora-frozenA")
                    )
                    + f"  ({g['seconds']:.0f}s)"
                )
                groups.append(g)
    return groups
