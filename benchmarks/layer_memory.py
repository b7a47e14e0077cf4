"""Benchmark 2b: activation memory a single adapted layer keeps for backward, per token.

One ``d_in → d_out`` linear layer inside a network (its input requires grad), T tokens.
Counted: bytes of saved-for-backward tensors that are not weights (``SavedTensorMeter``),
divided by T. Expected (float32, 4 bytes/number):

  frozen base alone ............ 0            (a frozen weight needs no input for its grad)
  b-only, dropout 0 ............ 4·r          (A·x, for B's gradient: O(r), not O(d_in))
  b-only, dropout p > 0 ........ 4·r + 4·d_in (+ the dropout mask: float32 on CPU, where dropout is
                                              x·noise and saves noise; 1 byte/number on CUDA)
  LoRA (A trained) ............. 4·r + 4·d_in (x itself, for A's gradient)
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import asymlora

from .common import SavedTensorMeter, model_storages


def _saved_per_token(module: nn.Module, x: torch.Tensor) -> tuple[float, list]:
    meter = SavedTensorMeter(exclude=model_storages(module))
    xin = x.detach().requires_grad_(True)
    with meter:
        y = module(xin)
    y.sum().backward()
    return meter.bytes / x.shape[0], meter.records


def build(kind: str, base: nn.Linear, r: int, dropout: float) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(base))
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "floor":
        return model
    if kind in ("b-only", "lora"):
        cfg = asymlora.AsymLoraConfig.preset(kind, r=r, alpha=2 * r, target_modules=["0"], dropout=dropout)
        return asymlora.wrap(model, cfg)
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"]))
    if kind == "peft-lora-frozenA":
        for n, p in pm.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    pm.train()
    return pm


CASES = [
    ("floor", 0.0),
    ("b-only", 0.0),
    ("b-only", 0.1),
    ("lora", 0.0),
    ("peft-lora", 0.0),
    ("peft-lora", 0.1),
    ("peft-lora-frozenA", 0.0),
]


def run(quick: bool = False, log=print) -> list[dict]:
    d_in, d_out, tokens = (64, 48, 32) if quick else (1024, 1024, 2048)
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    x = torch.randn(tokens, d_in)
    rows = []
    for r in (8, 64) if not quick else (8,):
        for kind, p in CASES:
            per_token, records = _saved_per_token(build(kind, base, r, p), x)
            rows.append({
                "variant": kind, "dropout": p, "r": r, "d_in": d_in, "d_out": d_out, "tokens": tokens,
                "saved_bytes_per_token": per_token,
                "saved_numbers_per_token_fp32": per_token / 4,
                "saved": [{"shape": list(s), "dtype": dt, "bytes": b} for s, dt, b in records],
            })
            log(f"  layer-memory r={r:<3d} {kind:18s} p={p:<4} {per_token:8.1f} B/token "
                f"({per_token / 4:.1f} fp32 numbers; d_in={d_in})")
    return rows
