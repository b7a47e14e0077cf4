"""Memory of fine-tuning LLaMA-2-7B on a fp16, nf4 or int8 base: asymlora b-only vs PEFT LoRA.

``python -m benchmarks.quant_memory [-o benchmarks]`` prints the table of BENCHMARKS.md (and, with
``--output-dir/-o DIR``, writes it to ``DIR/results-quant-memory.md``).

Counted: bytes held for the whole run, activations excluded (they depend on batch and length;
``benchmarks/layer_memory.py`` measures them per token).

  base       the frozen model: every weight in fp16, or its decoder linear layers quantized
             (``asymlora.core.quant.linears_to_quantize``: not the embeddings, norms or lm_head, which
             stay fp16, as transformers' bitsandbytes loader does too)
  trained    trained factors in fp32 + their fp32 gradients + AdamW's exp_avg and exp_avg_sq
             (fp32) = 16 bytes per number, + AdamW's 4-byte ``step`` tensor per trained tensor
  frozen     asymlora's frozen factor (a buffer): r·d_in numbers per layer in the base's
             compute dtype (``asymlora.core.inject.factor_dtype``): 2 bytes for a fp16 base and for
             a bf16-compute nf4 base, 4 bytes for LLM.int8 (it has no float dtype of its own and
             LLaMA's layers no bias, so the frozen factor is float32)

Bytes of one quantized linear layer with n = d_in·d_out weights (bitsandbytes 0.50; the layout
is checked against real layers in ``tests/test_quant_memory.py``):

  nf4 (blocks of 64, double quantization)   ⌈n/2⌉ packed 4-bit codes + nb uint8 block scales
      (nb = ⌈n/64⌉) + 4·⌈nb/256⌉ fp32 second-level scales + 4 (offset) + 64 (16-entry code)
      + 1024 (256-entry code of the second level)
  int8 (LLM.int8)                            n int8 codes + 4·d_out (fp32 row scales)

Shapes come from ``LlamaForCausalLM(LlamaConfig(<Llama-2-7B>))`` built on the meta device:
nothing is allocated. The same functions applied to a tiny model equal the bytes of its real
tensors (the test), so the 7B numbers are what these rules give at that size.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .common import _unique_bytes, table_parser, table_script

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
BASES = ("fp16", "nf4", "int8")
METHODS = ("asymlora b-only", "PEFT LoRA")
TARGETS = {"q,v": ["q_proj", "v_proj"], "all-linear": "all-linear"}
FROZEN_BYTES = {"fp16": 2, "nf4": 2, "int8": 4, "fp32": 4}  # bytes per number of the frozen factor (see above)


@dataclass(frozen=True)
class Shapes:
    """What the counts need from a model: the quantizable linear layers (d_in, d_out), the numbers
    held outside them, and the adapted layers (d_in, d_out) of each target set."""

    quantized: tuple[tuple[int, int], ...]
    other_numbers: int
    targets: dict[str, tuple[tuple[int, int], ...]]


def shapes_of(model: nn.Module) -> Shapes:
    """``Shapes`` of a (meta or real, float) model."""
    from asymlora.core.inject import find_target_modules
    from asymlora.core.layer import linear_shape
    from asymlora.core.quant import linears_to_quantize

    names = linears_to_quantize(model)
    quantized = tuple(linear_shape(model.get_submodule(n)) for n in names)
    inside = sum(d_in * d_out for d_in, d_out in quantized)
    other = sum(p.numel() for p in model.parameters()) - inside  # LLaMA's linear layers have no bias
    targets = {k: tuple(linear_shape(m) for m in find_target_modules(model, spec).values())
               for k, spec in TARGETS.items()}
    return Shapes(quantized, other, targets)


def llama2_7b_shapes() -> Shapes:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return shapes_of(LlamaForCausalLM(LlamaConfig(**LLAMA2_7B)))


# ---------------------------------------------------------------------------- the rules
def quantized_layer_bytes(d_in: int, d_out: int, base: str) -> int:
    """Bytes of one linear layer's weight under ``base`` (see the module docstring)."""
    n = d_in * d_out
    if base == "fp16":
        return 2 * n
    if base == "fp32":
        return 4 * n
    if base == "nf4":
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 64 + 1024
    if base == "int8":
        return n + 4 * d_out
    raise ValueError(f"unknown base {base!r}; valid: {', '.join(BASES)}, fp32")


def base_bytes(shapes: Shapes, base: str, other_bytes_per_number: int = 2) -> int:
    """The frozen model: quantized linear layers + everything else at ``other_bytes_per_number``."""
    quantized = sum(quantized_layer_bytes(i, o, base) for i, o in shapes.quantized)
    return quantized + other_bytes_per_number * shapes.other_numbers


