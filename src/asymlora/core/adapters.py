"""Many named adapters on one base model: add, switch, delete, list — and shared frozen factors.

    model = asymlora.wrap(base, cfg)                        # adapter "default"
    asymlora.adapters.add_adapter(model, "topics", cfg_topics)       # a second one, inactive
    asymlora.load_adapter(model, "out/sentiment", adapter_name="sentiment")
    asymlora.adapters.set_adapter(model, "topics")                   # or several: ["topics", "sentiment"]
    asymlora.adapters.delete_adapter(model, "default")

Shared frozen factors. A b-only adapter's A is drawn from (seed, layer name, init, rank), so
every b-only adapter made with the same seed and rank has the same A in a layer. When an
adapter is added, each of its frozen factors is compared with the frozen factors already held
by the layer: one with the same shape, dtype and device and an identical fingerprint
(``asymlora.core.init.fingerprint``: SHA-256 of the values — verified, not assumed from the config)
is reused, so the layer registers that one tensor under both adapters' names. K such adapters
hold one A and K B's per layer (``parameter_report`` shows it), and a mixed batch computes
A·x once for all their rows (``asymlora.core.multi``). A different seed gives a different A and its
own buffer. The same holds for the frozen B of a-only adapters.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from asymlora.core.config import AsymLoraConfig
from asymlora.core.init import fingerprint, fingerprints_match
from asymlora.core.inject import (
    adapter_configs,
    adapter_state,
    get_config,
    lora_layers,
    make_factors,
    plan_targets,
    set_submodule,
)
from asymlora.core.layer import LoraLinear, check_adapter_name
from asymlora.core.multi import router_of
from asymlora.errors import UserError


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    return list(getattr(model, "asymlora_configs", None) or {})


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, "asymlora_active", ()))


def check_new_adapter(model: nn.Module, name: str, config: AsymLoraConfig) -> None:
    check_adapter_name(name)
    configs = adapter_configs(model)
    if name in configs:
        raise UserError(f"adapter {name!r} already exists (adapters: {list(configs)}); delete it or pick another name")
    if config.modules_to_save:
        raise UserError(
            f"adapter {name!r} has modules_to_save={config.modules_to_save}: only the first adapter of a model "
            "may train whole modules; keep per-task heads outside the model for extra named adapters"
        )


def shared_frozen(
    layer: LoraLinear, candidate: torch.Tensor | None, recorded: dict | None = None
) -> torch.Tensor | None:
    """A frozen factor already held by ``layer`` that equals ``candidate`` (by fingerprint), or
    that matches the fingerprint ``recorded`` in an adapter file; else None."""
    want = fingerprint(candidate) if candidate is not None else recorded
    if want is None:
        return None
    for name in layer.slots:
        for factor in ("A", "B"):
            held = layer.factor(name, factor)
            if isinstance(held, nn.Parameter) or list(held.shape) != list(want["shape"]):
                continue
            if candidate is not None and (held.dtype != candidate.dtype or held.device != candidate.device):
                continue
            have = fingerprint(held)
            same = have["sha256"] == want["sha256"] if candidate is not None else fingerprints_match(want, have)
            if same:
                return held
    return None


def attach(model: nn.Module, name: str, module_name: str, module: nn.Module, a: torch.Tensor, b: torch.Tensor,
           config: AsymLoraConfig, scaling: float) -> None:
    """Add adapter ``name``'s factors to one layer (wrapping a plain layer), sharing frozen ones."""
    if isinstance(module, LoraLinear):
        if not config.trains_A:
            a = _first(shared_frozen(module, a), a)
        if not config.trains_B:
            b = _first(shared_frozen(module, b), b)
        module.add_adapter(name, a, b, scaling, config.trains_A, config.trains_B, config.dropout)
        module.set_active(module.active)
    else:
        layer = LoraLinear(module, a, b, scaling, config.trains_A, config.trains_B, config.dropout, adapter_name=name)
        layer.set_active([n for n in adapter_state(model).asymlora_active if n in layer.slots])
        layer.router = router_of(model)
        set_submodule(model, module_name, layer)


def _first(shared: torch.Tensor | None, own: torch.Tensor) -> torch.Tensor:
    return own if shared is None else shared


def add_adapter(model: nn.Module, adapter_name: str, config: AsymLoraConfig) -> nn.Module:
    """Add a new, inactive adapter ``adapter_name`` built from ``config`` (seeded factors).

    Its frozen factors are shared with existing adapters where they are identical (module
    docstring). Layers it targets that no adapter had yet are wrapped. Everything is checked
    before the model changes.
    """
    if not isinstance(config, AsymLoraConfig):
        raise UserError(f"config must be an AsymLoraConfig, got {type(config).__name__}")
    check_new_adapter(model, adapter_name, config)
    targets = plan_targets(model, config)
    factors = {n: make_factors(n, _base(m), config) for n, m in targets.items()}  # validates ranks
    for n, module in targets.items():
        attach(model, adapter_name, n, module, *factors[n], config, config.scaling_for(n))
    adapter_state(model).asymlora_configs[adapter_name] = config
    return model


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoraLinear) else module


def set_adapter(model: nn.Module, adapter_names: str | Sequence[str]) -> nn.Module:
    """Make ``adapter_names`` (one name or several, whose updates then add up) the active ones.

    Trained factors of the active adapters require grad, those of the others do not; frozen
    factors are buffers and stay frozen through every switch.
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    configs = adapter_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown or not names:
        raise UserError(f"cannot activate {unknown or names}: the model has adapters {list(configs)}")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise UserError("adapters are merged into the base weights; unmerge them before switching")
    for layer in lora_layers(model).values():
        layer.set_active(names)
    state = adapter_state(model)
    state.asymlora_active = tuple(names)
    state.asymlora_config = configs[names[0]]
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove adapter ``adapter_name``; a layer left without adapters becomes its base again.

    Deleting the last adapter is refused (``asymlora.unload`` removes everything). If the
    deleted adapter was active, the remaining active ones stay active, or else the first
    remaining adapter becomes active.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise UserError(f"no adapter named {adapter_name!r}; the model has {list(configs)}")
    if len(configs) == 1:
        raise UserError(f"{adapter_name!r} is the model's only adapter; use asymlora.unload(model) to remove it")
    layers = lora_layers(model)
    if any(adapter_name in layer.merged_adapters for layer in layers.values()):
        raise UserError(f"adapter {adapter_name!r} is merged into the base weights; unmerge it first")
    for module_name, layer in layers.items():
        if adapter_name in layer.slots:
            layer.delete_adapter(adapter_name)
            if not layer.slots:
                set_submodule(model, module_name, layer.base)
    del configs[adapter_name]
    remaining = [n for n in adapter_state(model).asymlora_active if n != adapter_name] or [next(iter(configs))]
    return set_adapter(model, remaining)


def adapter_config(model: nn.Module, adapter_name: str | None = None) -> AsymLoraConfig:
    """The config of ``adapter_name`` (default: the single active adapter)."""
    return get_config(model, adapter_name)
