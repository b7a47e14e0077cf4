"""Benchmark 6: mixed-adapter batches — K task adapters on one base, one forward pass.

Model: the LLaMA-shaped stack of ``benchmarks.models`` (hidden 1024, FFN 2816, GQA 16/4 heads), but
**1 decoder layer** instead of 4 and 64 rows × 16 tokens instead of 64 × 128, so that 14
candidates × 4 rounds fit in a few minutes on one core (8 min on the shared, loaded VM). Every linear layer of the
block is adapted (7 layers: q, k, v, o, gate, up, down), r = 16, alpha = 32; per-layer costs and
the adapter/base flop ratio (≈ r·(d_in+d_out)/(d_in·d_out), 3 % here) do not depend on the
number of layers or tokens.

Candidates, all in the same interleaved rounds (eval, ``torch.inference_mode``):
  bare             the base model, no adapter
  asym-single      asymlora, one b-only adapter, plain forward (the fused addmm path)
  peft-single      PEFT, one LoRA adapter
  asym-mixed-K     asymlora, 64 b-only adapters (one seed) loaded, rows routed to K of them
                   (row i -> adapter i mod K: interleaved, so the gathered batched matmul runs)
  asym-grouped-K   the same rows sorted by adapter (segment matmul, nothing copied), K = 16, 64
  peft-mixed-K     PEFT, 64 LoRA adapters loaded, ``adapter_names`` with the same rows
K ∈ {1, 4, 16, 64}. Adapter overhead = time(candidate) − time(bare), per round (paired).
Memory: the numbers held by K loaded adapters, each tensor once (``parameter_report``'s
``adapter_held`` for asymlora, the ``lora_A``/``lora_B`` weights of K adapters for PEFT).
"""
from __future__ import annotations

import copy
import statistics

import torch

import asymlora
from asymlora.core.adapters import add_adapter
from asymlora.core.inject import lora_layers

from .common import interleaved_times, summarize
from .common import spread as _spread
from .models import build_base, make_inputs, target_names

KS = (1, 4, 16, 64)
# Overheads are ~3 % of the forward: judged on process CPU time (1 thread), which other jobs on
# the shared cores do not inflate; wall-clock figures are kept beside them.
CLOCK = "cpu"
GROUPED_KS = (16, 64)


def shapes_for(quick: bool) -> dict:
    if quick:
        return dict(kind="llama", layers=1, rows=8, seq=4, r=4, ks=(1, 2, 8), grouped=(8,))
    return dict(kind="llama", layers=1, rows=64, seq=16, r=16, ks=KS, grouped=GROUPED_KS)


def _randomize(tensors, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)


def build_ours(base, names: list[str], r: int, n_adapters: int):
    model = copy.deepcopy(base)
    cfg = asymlora.AsymLoraConfig.preset("b-only", r=r, alpha=2 * r, target_modules=names)
    asymlora.wrap(model, cfg, adapter_name="t0")
    for k in range(1, n_adapters):
        add_adapter(model, f"t{k}", cfg)
    for k in range(n_adapters):
        _randomize([layer.factor(f"t{k}", "B") for layer in lora_layers(model).values()], seed=k)
    return model.eval()


def build_peft(base, names: list[str], r: int, n_adapters: int, ours):
    """PEFT with the same factors as ``ours`` (A shared in ours is copied into each PEFT adapter)."""
    from peft import LoraConfig, get_peft_model

    pcfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=names, bias="none")
    model = get_peft_model(copy.deepcopy(base), pcfg, adapter_name="t0")
    for k in range(1, n_adapters):
        model.add_adapter(f"t{k}", pcfg)
    mods = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            for k in range(n_adapters):
                a, b = layer.factors(f"t{k}")
                mods[name].lora_A[f"t{k}"].weight.copy_(a)
                mods[name].lora_B[f"t{k}"].weight.copy_(b)
    return model.eval()


