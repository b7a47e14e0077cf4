"""Config-built models (random weights) and the adapter variants we compare.

Shapes: ``bert`` has BERT-base's widths (hidden 768, 12 heads, FFN 3072) with fewer layers;
``llama`` is LLaMA-shaped (RMSNorm, SwiGLU, rotary, grouped-query attention 16/4 heads,
hidden 1024, FFN 2816). The benchmarks run the bare encoder/decoder stack (``BertModel`` /
``LlamaModel``, no vocabulary head) on ``inputs_embeds``, so the time is spent where adapters
live; the loss is mean(h²) of the last hidden state.

Variants (one training step = forward + backward + AdamW step):
  floor              the frozen model, no adapter, gradient flowing to ``inputs_embeds``
                     (the least work any adapter can do: backprop through every layer)
  asym-b-only        asymlora preset "b-only" (A frozen orthonormal buffer, B trained)
  asym-lora          asymlora preset "lora" (A and B trained)
  peft-lora          PEFT LoraConfig, A and B trained
  peft-lora-frozenA  PEFT LoRA with every ``lora_A`` set requires_grad=False by hand
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import asymlora
from asymlora.core.inject import find_target_modules, lora_layers

VARIANTS = ["floor", "asym-b-only", "asym-lora", "peft-lora", "peft-lora-frozenA"]

# target sets: name -> per-model module names (suffixes) or "all-linear"
QV = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def model_shapes(kind: str, quick: bool) -> dict:
    if kind == "bert":
        if quick:
            return dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=256,
                        batch=2, seq=16)
        return dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                    batch=4, seq=128)
    if kind == "llama":
        if quick:
            return dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=176, batch=2, seq=16)
        return dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                    intermediate_size=2816, batch=2, seq=128)
    raise ValueError(f"unknown model kind {kind!r}; valid: 'bert', 'llama'")


def build_base(kind: str, quick: bool, seed: int = 0) -> tuple[nn.Module, dict]:
    """A randomly initialised bare transformer stack of the given family, in train mode."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    shapes = model_shapes(kind, quick)
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(vocab_size=128, max_position_embeddings=512,
                         **{k: v for k, v in shapes.items() if k not in ("batch", "seq")})
        model = BertModel(cfg, add_pooling_layer=False)
    else:
        cfg = LlamaConfig(vocab_size=128, max_position_embeddings=2048,
                          **{k: v for k, v in shapes.items() if k not in ("batch", "seq")})
        model = LlamaModel(cfg)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, shapes


def target_names(model: nn.Module, kind: str, targets: str) -> list[str]:
    """Fully qualified names of the layers to adapt (the same list goes to asymlora and PEFT)."""
    spec = "all-linear" if targets == "all-linear" else QV[kind]
    return sorted(find_target_modules(model, spec))


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    input_grad: bool  # the floor: gradient flows to inputs_embeds
    n_adapted: int
    trainable: int

    def step_fn(self, inputs: torch.Tensor) -> Callable[[], float]:
        model, opt, input_grad = self.model, self.optimizer, self.input_grad

        def step() -> float:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            emb = inputs.detach().requires_grad_(input_grad)
            loss = forward_loss(model, emb)
            loss.backward()
            if opt is not None:
                opt.step()
            return float(loss.detach())

        return step


def forward_loss(model: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=emb)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.float().pow(2).mean()


def make_inputs(shapes: dict, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shapes["batch"], shapes["seq"], shapes["hidden_size"], generator=g)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4)


def build_variant(name: str, base: nn.Module, kind: str, r: int, targets: str, dropout: float = 0.0) -> Variant:
    """A deep copy of ``base`` with adapter variant ``name`` (see module docstring)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    model = copy.deepcopy(base)
    names = target_names(model, kind, targets)
    if name == "floor":
        return Variant(name, model, None, True, 0, 0)
    if name.startswith("asym"):
        preset = "lora" if name == "asym-lora" else "b-only"
        cfg = asymlora.AsymLoraConfig.preset(preset, r=r, alpha=2 * r, seed=0, target_modules=names,
                                             dropout=dropout)
        asymlora.wrap(model, cfg)
        n = len(lora_layers(model))
    else:
        from peft import LoraConfig, get_peft_model

        pcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=names, bias="none")
        model = get_peft_model(model, pcfg)
        if name == "peft-lora-frozenA":
            for pname, p in model.named_parameters():
                if "lora_A" in pname:
                    p.requires_grad_(False)
        n = sum(1 for pname, _ in model.named_parameters() if pname.endswith("lora_B.default.weight"))
        model.train()
    if n != len(names):
        raise RuntimeError(f"{name}: adapted {n} layers, expected {len(names)}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Variant(name, model, _optimizer(model), False, n, trainable)
