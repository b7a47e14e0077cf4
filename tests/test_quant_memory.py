"""The memory table of BENCHMARKS.md (``benchmarks/quant_memory.py``) counts bytes by rules from
layer shapes; here the same rules, applied to tiny Llama models, must equal the bytes of the real
tensors — base weights with their quantization state, trained factors with gradients and AdamW
state, frozen factors — after a real training step, for asymlora b-only and PEFT LoRA."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

import asymlora
from asymlora.core import quant
from asymlora.core.inject import find_target_modules
from conftest import require, tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.quant_memory import (  # noqa: E402
    METHODS,
    TARGETS,
    base_bytes,
    frozen_bytes,
    llama2_7b_shapes,
    measured_bytes,
    shapes_of,
    table,
    trained_bytes,
)


def _adapt(model, method: str, names: list[str], r: int):
    if method == "asymlora b-only":
        return asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=r, target_modules=names))
    peft = require("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=names))


@pytest.mark.parametrize("base", ["fp16", "nf4", "int8"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("targets", list(TARGETS))
def test_counted_bytes_equal_real_tensors(base, method, targets, tokens):
    r = 4
    model = tiny_llama()
    shapes = shapes_of(model)
    names = sorted(find_target_modules(model, TARGETS[targets]))
    if base == "fp16":
        model.half()
    else:
        quant.quantize_model(model, base)
    model = _adapt(model.train(), method, names, r)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cast from torch.float32 to float16.*")
        model(tokens).logits.float().pow(2).mean().backward()
    opt.step()
    real = measured_bytes(model, opt)
    number = 2 if base == "fp16" else 4  # the tiny quantized models compute in float32
    layers = shapes.targets[targets]
    assert real == {"base": base_bytes(shapes, base, other_bytes_per_number=number),
                    "trained": trained_bytes(layers, method, r),
                    "frozen": frozen_bytes(layers, method, r, number)}


def test_llama2_7b_shapes_and_table():
    shapes = llama2_7b_shapes()  # meta device: nothing allocated
    assert len(shapes.quantized) == 224 and len(shapes.targets["q,v"]) == 64
    assert sum(i * o for i, o in shapes.quantized) + shapes.other_numbers == 6_738_415_616  # LLaMA-2-7B
    rows = {(x["targets"], x["base"], x["r"], x["method"]): x for x in table(shapes)}
    b_only, lora = rows[("q,v", "fp16", 16, "asymlora b-only")], rows[("q,v", "fp16", 16, "PEFT LoRA")]
    assert b_only["trained_numbers"] * 2 == lora["trained_numbers"] == 16 * 8192 * 64
    assert rows[("q,v", "nf4", 16, "PEFT LoRA")]["base_bytes"] < 0.3 * lora["base_bytes"]
