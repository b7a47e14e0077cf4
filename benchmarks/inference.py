"""Benchmark 5: inference latency after ``asymlora.merge_and_unload`` vs the base model.

Same architecture, same inputs, ``eval()`` + ``torch.inference_mode()``, interleaved rounds.
The merged model carries a non-zero ΔW (B drawn at random), and its output is checked against
the unmerged adapter's. Unmerged asymlora and PEFT adapters are timed for reference.
"""
from __future__ import annotations

import copy

import torch

import asymlora
from asymlora.core.inject import lora_layers

from .common import interleaved_times, summarize
from .models import build_base, make_inputs, target_names


def run(quick: bool = False, repeats: int | None = None, log=print) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    repeats = repeats or (3 if quick else 15)
    rows = []
    for kind in ("bert", "llama"):
        base, shapes = build_base(kind, quick)
        base.eval()
        names = target_names(base, kind, "all-linear")
        r = 8 if quick else 64
        adapted = asymlora.wrap(copy.deepcopy(base), asymlora.AsymLoraConfig.preset("b-only", r=r, alpha=2 * r,
                                                                                    target_modules=names))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in lora_layers(adapted).values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
        adapted.eval()
        merged = asymlora.merge_and_unload(copy.deepcopy(adapted))
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=names))
        peft_model.eval()
        x = make_inputs(shapes)

        def fwd(m, inputs=x):  # this iteration's inputs, bound now
            def f():
                with torch.inference_mode():
                    return m(inputs_embeds=inputs).last_hidden_state
            return f

        with torch.inference_mode():
            y_adapted, y_merged = fwd(adapted)(), fwd(merged)()
        max_err = float((y_adapted - y_merged).abs().max())
        cands = {"base": fwd(base), "merged": fwd(merged), "asym-unmerged": fwd(adapted),
                 "peft-unmerged": fwd(peft_model)}
        times = interleaved_times(cands, repeats=repeats, warmup=2, seed=3)
        summary = summarize(times, ref="base")
        noise = summary["base"]["wall_spread"]
        ratio = summary["merged"]["wall_ratio_vs_base"]
        row = {"model": kind, "targets": "all-linear", "r": r, "tokens": shapes["batch"] * shapes["seq"],
               "max_abs_diff_merged_vs_unmerged": max_err, "variants": summary,
               "raw_wall_s": {k: v["wall"] for k, v in times.items()}, "base_noise": noise}
        log(f"  inference {kind:5s} base {summary['base']['wall_s'] * 1e3:.1f} ms  merged {ratio:.3f}x  "
            f"unmerged asym {summary['asym-unmerged']['wall_ratio_vs_base']:.3f}x  peft "
            f"{summary['peft-unmerged']['wall_ratio_vs_base']:.3f}x  "
            f"(noise ±{100 * noise:.1f}%, max|Δy| {max_err:.1e})")
        rows.append(row)
    return rows
