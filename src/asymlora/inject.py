"""Find target layers in any ``nn.Module``, wrap them, freeze the rest, and undo it.

Targets are matched by qualified module name: a plain name matches a module whose name equals
it or ends with ``.name``; a string that is not a plain name is a regular expression that must
match the whole qualified name; ``"all-linear"`` takes every supported linear layer except the
output head; ``None`` takes the per-architecture default of ``model.config.model_type``.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from .config import AsymLoraConfig, pattern_matches
from .init import init_factor
from .layer import LoraLinear, dense_weight, is_supported, linear_shape

# Attention projections adapted by default, per transformers model_type (the usual
# "query and value" choice of the LoRA paper, which the asymmetry paper also uses for GLUE).
# Several alternatives where transformers renamed the layers between versions (ViT: query/value
# in 4.x, q_proj/v_proj in 5.x): the first whose names all exist in the model is used.
DEFAULT_TARGETS: dict[str, list[list[str]]] = {
    "bert": [["query", "value"]],
    "roberta": [["query", "value"]],
    "xlm-roberta": [["query", "value"]],
    "deberta-v2": [["query_proj", "value_proj"]],
    "distilbert": [["q_lin", "v_lin"]],
    "electra": [["query", "value"]],
    "vit": [["query", "value"], ["q_proj", "v_proj"]],
    "bart": [["q_proj", "v_proj"]],
    "mbart": [["q_proj", "v_proj"]],
    "llama": [["q_proj", "v_proj"]],
    "mistral": [["q_proj", "v_proj"]],
    "qwen2": [["q_proj", "v_proj"]],
    "gemma": [["q_proj", "v_proj"]],
    "opt": [["q_proj", "v_proj"]],
    "gpt2": [["c_attn"]],
    "t5": [["q", "v"]],
    "mt5": [["q", "v"]],
}

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def default_targets(model: nn.Module) -> list[str]:
    """The default target names for ``model``'s architecture (``model.config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default target modules for model_type={model_type!r}; pass target_modules "
            f"(names, a regex, or 'all-linear'). Architectures with defaults: {', '.join(sorted(DEFAULT_TARGETS))}"
        )
    names = [n for n, _ in model.named_modules()]
    for alternative in DEFAULT_TARGETS[model_type]:
        if all(any(_name_matches(n, t) for n in names) for t in alternative):
            return list(alternative)
    raise ValueError(
        f"none of the default targets for {model_type!r} ({DEFAULT_TARGETS[model_type]}) exist in "
        f"{type(model).__name__}; pass target_modules explicitly"
    )


def _name_matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _matches_any(module_name: str, names: Sequence[str]) -> bool:
    return any(_name_matches(module_name, n) for n in names)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (lm_head etc.), which 'all-linear' leaves alone."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            heads.add(name)
    return heads


def find_target_modules(
    model: nn.Module,
    target_modules: Sequence[str] | str | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, nn.Module]:
    """Map qualified name -> supported linear module for every target in ``model``.

    Raises ValueError when nothing matches, when a listed name matches no module while others
    do, or when a name matches only modules of an unsupported type. Works on ``meta`` models.
    """
    if target_modules is None:
        target_modules = default_targets(model)
    named = [(n, m) for n, m in model.named_modules() if n]
    found: dict[str, nn.Module] = {}
    if target_modules == "all-linear":
        heads = _output_head_names(model)
        for name, module in named:
            if is_supported(module) and name not in heads and not _matches_any(name, exclude):
                found[name] = module
        if not found:
            raise ValueError("target_modules='all-linear' found no nn.Linear or Conv1D layer in the model")
        return found
    if isinstance(target_modules, str) and not _PLAIN_NAME.match(target_modules):
        pattern = re.compile(target_modules)
        for name, module in named:
            if pattern.fullmatch(name) and is_supported(module) and not _matches_any(name, exclude):
                found[name] = module
        if not found:
            raise ValueError(
                f"target_modules regex {target_modules!r} matched no linear layer; some linear layers: "
                f"{_sample_linear_names(named)}"
            )
        return found
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    for target in names:
        hits = [(n, m) for n, m in named if _name_matches(n, target)]
        supported = [(n, m) for n, m in hits if is_supported(m)]
        if not hits:
            raise ValueError(
                f"target module {target!r} matches no module in {type(model).__name__}; some linear "
                f"layers: {_sample_linear_names(named)}"
            )
        if not supported:
            kinds = sorted({type(m).__name__ for _, m in hits})
            raise ValueError(
                f"target module {target!r} matches only {', '.join(kinds)} modules; only nn.Linear and "
                "transformers Conv1D layers can be adapted"
            )
        for n, m in supported:
            if not _matches_any(n, exclude):
                found[n] = m
    if not found:
        raise ValueError(f"target_modules {names} matched no linear layer outside modules_to_save")
    return found