def adapter_memory(ours, peft_model, k: int) -> dict:
    """Numbers held by the first k adapters, each storage once."""
    seen: dict[int, int] = {}
    for layer in lora_layers(ours).values():
        for j in range(k):
            for t in layer.factors(f"t{j}"):
                seen[t.untyped_storage().data_ptr()] = t.numel()
    theirs = sum(p.numel() for n, p in peft_model.named_parameters()
                 if (".lora_A." in n or ".lora_B." in n) and n.split(".")[-2] in {f"t{j}" for j in range(k)})
    ours_n = sum(seen.values())
    return {"asym_numbers": ours_n, "peft_numbers": theirs, "ratio": ours_n / theirs}


def cost_model(layers: list[tuple[int, int]], rows: int, seq: int, r: int, k: int) -> dict:
    """Flops, moved numbers and kernel launches of the adapter part, per forward (all layers).

    ours (gathered): A·x for all rows (2·N·r·d_in flops, N = rows·seq), stack of K B's and
    per-row gather ((K + rows)·r·d_out numbers), one baddbmm (2·N·r·d_out): ~4 launches/layer.
    ours (grouped): the same flops, nothing copied, 1 + K launches/layer.
    PEFT: the same flops; per adapter a copy of its rows of x, a delta temporary, a scaled copy
    and an indexed read-add-write of the output: N·(d_in + 4·d_out) numbers moved, ~7·K
    launches/layer, plus a Python scan of all rows per adapter per layer (K·rows steps).
    """
    n = rows * seq
    base = sum(2 * n * di * do for di, do in layers)
    flops = sum(2 * n * r * (di + do) for di, do in layers)
    return {
        "base_flops": base,
        "adapter_flops": flops,
        "adapter_flops_fraction": flops / base,
        "ours_gathered_moved": sum((k + rows) * r * do for _, do in layers) if k > 1 else 0,
        "ours_gathered_launches": len(layers) * (2 if k == 1 else 4),
        "ours_grouped_launches": len(layers) * (1 + k),
        "peft_moved": sum(n * (di + 4 * do) for di, do in layers),
        "peft_launches": len(layers) * 7 * k,
        "peft_python_row_steps": len(layers) * k * rows,
    }


