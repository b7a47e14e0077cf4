"""Find target layers in any ``nn.Module``, wrap them, freeze the rest, and undo it.

Targets are matched by qualified module name: a plain name matches a module whose name equals
it or ends with ``.name``; a string that is not a plain name is a regular expression that must
match the whole qualified name; ``"all-linear"`` takes every supported linear layer except the
output head; ``None`` takes the per-architecture default of ``model.config.model_type``.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
from torch import nn

from asymlora.core.base import weight_of
from asymlora.core.config import AsymLoraConfig, pattern_matches
from asymlora.core.init import init_factor
from asymlora.core.layer import (
    DEFAULT_ADAPTER,
    LoraLinear,
    check_adapter_name,
    is_supported,
    linear_shape,
)
from asymlora.core.multi import install_routing, uninstall_routing
from asymlora.core.quant import (
    compute_dtype,
    dequantize_model,
    float_linear,
    float_weight,
    refuse_merge,
    scheme_of,
)
from asymlora.errors import UserError

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
    "mpnet": [["q", "v"]],  # MPNet's attention: attention.attn.{q,k,v,o}
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

PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def default_targets(model: nn.Module) -> list[str]:
    """The default target names for ``model``'s architecture (``model.config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise UserError(
            f"no default target modules for model_type={model_type!r}; pass target_modules "
            f"(names, a regex, or 'all-linear'). Architectures with defaults: {', '.join(sorted(DEFAULT_TARGETS))}"
        )
    names = [n for n, _ in model.named_modules()]
    for alternative in DEFAULT_TARGETS[model_type]:
        if all(any(name_matches(n, t) for n in names) for t in alternative):
            return list(alternative)
    raise UserError(
        f"none of the default targets for {model_type!r} ({DEFAULT_TARGETS[model_type]}) exist in "
        f"{type(model).__name__}; pass target_modules explicitly"
    )


def name_matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _matches_any(module_name: str, names: Sequence[str]) -> bool:
    return any(name_matches(module_name, n) for n in names)