def _sample_linear_names(named: list[tuple[str, nn.Module]], limit: int = 8) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n, m in named if is_supported(m)})
    return ", ".join(short[:limit]) + (" ..." if len(short) > limit else "") if short else "(none)"


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Qualified name -> ``LoraLinear`` for every adapted layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _modules_to_save(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for target in names:
        hits = {n: m for n, m in model.named_modules() if n and _name_matches(n, target)}
        if not hits:
            raise ValueError(f"modules_to_save entry {target!r} matches no module in {type(model).__name__}")
        found.update(hits)
    return found


def make_layer(name: str, base: nn.Module, config: AsymLoraConfig) -> LoraLinear:
    """Build the ``LoraLinear`` for one base layer from the config (seeded factors)."""
    d_in, d_out = linear_shape(base)
    r = config.rank_for(name)
    if r > min(d_in, d_out):
        raise ValueError(
            f"rank r={r} for layer {name!r} exceeds min(d_in, d_out) = min({d_in}, {d_out}); "
            f"use r <= {min(d_in, d_out)}"
        )
    weight = base.weight
    device, dtype = weight.device, weight.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"layer {name!r} has a {dtype} weight; quantised bases are not supported yet")
    factors = []
    for factor, init_name, shape in (("A", config.init_A, (r, d_in)), ("B", config.init_B, (d_out, r))):
        # A trained factor of a half-precision base stays float32: AdamW updates of a bf16 B
        # lose most of their bits. A frozen factor takes the base dtype (memory, speed).
        trained = config.trains_A if factor == "A" else config.trains_B
        factor_dtype = torch.float32 if trained and dtype in (torch.float16, torch.bfloat16) else dtype
        if device.type == "meta":
            factors.append(torch.empty(shape, device="meta", dtype=factor_dtype))
            continue
        w = dense_weight(base) if init_name == "svd" else None
        t = init_factor(init_name, shape, factor, config.seed, name, weight=w)
        factors.append(t.to(device=device, dtype=factor_dtype))
    return LoraLinear(
        base,
        factors[0],
        factors[1],
        scaling=config.scaling_for(name),
        train_A=config.trains_A,
        train_B=config.trains_B,
        dropout=config.dropout,
    )


def wrap(model: nn.Module, config: AsymLoraConfig) -> nn.Module:
    """Add adapters to ``model`` in place and return it.

    Every base parameter is frozen; the trained factors and the parameters of
    ``config.modules_to_save`` require grad. All targets, ranks and shapes are checked before
    any module is replaced, so a bad config leaves the model untouched.
    """
    if not isinstance(config, AsymLoraConfig):
        raise TypeError(f"config must be an AsymLoraConfig, got {type(config).__name__}")
    if lora_layers(model):
        raise ValueError("model already has asymlora adapters; call asymlora.unload(model) first")
    keep = _modules_to_save(model, config.modules_to_save)
    targets = find_target_modules(model, config.target_modules, exclude=config.modules_to_save)
    for pattern_field in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(config, pattern_field):
            if not any(pattern_matches(pattern, n) for n in targets):
                raise ValueError(
                    f"{pattern_field} key {pattern!r} matches none of the adapted layers "
                    f"(e.g. {next(iter(targets))!r})"
                )
    layers = {name: make_layer(name, module, config) for name, module in targets.items()}  # validates ranks
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    for module in keep.values():
        for p in module.parameters():
            p.requires_grad_(True)
    model.asymlora_config = config  # type: ignore[assignment]
    return model