def run(quick: bool = False, repeats: int | None = None, log=print) -> dict:
    spec = shapes_for(quick)
    repeats = repeats or (2 if quick else 4)
    base, shapes = build_base(spec["kind"], quick)
    if not quick:
        from transformers import LlamaConfig, LlamaModel

        cfg = LlamaConfig(vocab_size=128, max_position_embeddings=2048, hidden_size=shapes["hidden_size"],
                          num_hidden_layers=spec["layers"], num_attention_heads=shapes["num_attention_heads"],
                          num_key_value_heads=shapes["num_key_value_heads"],
                          intermediate_size=shapes["intermediate_size"])
        torch.manual_seed(0)
        base = LlamaModel(cfg)
    base.eval().requires_grad_(False)
    shapes = dict(shapes, batch=spec["rows"], seq=spec["seq"])
    names = target_names(base, spec["kind"], "all-linear")
    r, n_max = spec["r"], max(spec["ks"])
    ours = build_ours(base, names, r, n_max)
    single = build_ours(base, names, r, 1)
    peft_model = build_peft(base, names, r, n_max, ours)
    peft_single = build_peft(base, names, r, 1, single)
    x = make_inputs(shapes)
    rows = spec["rows"]

    def fwd(model, adapter_names=None):
        kwargs = {} if adapter_names is None else {"adapter_names": adapter_names}

        def f():
            with torch.inference_mode():
                return model(inputs_embeds=x, **kwargs).last_hidden_state
        return f

    routes = {k: [f"t{i % k}" for i in range(rows)] for k in spec["ks"]}
    cands = {"bare": fwd(base), "asym-single": fwd(single), "peft-single": fwd(peft_single)}
    for k, route in routes.items():
        cands[f"asym-mixed-{k}"] = fwd(ours, route)
        cands[f"peft-mixed-{k}"] = fwd(peft_model, route)
        if k in spec["grouped"]:
            cands[f"asym-grouped-{k}"] = fwd(ours, sorted(route, key=lambda n: int(n[1:])))
    checks = {k: float((cands[f"asym-mixed-{k}"]() - cands[f"peft-mixed-{k}"]()).abs().max()) for k in spec["ks"]}
    times = interleaved_times(cands, repeats=repeats, warmup=1, seed=6)
    summary = summarize(times, ref="bare")
    def overhead(name: str, clock: str = CLOCK) -> list[float]:
        return [t - b for t, b in zip(times[name][clock], times["bare"][clock])]

    def med(xs: list[float]) -> float:
        return float(statistics.median(xs))

    layer_shapes = [(layer.in_features, layer.out_features) for layer in lora_layers(single).values()]
    single_over = overhead("asym-single")
    sweep = []
    for k in spec["ks"]:
        ours_over, peft_over = overhead(f"asym-mixed-{k}"), overhead(f"peft-mixed-{k}")
        row = {
            "K": k,
            "asym_ms": 1e3 * summary[f"asym-mixed-{k}"]["cpu_s"],
            "peft_ms": 1e3 * summary[f"peft-mixed-{k}"]["cpu_s"],
            "asym_wall_overhead_ms": 1e3 * med(overhead(f"asym-mixed-{k}", "wall")),
            "peft_wall_overhead_ms": 1e3 * med(overhead(f"peft-mixed-{k}", "wall")),
            "asym_overhead_ms": 1e3 * med(ours_over),
            "peft_overhead_ms": 1e3 * med(peft_over),
            "overhead_ratio_vs_peft": med([o / p for o, p in zip(ours_over, peft_over)]),
            "time_ratio_vs_single": med([t / s for t, s in zip(times[f"asym-mixed-{k}"][CLOCK],
                                                               times["asym-single"][CLOCK])]),
            "overhead_ratio_vs_single": med(ours_over) / med(single_over),
            "throughput_rows_per_s": rows / summary[f"asym-mixed-{k}"]["cpu_s"],
            "peft_throughput_rows_per_s": rows / summary[f"peft-mixed-{k}"]["cpu_s"],
            "max_abs_diff_vs_peft": checks[k],
            "memory": adapter_memory(ours, peft_model, k),
            "cost_model": cost_model(layer_shapes, rows, spec["seq"], r, k),
        }
        if k in spec["grouped"]:
            g_over = overhead(f"asym-grouped-{k}")
            row["grouped_overhead_ms"] = 1e3 * med(g_over)
            row["grouped_overhead_ratio_vs_peft"] = med([o / p for o, p in zip(g_over, peft_over)])
            row["grouped_time_ratio_vs_single"] = med([t / s for t, s in zip(times[f"asym-grouped-{k}"][CLOCK],
                                                                             times["asym-single"][CLOCK])])
        sweep.append(row)
        log(f"  K={k:3d}  ours {row['asym_ms']:.1f} ms (overhead {row['asym_overhead_ms']:.1f})  "
            f"PEFT {row['peft_ms']:.1f} ms (overhead {row['peft_overhead_ms']:.1f})  "
            f"ratio {row['overhead_ratio_vs_peft']:.2f}  ×single {row['time_ratio_vs_single']:.3f}  "
            f"memory {row['memory']['ratio']:.3f}")
    return {
        "model": f"llama-shaped, {spec['layers']} layer, hidden {shapes['hidden_size']}, "
                 f"FFN {shapes['intermediate_size']}",
        "rows": rows, "seq": spec["seq"], "r": r, "targets": "all-linear", "adapted_layers": len(layer_shapes),
        "layer_shapes": layer_shapes,
        "clock": CLOCK, "bare_ms": 1e3 * summary["bare"]["cpu_s"], "bare_noise": _spread(times["bare"][CLOCK]),
        "single_ms": 1e3 * summary["asym-single"]["cpu_s"], "single_overhead_ms": 1e3 * med(single_over),
        "peft_single_overhead_ms": 1e3 * med(overhead("peft-single")),
        "sweep": sweep, "variants": summary, "raw_s": times,
    }
