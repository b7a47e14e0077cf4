"""Which base weights an adapter was trained on, and whether a model has them.

An adapter is a correction to one set of base weights: on another model of the same shapes (a
sibling fine-tune, a random init, a coarse quantization) it loads without a word and computes
nonsense. So ``save_adapter`` records a *sketch* of the adapted layers' base weights, and loading
compares it with the model's.

The sketch of a layer's weight W (d_out × d_in, as dequantized, with any merged adapter taken
out) is three numbers: ‖W‖_F and two random bilinear probes vₖᵀ·W·uₖ, with uₖ, vₖ standard
Gaussian vectors from a fixed seed. A probe has standard deviation ‖W‖_F over the draws of u, v,
so for another weight W' the difference |vᵀ(W − W')u| / ‖W‖_F is of the order of
‖W − W'‖_F / ‖W‖_F. Casting W to bf16 changes each entry by at most 2⁻⁹ of itself, which moves
the normalised probes by about 10⁻³; the layers match when every number of every layer agrees to
``TOLERANCE`` = 10⁻² of ‖W‖_F, so the same weights at another float precision count as the same
base, while a random init (differences of order 1) or a fine-tune that moved the weights by a
few percent do not. Cost: one matrix–vector product per probe and layer, computed once per save
or load.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from asymlora.core.layer import LoraLinear
from asymlora.core.quant import float_weight
from asymlora.errors import BaseMismatchWarning, UserError

__all__ = ["SKETCH", "TOLERANCE", "base_sketch", "sketch_difference", "check_base", "check_same_base"]

SKETCH = "norm+2probes/v1"
TOLERANCE = 1e-2
_SEED = 20240607


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The base weight of a layer as a float64 (d_out × d_in) matrix, with any adapter merged into
    it taken out (a wrapped layer), dequantized (a quantized one)."""
    if not isinstance(module, LoraLinear):
        return float_weight(module).detach().double()
    w = float_weight(module.base).detach().double()
    for name in module.merged_adapters:
        a, b = module.factors(name)
        w = w - module.slots[name].scaling * (b.detach().double() @ a.detach().double())
    return w


def _layer_sketch(w: torch.Tensor) -> list[float]:
    d_out, d_in = w.shape
    g = torch.Generator().manual_seed(_SEED)
    probes = []
    for _ in range(2):
        u = torch.randn(d_in, generator=g, dtype=torch.float64).to(w.device)
        v = torch.randn(d_out, generator=g, dtype=torch.float64).to(w.device)
        probes.append(float(v @ (w @ u)))
    return [float(torch.linalg.norm(w))] + probes


def _sharded(module: nn.Module) -> bool:
    """Whether this process holds only a shard of the layer's base weight: an FSDP2 ``DTensor``, or
    DeepSpeed ZeRO-3's empty placeholder. Sketching it would need a collective on every rank, while
    an adapter is saved by the main process alone."""
    w = getattr(module.base if isinstance(module, LoraLinear) else module, "weight", None)
    return w is not None and (type(w).__name__ == "DTensor" or w.numel() == 0)


def base_sketch(model: nn.Module, layer_names: list[str]) -> dict[str, Any] | None:
    """The sketch of the base weights of ``layer_names`` (wrapped or plain layers of ``model``);
    None when the weights are sharded across processes (no record: such a file loads unchecked,
    like one written before the record existed)."""
    modules = dict(model.named_modules())
    names = [n for n in sorted(layer_names) if n in modules]
    if any(_sharded(modules[n]) for n in names):
        return None
    with torch.no_grad():
        return {"sketch": SKETCH, "layers": {n: _layer_sketch(_base_weight(modules[n])) for n in names}}


def sketch_difference(recorded: dict[str, Any], now: dict[str, Any]) -> float:
    """The largest difference between two sketches, relative to each layer's recorded ‖W‖_F
    (inf when they cover other layers)."""
    a, b = recorded.get("layers") or {}, now.get("layers") or {}
    if set(a) != set(b):
        return math.inf
    worst = 0.0
    for name, sa in a.items():
        scale = max(abs(float(sa[0])), 1e-30)
        worst = max(worst, max(abs(float(x) - float(y)) / scale for x, y in zip(sa, b[name])))
    return worst


def check_base(meta: dict[str, Any], model: nn.Module, where: str, strict: bool = False) -> None:
    """Compare the base recorded with an adapter (``meta["base_weights"]``) with ``model``'s:
    on a mismatch, one warning naming both (``BaseMismatchWarning``), or with ``strict`` a
    ``UserError``. Files written before the record existed are not checked."""
    recorded = meta.get("base_weights")
    if not isinstance(recorded, dict) or recorded.get("sketch") != SKETCH:
        return
    now = base_sketch(model, list(recorded.get("layers") or {}))
    if now is None:  # a sharded model: its weights cannot be read from this process alone
        return
    diff = sketch_difference(recorded, now)
    if diff <= TOLERANCE:
        return
    saved_on = meta.get("base_model") or "an unnamed model"
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    # a model built from the same config (a re-init) carries the same name: say what differs
    this = (f"this {type(model).__name__}" + (f" (named {name!r} too)" if name == saved_on else "") if
            not name or name == saved_on else repr(name))
    message = (f"{where} was trained on the base weights of {saved_on!r}, but {this} has other weights in the "
               f"adapted layers (sketches differ by {diff:.3g} of their norm, more than {TOLERANCE:g}): another "
               "fine-tune, init or quantization of the same architecture; its outputs will not be the trained ones")
    _mismatch(message, strict)


def _mismatch(message: str, strict: bool) -> None:
    """One warning for the caller of the public function, or with ``strict`` a refusal."""
    if strict:
        raise UserError(message + "; refused (strict)")
    warnings.warn(message, BaseMismatchWarning, stacklevel=4)


def check_same_base(metas: dict[str, dict[str, Any]], strict: bool = False) -> dict[str, Any] | None:
    """Adapters to be combined (``asymlora merge``) must come from one base: their recorded
    sketches are compared on the layers they share (a warning naming two that differ, or with
    ``strict`` a UserError). Returns the sketch of the combined adapter (every layer recorded;
    None when no folder recorded one)."""
    recorded = {f: m["base_weights"] for f, m in metas.items()
                if isinstance(m.get("base_weights"), dict) and m["base_weights"].get("sketch") == SKETCH}
    if not recorded:
        return None
    (first, ref), *others = recorded.items()
    layers = dict(ref["layers"])
    for folder, sk in others:
        common = set(layers) & set(sk["layers"])
        diff = sketch_difference({"layers": {n: layers[n] for n in common}},
                                 {"layers": {n: sk["layers"][n] for n in common}}) if common else 0.0
        if diff > TOLERANCE:
            message = (f"{folder} was trained on the base weights of {metas[folder].get('base_model')!r} and {first} "
                       f"on those of {metas[first].get('base_model')!r}, which differ (sketches by {diff:.3g} of "
                       "their norm): their sum is not an adapter of either")
            _mismatch(message, strict)
        for n in sk["layers"]:
            layers.setdefault(n, sk["layers"][n])
    return {"sketch": SKETCH, "layers": layers}
