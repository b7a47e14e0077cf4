"""Quantized base layers (QLoRA-style): recognise them, read their weight back as floats,
quantize a float model, and turn a quantized model back into a float one.

An adapted layer computes ``y = base(x) + s·B·(A·x)``. With a quantized base, ``base(x)`` is
(up to the kernel's rounding) ``Ŵ·x`` with ``Ŵ = dequant(Q(W))``; the factors stay floating
point (float32, or the compute dtype for a frozen factor) and the base is never trained, so
the adapter code only needs three facts about a base: its shape (``in_features`` /
``out_features``, never ``weight.shape``: a 4-bit weight is packed), the float dtype it computes
in, and ``Ŵ`` itself (for the ``svd`` init and for a float export).

Schemes (``SCHEMES``), each a backend that runs forward and backward on CPU and GPU:

- ``nf4`` / ``fp4``: bitsandbytes ``Linear4bit`` (blocks of 64 weights share one absmax scale,
  stored 8-bit with a second-level scale: "double quantization", about 4.13 bits/weight).
- ``int8``: bitsandbytes ``Linear8bitLt`` (LLM.int8(): one scale per output row, outlier
  input columns above 6.0 computed in 16 bits), what ``load_in_8bit=True`` builds.
- ``torchao-int8``: torchao ``Int8WeightOnlyConfig`` (the module stays ``nn.Linear``; its
  weight is an ``Int8Tensor`` with one scale per output row).

Merging an update into a quantized base in place (``W ← Q(Ŵ + s·B·A)``) is refused for every
scheme (:func:`refuse_merge`): the update is smaller than the rounding step of the grid and is
mostly rounded away (BENCHMARKS.md, "Merging into a quantized base"). The exact alternative is a
float export: ``merge_and_unload(model, dequantize=True)``.

Nothing here imports bitsandbytes or torchao unless a scheme is asked for, or a layer of theirs
already exists (then its package is already imported).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from asymlora.core.base import dense_weight
from asymlora.errors import UserError

SCHEMES: dict[str, str] = {
    "nf4": "bitsandbytes nf4 (Linear4bit)",
    "fp4": "bitsandbytes fp4 (Linear4bit)",
    "int8": "bitsandbytes LLM.int8 (Linear8bitLt)",
    "torchao-int8": "torchao int8 weight-only (Int8WeightOnlyConfig)",
}
_PACKAGE = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "int8": "bitsandbytes", "torchao-int8": "torchao"}
INT8_THRESHOLD = 6.0  # LLM.int8 outlier threshold, transformers' default for load_in_8bit


def check_scheme(name: str | None, flag: str = "--quantize") -> str | None:
    """``name`` as a scheme (None for no quantization: ``None``, ``"none"``), or a UserError
    naming the bad value and the valid ones; also when the scheme's package is missing."""
    if name is None or name == "none":
        return None
    if name not in SCHEMES:
        raise UserError(f"{flag} {name!r} is not a quantization scheme; valid: none, {', '.join(SCHEMES)}")
    package = _PACKAGE[name]
    try:
        __import__(package)
    except ImportError as err:
        raise UserError(f"{flag} {name}: needs the {package} package ({err}); "
                        "install it with pip install 'asymlora[quant]'") from None
    return name


def scheme_problem(name: str | None, flag: str = "--quantize") -> str | None:
    """:func:`check_scheme`'s message for a bad ``name`` (None when it is fine), for commands
    that collect every bad argument before reporting."""
    try:
        check_scheme(name, flag)
    except UserError as err:
        return str(err)
    return None