def trained_numbers(layers: Iterable[tuple[int, int]], method: str, r: int) -> tuple[int, int]:
    """(trained numbers, trained tensors): b-only trains B (d_out·r), LoRA A and B (r·(d_in+d_out))."""
    layers = list(layers)
    if method == "asymlora b-only":
        return sum(r * o for _, o in layers), len(layers)
    if method == "PEFT LoRA":
        return sum(r * (i + o) for i, o in layers), 2 * len(layers)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def trained_bytes(layers: Iterable[tuple[int, int]], method: str, r: int) -> int:
    """fp32 parameters + fp32 gradients + AdamW (exp_avg, exp_avg_sq fp32, a 4-byte step per tensor)."""
    numbers, tensors = trained_numbers(layers, method, r)
    return 16 * numbers + 4 * tensors


def frozen_bytes(layers: Iterable[tuple[int, int]], method: str, r: int, bytes_per_number: int) -> int:
    """asymlora b-only's frozen A (r·d_in per layer); PEFT LoRA has no frozen factor."""
    return bytes_per_number * sum(r * i for i, _ in layers) if method == "asymlora b-only" else 0


# ---------------------------------------------------------------------------- measuring real tensors
def _leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding ``t``'s data (a torchao tensor is a wrapper around several)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if callable(flatten) and type(t).__module__.startswith("torchao"):
        for name in flatten()[0]:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _leaves(inner)
        return
    yield t


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """The weights a module holds directly: parameters and bitsandbytes quantization state (not
    buffers: rotary tables and the like are not weights; adapter buffers are counted apart)."""
    for t in module.parameters(recurse=False):
        yield from _leaves(t)
    state = getattr(getattr(module, "weight", None), "quant_state", None)  # bitsandbytes 4-bit
    while state is not None:
        yield from (v for v in vars(state).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
    lt_state = getattr(module, "state", None)  # bitsandbytes LLM.int8 (scales move here on first call)
    for name in ("CB", "SCB"):
        for holder in (lt_state, getattr(module, "weight", None)):
            t = getattr(holder, name, None)
            if isinstance(t, torch.Tensor):
                yield t


def measured_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Real bytes of a model after an optimizer step: ``trained`` (trained tensors, their grads,
    the optimizer's state), ``frozen`` (adapter buffers ``lora_A``/``lora_B``), ``base`` (all
    the rest, quantization state included), each storage counted once."""
    trained = [p for p in model.parameters() if p.requires_grad]
    ids = {id(p) for p in trained}
    state = [v for p in trained for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]
    frozen = [b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith(("lora_A", "lora_B"))]
    frozen_ids = {id(b) for b in frozen}
    base = [t for m in model.modules() for t in _module_tensors(m) if id(t) not in ids | frozen_ids]
    return {"trained": _unique_bytes(trained + [p.grad for p in trained] + state),
            "frozen": _unique_bytes(frozen), "base": _unique_bytes(base)}


# ---------------------------------------------------------------------------- the table
def table(shapes: Shapes, ranks: tuple[int, ...] = (16, 64)) -> list[dict]:
    rows = []
    for target, layers in shapes.targets.items():
        for base in BASES:
            held = base_bytes(shapes, base)
            for r in ranks:
                for method in METHODS:
                    numbers, _ = trained_numbers(layers, method, r)
                    t, f = trained_bytes(layers, method, r), frozen_bytes(layers, method, r, FROZEN_BYTES[base])
                    rows.append({"targets": target, "base": base, "r": r, "method": method,
                                 "trained_numbers": numbers, "trained_bytes": t, "frozen_bytes": f, "base_bytes": held,
                                 "total_bytes": held + t + f})
    return rows


def markdown(rows: list[dict]) -> str:
    mib, gib = 2 ** 20, 2 ** 30
    lines = ["| targets | base | r | method | trained numbers | trained + grads + AdamW | frozen factor "
             "| base weights | total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['targets']} | {row['base']} | {row['r']} | {row['method']} "
                     f"| {row['trained_numbers']:,} | {row['trained_bytes'] / mib:,.1f} MiB "
                     f"| {row['frozen_bytes'] / mib:,.1f} MiB | {row['base_bytes'] / gib:.3f} GiB "
                     f"| {row['total_bytes'] / gib:.3f} GiB |")
    return "\n".join(lines)


def report() -> str:
    shapes = llama2_7b_shapes()
    return (f"LLaMA-2-7B: {sum(i * o for i, o in shapes.quantized):,} numbers in {len(shapes.quantized)} "
            f"quantizable linear layers, {shapes.other_numbers:,} elsewhere\n\n" + markdown(table(shapes)))


FILENAME = "results-quant-memory.md"


def build_parser() -> argparse.ArgumentParser:
    return table_parser(__doc__.splitlines()[0], FILENAME)


def main(argv: list[str] | None = None) -> int:
    return table_script(build_parser(), FILENAME, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())
