"""Benchmark 3: adapter initialisation for LLaMA-2-7B-shaped layers.

32 layers × {q,k,v,o: 4096→4096; gate, up: 4096→11008; down: 11008→4096} = 224 layers.

asymlora (b-only): per layer, A = seeded Haar-orthonormal r×d_in (QR of a d_in×r Gaussian,
``asymlora.core.init.init_factor``) and B = 0. Every layer is timed, nothing extrapolated. The layer
names and shapes come from a LLaMA-2-7B config instantiated on the ``meta`` device (no
weights; ``asymlora.core.inject.find_target_modules`` works there).

Paper's code (LoRASYM, reimplemented): per layer, W ~ U(−0.5, 0.5)^{d_out×d_in}, then a full
``torch.linalg.svd(W)`` (``full_matrices=True``, the default the paper's code uses), A = first r
right singular vectors. The SVD is timed once per distinct shape — 4096×4096 and 11008×4096 —
and extrapolated to the 224 layers; the 4096×11008 (down) layers are counted at the measured
11008×4096 cost (the same singular value problem, transposed). Quick mode scales every
dimension down 16× and extrapolates the same way.
"""
from __future__ import annotations

import time

import torch

from asymlora.core.init import init_factor, single_thread


def llama2_7b_layers(scale: int = 1) -> list[tuple[str, int, int]]:
    """(qualified name, d_in, d_out) of the 224 target layers, from a meta-device model."""
    from transformers import LlamaConfig, LlamaModel

    from asymlora.core.inject import find_target_modules
    from asymlora.core.layer import linear_shape

    cfg = LlamaConfig(hidden_size=4096 // scale, intermediate_size=11008 // scale, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000 // scale)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    targets = find_target_modules(model, "all-linear")
    return [(n, *linear_shape(m)) for n, m in targets.items()]


def paper_init(d_in: int, d_out: int, r: int) -> torch.Tensor:
    w = torch.rand(d_out, d_in) - 0.5
    _u, _s, vh = torch.linalg.svd(w)  # full_matrices=True, as in the paper's code
    return vh[:r].clone()


def run(quick: bool = False, log=print) -> dict:
    scale = 16 if quick else 1
    layers = llama2_7b_layers(scale)
    out: dict = {"layers": len(layers), "scale_down": scale, "ranks": {}}
    for r in (8, 64):
        t0 = time.perf_counter()
        for name, d_in, d_out in layers:
            init_factor("orthogonal", (r, d_in), "A", 0, name)
            init_factor("zero", (d_out, r), "B", 0, name)
        ours = time.perf_counter() - t0
        with single_thread():  # the proposed init.py change, measured the same way
            t0 = time.perf_counter()
            same = True
            for name, d_in, d_out in layers:
                init_factor("orthogonal", (r, d_in), "A", 0, name)
                init_factor("zero", (d_out, r), "B", 0, name)
            proposed = time.perf_counter() - t0
        with torch.no_grad():  # single-threaded QR gives the same factor (float32 bits) as the threaded one
            name, d_in, _ = layers[-1]
            ref = init_factor("orthogonal", (r, d_in), "A", 0, name)
            with single_thread():
                same = bool(torch.equal(ref, init_factor("orthogonal", (r, d_in), "A", 0, name)))
        out["ranks"][r] = {"asymlora_total_s": ours, "asymlora_per_layer_ms": 1e3 * ours / len(layers),
                           "proposed_single_thread_qr_total_s": proposed, "proposed_identical_factor": same}
        log(f"  init r={r}: asymlora {ours:.3f}s (single-threaded QR: {proposed:.3f}s) for {len(layers)} layers")
    shapes: dict[tuple[int, int], int] = {}
    for _n, d_in, d_out in layers:
        key = (max(d_in, d_out), min(d_in, d_out))  # a (m×n) SVD costs the same as (n×m)
        shapes[key] = shapes.get(key, 0) + 1
    svd_times = {}
    for (big, small), count in sorted(shapes.items()):
        t0 = time.perf_counter()
        paper_init(small, big, 8)
        svd_times[f"{big}x{small}"] = {"seconds": time.perf_counter() - t0, "layers": count}
        log(f"  init paper-SVD {big}x{small}: {svd_times[f'{big}x{small}']['seconds']:.2f}s × {count} layers")
    paper_total = sum(v["seconds"] * v["layers"] for v in svd_times.values())
    out["paper_svd"] = {"per_shape": svd_times, "extrapolated_total_s": paper_total}
    for r, row in out["ranks"].items():
        row["speedup_vs_paper"] = paper_total / row["asymlora_total_s"]
        row["proposed_speedup_vs_paper"] = paper_total / row["proposed_single_thread_qr_total_s"]
        log(f"  init r={r}: asymlora {row['asymlora_total_s']:.3f}s for {len(layers)} layers; paper SVD "
            f"≈{paper_total:.0f}s (extrapolated) -> {row['speedup_vs_paper']:.0f}x")
    return out