def scheme_of(module: nn.Module) -> str | None:
    """The scheme of a quantized linear layer (``"nf4"``, ``"fp4"``, ``"int8"``,
    ``"torchao-int8"``, or ``"torchao:<tensor class>"`` for another torchao weight), else None."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        if isinstance(module, bnb.nn.Linear4bit):
            return str(module.weight.quant_type)
        if isinstance(module, bnb.nn.Linear8bitLt):
            return "int8"
    weight = module.weight if isinstance(module, nn.Linear) else None  # not a LoraLinear's .weight
    if isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao"):
        return "torchao-int8" if type(weight).__name__ == "Int8Tensor" else f"torchao:{type(weight).__name__}"
    return None


def describe(scheme: str) -> str:
    return SCHEMES.get(scheme, scheme)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a (possibly quantized) linear layer computes in: the weight's dtype for a
    float layer, bitsandbytes 4-bit's ``compute_dtype`` (else the dtype it was quantized from),
    the bias dtype (else float32) for LLM.int8, the original dtype for a torchao weight."""
    scheme = scheme_of(module)
    layer: Any = module  # the quantized layers' attributes (quant_state, compute_dtype) are their library's
    if scheme in ("nf4", "fp4"):
        state = layer.weight.quant_state
        return layer.compute_dtype or getattr(state, "original_dtype", None) or state.dtype
    if scheme == "int8":
        if layer.weight.dtype.is_floating_point:  # has_fp16_weights=True: still a float weight
            return layer.weight.dtype
        bias = layer.bias
        return bias.dtype if bias is not None else torch.float32
    return layer.weight.dtype  # plain, and torchao (its tensor reports the original dtype)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the float ``(d_out × d_in)`` matrix ``Ŵ`` of ``y = Ŵ·x`` (a new
    tensor for a quantized layer, detached; a float ``nn.Linear``'s own weight, transposed for
    transformers' ``Conv1D``)."""
    scheme = scheme_of(module)
    if scheme is None:
        return dense_weight(module)
    dtype = compute_dtype(module)
    with torch.no_grad():
        if scheme in ("nf4", "fp4"):
            return _bnb_4bit_weight(module).to(dtype)
        if scheme == "int8":
            return _bnb_int8_weight(module).to(dtype)
        return cast(Any, module.weight).dequantize().to(dtype)  # a torchao tensor subclass


def _bnb_4bit_weight(module: Any) -> torch.Tensor:
    """``module``: a bitsandbytes ``Linear4bit``."""
    import bitsandbytes.functional as bf

    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a 4-bit weight for its bf16 CPU kernel on the first no-grad eval
        # forward (on CPUs with AVX512-BF16); unpack it the way its own state_dict saving does.
        weight.data, weight.quant_state = bf._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        module.quant_state = weight.quant_state
    return bf.dequantize_4bit(weight.data, weight.quant_state)


def _bnb_int8_weight(module: Any) -> torch.Tensor:
    """``module``: a bitsandbytes ``Linear8bitLt``."""
    import bitsandbytes.functional as bf

    weight = module.weight
    if weight.dtype.is_floating_point:
        return weight.detach().clone()
    # The row scales (SCB) sit on the weight until the first forward, on module.state after.
    codes = module.state.CB if module.state.CB is not None else weight.data
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bf.int8_vectorwise_dequant(codes, scales)