def output_head_names(model: nn.Module) -> set[str]:
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

    An already adapted layer (``LoraLinear``) is a target itself (its ``.base`` is not listed),
    so a second named adapter finds the same layers as the first.
    Raises UserError when nothing matches, when a listed name matches no module while others
    do, or when a name matches only modules of an unsupported type. Works on ``meta`` models.
    """
    if target_modules is None:
        target_modules = default_targets(model)
    named = _candidate_modules(model)
    found: dict[str, nn.Module] = {}
    if target_modules == "all-linear":
        heads = output_head_names(model)
        for name, module in named:
            if _adaptable(module) and name not in heads and not _matches_any(name, exclude):
                found[name] = module
        if not found:
            raise UserError("target_modules='all-linear' found no nn.Linear or Conv1D layer in the model")
        return found
    if isinstance(target_modules, str) and not PLAIN_NAME.match(target_modules):
        pattern = re.compile(target_modules)
        for name, module in named:
            if pattern.fullmatch(name) and _adaptable(module) and not _matches_any(name, exclude):
                found[name] = module
        if not found:
            raise UserError(
                f"target_modules regex {target_modules!r} matched no linear layer; some linear layers: "
                f"{_sample_linear_names(named)}"
            )
        return found
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    for target in names:
        hits = [(n, m) for n, m in named if name_matches(n, target)]
        supported = [(n, m) for n, m in hits if _adaptable(m)]
        if not hits:
            raise UserError(
                f"target module {target!r} matches no module in {type(model).__name__}; some linear "
                f"layers: {_sample_linear_names(named)}"
            )
        if not supported:
            kinds = sorted({type(m).__name__ for _, m in hits})
            raise UserError(
                f"target module {target!r} matches only {', '.join(kinds)} modules; only nn.Linear and "
                "transformers Conv1D layers can be adapted"
            )
        for n, m in supported:
            if not _matches_any(n, exclude):
                found[n] = m
    if not found:
        raise UserError(f"target_modules {names} matched no linear layer outside modules_to_save")
    return found


def _adaptable(module: nn.Module) -> bool:
    return is_supported(module) or isinstance(module, LoraLinear)


def _candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named submodules, without the insides of adapted layers (``x.base`` of a LoraLinear ``x``)."""
    inner = {n + "." for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    return [(n, m) for n, m in model.named_modules() if n and not any(n.startswith(p) for p in inner)]


def _sample_linear_names(named: list[tuple[str, nn.Module]], limit: int = 8) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n, m in named if is_supported(m)})
    return ", ".join(short[:limit]) + (" ..." if len(short) > limit else "") if short else "(none)"


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Qualified name -> ``LoraLinear`` for every adapted layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def saved_modules_of(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for target in names:
        hits = {n: m for n, m in model.named_modules() if n and name_matches(n, target)}
        if not hits:
            raise UserError(f"modules_to_save entry {target!r} matches no module in {type(model).__name__}")
        found.update(hits)
    return found


def make_layer(name: str, base: nn.Module, config: AsymLoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> LoraLinear:
    """Build the ``LoraLinear`` for one base layer from the config (seeded factors)."""
    a, b = make_factors(name, base, config)
    return LoraLinear(base, a, b, scaling=config.scaling_for(name), train_A=config.trains_A,
                      train_B=config.trains_B, dropout=config.dropout, adapter_name=adapter_name)


def make_factors(name: str, base: nn.Module, config: AsymLoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for one base layer from the config: seeded, on the base's device, in
    ``factor_dtype``. The shape comes from ``in_features``/``out_features`` (a quantized base's
    weight is packed); the ``svd`` init reads the dequantized weight."""
    d_in, d_out = linear_shape(base)
    r = config.rank_for(name)
    if r > min(d_in, d_out):
        raise UserError(
            f"rank r={r} for layer {name!r} exceeds min(d_in, d_out) = min({d_in}, {d_out}); "
            f"use r <= {min(d_in, d_out)}"
        )
    device = weight_of(base).device
    factors = []
    for factor, init_name, shape in (("A", config.init_A, (r, d_in)), ("B", config.init_B, (d_out, r))):
        dtype = factor_dtype(base, config.trains_A if factor == "A" else config.trains_B)
        if device.type == "meta":
            factors.append(torch.empty(shape, device="meta", dtype=dtype))
            continue
        w = float_weight(base) if init_name == "svd" else None
        t = init_factor(init_name, shape, factor, config.seed, name, weight=w)
        factors.append(t.to(device=device, dtype=dtype))
    return factors[0], factors[1]


def factor_dtype(base: nn.Module, trained: bool) -> torch.dtype:
    """The dtype of a factor on ``base``: the dtype the base computes in (for a quantized base
    its compute dtype, ``asymlora.core.quant.compute_dtype``), except that a trained factor of a
    half-precision base is float32 — AdamW updates of a bf16 B lose most of their bits."""
    dtype = compute_dtype(base)
    if not dtype.is_floating_point:
        raise UserError(f"{type(base).__name__} computes in {dtype}; adapters need a floating-point base")
    return torch.float32 if trained and dtype in (torch.float16, torch.bfloat16) else dtype


def wrap(model: nn.Module, config: AsymLoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Add an adapter (named ``adapter_name``) to ``model`` in place and return it.

    Every base parameter is frozen; the trained factors and the parameters of
    ``config.modules_to_save`` require grad. All targets, ranks and shapes are checked before
    any module is replaced, so a bad config leaves the model untouched. More adapters:
    ``asymlora.adapters.add_adapter``.
    """
    if not isinstance(config, AsymLoraConfig):
        raise UserError(f"config must be an AsymLoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if lora_layers(model):
        raise UserError("model already has asymlora adapters; call asymlora.unload(model) first "
                         "(or asymlora.adapters.add_adapter to add a named one)")
    keep = saved_modules_of(model, config.modules_to_save)
    targets = plan_targets(model, config)
    # make_layer validates the ranks, so a bad config fails before the model is touched
    layers = {name: make_layer(name, module, config, adapter_name) for name, module in targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    for module in keep.values():
        for p in module.parameters():
            p.requires_grad_(True)
    state = adapter_state(model)
    state.asymlora_configs = {adapter_name: config}
    state.asymlora_active = (adapter_name,)
    state.asymlora_config = config
    install_routing(model)
    return model


def plan_targets(model: nn.Module, config: AsymLoraConfig) -> dict[str, nn.Module]:
    """The layers ``config`` adapts in ``model``, with its rank/alpha patterns checked against them."""
    targets = find_target_modules(model, config.target_modules, exclude=config.modules_to_save)
    for pattern_field in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(config, pattern_field):
            if not any(pattern_matches(pattern, n) for n in targets):
                raise UserError(
                    f"{pattern_field} key {pattern!r} matches none of the adapted layers "
                    f"(e.g. {next(iter(targets))!r})"
                )
    return targets


class AdapterState(Protocol):
    """The bookkeeping ``wrap`` puts on a model, as plain attributes of the ``nn.Module``."""

    asymlora_configs: dict[str, AsymLoraConfig]  # name -> config, in the order the adapters were added
    asymlora_active: tuple[str, ...]
    asymlora_config: AsymLoraConfig  # the first active adapter's, for code that reads PEFT's one config


def adapter_state(model: nn.Module) -> AdapterState:
    """``model`` seen as carrying :class:`AdapterState` (torch types an attribute it does not
    know as ``Tensor | Module``); reading an attribute of an unwrapped model still raises."""
    return cast(AdapterState, model)


def adapter_configs(model: nn.Module) -> dict[str, AsymLoraConfig]:
    """Adapter name -> config, in the order the adapters were added (the model's own dict)."""
    configs = getattr(model, "asymlora_configs", None)
    if not configs or not lora_layers(model):
        raise UserError("model has no asymlora adapters; call asymlora.wrap(model, config) first")
    return configs


def get_config(model: nn.Module, adapter_name: str | None = None) -> AsymLoraConfig:
    """The config of adapter ``adapter_name`` (default: the one active adapter)."""
    configs = adapter_configs(model)
    if adapter_name is None:
        active = list(adapter_state(model).asymlora_active)
        if len(active) != 1:
            raise UserError(f"{len(active)} adapters are active ({active}); pass adapter_name= to choose one")
        adapter_name = active[0]
    if adapter_name not in configs:
        raise UserError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    return configs[adapter_name]


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Re-apply the freezing of ``wrap`` (e.g. after code that set requires_grad everywhere):
    only the trained factors of the active adapters (and their modules_to_save) require grad."""
    configs = adapter_configs(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.set_active(layer.active)
    for name in adapter_state(model).asymlora_active:
        for module in saved_modules_of(model, configs[name].modules_to_save).values():
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


def merge_adapters(model: nn.Module, safe: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Fold ``adapter_names`` (default: the active adapters) into the base weights."""
    names = list(adapter_state(model).asymlora_active if adapter_names is None else adapter_names)
    _check_known(model, names)
    _refuse_quantized(model, names)
    for layer in lora_layers(model).values():
        if not layer.merged and any(n in layer.slots for n in names):
            layer.merge(safe=safe, adapter_names=names)
    return model


def _refuse_quantized(model: nn.Module, names: Sequence[str]) -> None:
    """Before any weight changes: refuse (``asymlora.core.quant.refuse_merge``) if a layer to merge
    into has a quantized base."""
    for name, layer in lora_layers(model).items():
        if any(n in layer.slots for n in names) and (scheme := scheme_of(layer.base)) is not None:
            raise refuse_merge(scheme, name)


def _check_known(model: nn.Module, names: Sequence[str]) -> None:
    known = getattr(model, "asymlora_configs", None) or {}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown adapter(s) {unknown}; the model has {sorted(known)}")


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
        set_submodule(model, name, layer.base)
    _forget_adapters(model)
    return model


def _forget_adapters(model: nn.Module) -> None:
    for attr in ("asymlora_config", "asymlora_configs", "asymlora_active"):
        if hasattr(model, attr):
            delattr(model, attr)
    uninstall_routing(model)


def merge_and_unload(model: nn.Module, safe: bool = True, adapter_names: Sequence[str] | None = None,
                     dequantize: bool = False) -> nn.Module:
    """Fold ``adapter_names`` (default: the active adapters) into the base weights and drop every
    wrapper (a plain model remains; the other adapters are discarded).

    With ``safe`` (default) every delta is checked for NaN/Inf before any weight changes.
    A quantized base (``asymlora.core.quant``) is refused unless ``dequantize``: then every adapted
    quantized base becomes a float ``nn.Linear`` with ``Ŵ + ΔW`` (``Ŵ`` = the dequantized
    weight: exactly the function the adapted model computed, up to the kernel's rounding), and
    every other quantized linear layer becomes float ``Ŵ`` too — a float model for export.
    """
    names = list(adapter_state(model).asymlora_active if adapter_names is None else adapter_names)
    _check_known(model, names)
    if not dequantize:
        _refuse_quantized(model, names)
    layers = lora_layers(model)
    if safe:
        for name, layer in layers.items():
            for adapter in (n for n in names if n in layer.slots):
                if not torch.isfinite(layer.delta_weight(adapter)).all():
                    raise UserError(f"refusing to merge: layer {name!r} has a NaN/Inf delta weight")
    for name, layer in layers.items():
        if dequantize and scheme_of(layer.base) is not None:
            layer.base = float_linear(layer.base)
        if not layer.merged and any(n in layer.slots for n in names):
            layer.merge(adapter_names=names)
        layer.merged = False  # the base now owns the merged weight
        set_submodule(model, name, layer.base)
    _forget_adapters(model)
    if dequantize:
        dequantize_model(model)
    return model


@dataclass
class ParameterReport:
    """Parameter counts of a wrapped model. ``total`` counts base parameters, adapter
    parameters and frozen adapter factors (buffers), each tensor once.

    With several named adapters: ``adapters`` maps each name to its own (trained, frozen)
    element counts (a shared frozen factor counted for every adapter that uses it), and
    ``adapter_held`` is what all adapters hold in memory, each tensor once — for K b-only
    adapters with one seed, one A plus K B's per layer (shared frozen factors save
    ``Σ adapters' frozen − held frozen`` numbers)."""

    total: int
    trainable: int
    adapter_trainable: int
    adapter_frozen: int
    other_trainable: int
    layers: list[tuple[str, int, int, int, str]] = field(default_factory=list)  # name, d_in, d_out, r, trained
    adapters: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (trained, frozen) numbers
    adapter_held: int = 0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def frozen_shared_saving(self) -> int:
        """Numbers not held thanks to shared frozen factors."""
        return sum(f for _, f in self.adapters.values()) - self.adapter_frozen

    def __str__(self) -> str:
        lines = [
            f"adapted layers        {len(self.layers)}",
            f"trainable parameters  {self.trainable:,} ({100 * self.trainable_fraction:.4f}% of {self.total:,})",
            f"  adapter (trained)   {self.adapter_trainable:,}",
            f"  other trained       {self.other_trainable:,}",
            f"adapter (frozen)      {self.adapter_frozen:,}",
        ]
        if len(self.adapters) > 1:
            lines.append(f"named adapters        {len(self.adapters)}, holding {self.adapter_held:,} numbers "
                         f"(shared frozen factors save {self.frozen_shared_saving:,})")
            lines += [f"  {name:<19} trained {t:,}, frozen {f:,}" for name, (t, f) in self.adapters.items()]
        return "\n".join(lines)


def _packed_numbers(model: nn.Module) -> int:
    """Weights that ``numel()`` does not see: a bitsandbytes 4-bit weight stores two per byte."""
    return sum(m.in_features * m.out_features - m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and scheme_of(m) in ("nf4", "fp4"))


def parameter_report(model: nn.Module) -> ParameterReport:
    layers = lora_layers(model)
    per_adapter: dict[str, list[int]] = {}
    held: dict[int, tuple[int, bool]] = {}  # id(tensor) -> (numel, trained)
    for layer in layers.values():
        for adapter in layer.slots:
            counts = per_adapter.setdefault(adapter, [0, 0])
            for factor in ("A", "B"):
                t = layer.factor(adapter, factor)
                trained = layer.trains(adapter, factor)
                counts[0 if trained else 1] += t.numel()
                held[id(t)] = (t.numel(), trained)
    adapter_params = {i for i, (_, trained) in held.items() if trained}
    adapter_frozen = sum(n for n, trained in held.values() if not trained)
    params = list(model.parameters())
    total = sum(p.numel() for p in params) + adapter_frozen + _packed_numbers(model)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    adapter_trainable = sum(p.numel() for p in params if p.requires_grad and id(p) in adapter_params)
    rows = []
    for n, layer in layers.items():
        adapter = layer.active[0] if layer.active else next(iter(layer.slots))
        trained_factors = "".join(f for f in ("A", "B") if layer.trains(adapter, f))
        rows.append((n, layer.in_features, layer.out_features, layer.slots[adapter].r, trained_factors))
    return ParameterReport(total, trainable, adapter_trainable, adapter_frozen, trainable - adapter_trainable, rows,
                           {k: (v[0], v[1]) for k, v in per_adapter.items()}, sum(n for n, _ in held.values()))