def get_config(model: nn.Module) -> AsymLoraConfig:
    config = getattr(model, "asymlora_config", None)
    if config is None or not lora_layers(model):
        raise ValueError("model has no asymlora adapters; call asymlora.wrap(model, config) first")
    return config


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Re-apply the freezing of ``wrap`` (e.g. after code that set requires_grad everywhere)."""
    config = get_config(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        for p in layer.parameters(recurse=False):
            p.requires_grad_(True)
    for module in _modules_to_save(model, config.modules_to_save).values():
        for p in module.parameters():
            p.requires_grad_(True)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base function; states are restored after."""
    layers = lora_layers(model)
    before = {n: layer.disabled for n, layer in layers.items()}
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for n, layer in layers.items():
            layer.disabled = before[n]


def merge_adapters(model: nn.Module, safe: bool = False) -> nn.Module:
    for layer in lora_layers(model).values():
        if not layer.merged:
            layer.merge(safe=safe)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters (unmerging first if needed): the base model comes back."""
    for name, layer in lora_layers(model).items():
        if layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base)
    if hasattr(model, "asymlora_config"):
        del model.asymlora_config
    return model


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Fold every adapter into its base weight and drop the wrappers (a plain model remains).

    With ``safe`` (default) every delta is checked for NaN/Inf before any weight changes.
    """
    layers = lora_layers(model)
    if safe:
        for name, layer in layers.items():
            if not torch.isfinite(layer.delta_weight()).all():
                raise ValueError(f"refusing to merge: layer {name!r} has a NaN/Inf delta weight")
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        layer.merged = False  # the base now owns the merged weight
        _set_submodule(model, name, layer.base)
    if hasattr(model, "asymlora_config"):
        del model.asymlora_config
    return model


@dataclass
class ParameterReport:
    """Parameter counts of a wrapped model. ``total`` counts base parameters, adapter
    parameters and frozen adapter factors (buffers)."""

    total: int
    trainable: int
    adapter_trainable: int
    adapter_frozen: int
    other_trainable: int
    layers: list[tuple[str, int, int, int, str]] = field(default_factory=list)  # name, d_in, d_out, r, trained

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [
            f"adapted layers        {len(self.layers)}",
            f"trainable parameters  {self.trainable:,} ({100 * self.trainable_fraction:.4f}% of {self.total:,})",
            f"  adapter (trained)   {self.adapter_trainable:,}",
            f"  other trained       {self.other_trainable:,}",
            f"adapter (frozen)      {self.adapter_frozen:,}",
        ]
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    layers = lora_layers(model)
    adapter_params = {id(p) for layer in layers.values() for p in layer.parameters(recurse=False)}
    adapter_trainable = sum(p.numel() for layer in layers.values() for p in layer.parameters(recurse=False)
                            if p.requires_grad)
    adapter_frozen = sum(b.numel() for layer in layers.values() for n, b in layer.named_buffers(recurse=False)
                         if n in ("lora_A", "lora_B"))
    params = list(model.parameters())
    total = sum(p.numel() for p in params) + adapter_frozen
    trainable = sum(p.numel() for p in params if p.requires_grad)
    other = sum(p.numel() for p in params if p.requires_grad and id(p) not in adapter_params)
    rows = [
        (n, layer.in_features, layer.out_features, layer.r,
         "".join(f for f, t in (("A", layer.train_A), ("B", layer.train_B)) if t))
        for n, layer in layers.items()
    ]
    return ParameterReport(total, trainable, adapter_trainable, adapter_frozen, other, rows)