# ---------------------------------------------------------------------------- float -> quantized
def quantize_model(
    model: nn.Module, scheme: str, skip: Sequence[str] = (), device: str | torch.device | None = None
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by its ``scheme`` version and return
    the model. Left in float: the output head (``get_output_embeddings()``), modules named in
    ``skip`` (a name matches itself and everything under it, like ``classifier``), and
    transformers ``Conv1D`` layers. Each weight is quantized on ``device`` (default: where it
    is), one layer at a time, so a float model on the CPU can be quantized onto a GPU that
    could not hold it in float. The quantized layers compute in their old weight's dtype.

    bitsandbytes 4-bit layers are built with its AVX512-BF16 CPU repacking off: on such CPUs it
    would otherwise repack the weight on the first no-grad eval forward, with bf16 scales.
    """
    checked = check_scheme(scheme, "scheme")
    if checked is None:
        return model
    names = linears_to_quantize(model, skip)
    if checked == "torchao-int8":
        return _torchao_int8(model, names, device)
    for name in names:
        _set_module(model, name, _bnb_layer(cast(nn.Linear, model.get_submodule(name)), checked, device))
    return model


def linears_to_quantize(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """Qualified names of the float ``nn.Linear`` layers :func:`quantize_model` converts."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is head or scheme_of(module) is not None:
            continue
        if any(name == s or name.startswith(s + ".") or name.endswith("." + s) or f".{s}." in name for s in skip):
            continue
        out.append(name)
    return out


def _bnb_layer(linear: nn.Linear, scheme: str, device: str | torch.device | None) -> nn.Module:
    import bitsandbytes as bnb

    target = torch.device(device) if device is not None else linear.weight.device
    dtype = linear.weight.dtype
    d_out, d_in = linear.weight.shape
    has_bias = linear.bias is not None
    weight = linear.weight.detach().to("cpu")  # bitsandbytes quantizes on .to(device)
    layer: nn.Linear
    if scheme == "int8":
        layer = bnb.nn.Linear8bitLt(d_in, d_out, bias=has_bias, has_fp16_weights=False, threshold=INT8_THRESHOLD,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer4 = bnb.nn.Linear4bit(d_in, d_out, bias=has_bias, compute_dtype=dtype, quant_type=scheme,
                                   compress_statistics=True, device="meta")
        layer4.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=scheme, compress_statistics=True,
                                          module=layer4)
        layer4.support_avx512bf16_for_cpu = False
        layer = layer4
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to("cpu", dtype), requires_grad=False)
    return layer.to(target)


def _torchao_int8(model: nn.Module, names: list[str], device: str | torch.device | None) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    chosen = set(names)
    if device is not None:
        for name in names:
            model.get_submodule(name).to(device)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in chosen)
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---------------------------------------------------------------------------- quantized -> float
def float_linear(module: nn.Module, weight: torch.Tensor | None = None) -> nn.Linear:
    """A float ``nn.Linear`` computing ``module``'s function: weight ``Ŵ`` (or ``weight``), bias
    copied, in the module's compute dtype and on its device."""
    w = float_weight(module) if weight is None else weight
    dtype = compute_dtype(module)
    linear = cast(nn.Linear, module)  # bitsandbytes' layers subclass nn.Linear; torchao keeps the nn.Linear
    d_out, d_in = int(linear.out_features), int(linear.in_features)
    out = nn.Linear(d_in, d_out, bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter(w.detach().to(dtype).clone(), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().to(dtype).clone(), requires_grad=False)
    return out


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear layer of ``model`` by its float ``nn.Linear`` (weight
    ``Ŵ``) in place, and drop transformers' record of the quantization (``config.
    quantization_config``, ``hf_quantizer``), so ``save_pretrained`` writes a plain float model
    that ``from_pretrained`` loads without bitsandbytes or torchao."""
    for name in [n for n, m in model.named_modules() if n and scheme_of(m) is not None]:
        _set_module(model, name, float_linear(model.get_submodule(name)))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False) is True and "is_quantized" in vars(model):
        # torch types module attributes as Tensor | Module; any value is allowed at runtime
        model.is_quantized = False  # type: ignore[assignment]
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if flag in vars(model):
            setattr(model, flag, False)
    return model


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Qualified name -> scheme of every quantized linear layer in ``model``."""
    return {n: s for n, m in model.named_modules() if (s := scheme_of(m)) is not None}


def refuse_merge(scheme: str, where: str = "") -> UserError:
    """The error for merging into a quantized base in place (see the module docstring)."""
    at = f" of layer {where!r}" if where else ""
    return UserError(
        f"refusing to merge into the quantized base{at} ({describe(scheme)}): Q(W + s·B·A) rounds the update "
        "to the quantization grid, which loses most of it (BENCHMARKS.md, 'Merging into a quantized base'); "
        "keep the adapter unmerged, or export a float model with merge_and_unload(model, dequantize=True)"
    )
