"""PEFT's LoRA format, both ways.

``export_peft`` writes ``adapter_config.json`` (peft_type LORA) and ``adapter_model.safetensors``
with keys ``base_model.model.<layer>.lora_A.weight`` that ``peft.PeftModel.from_pretrained``
loads; ``import_peft`` reads such a folder onto a plain model, checking every tensor first.
Frozen factors are written out in full: PEFT has no notion of a seed-rebuilt A.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from torch import nn

from asymlora.core.adapters import list_adapters
from asymlora.core.config import AsymLoraConfig
from asymlora.core.inject import get_config, lora_layers, name_matches, wrap
from asymlora.core.layer import DEFAULT_ADAPTER, is_conv1d, linear_shape
from asymlora.errors import MissingFileError, UserError
from asymlora.fileio import read_json
from asymlora.formats.base_identity import base_sketch, check_base
from asymlora.formats.native import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_layers,
    check_tensor,
    in_modules_to_save,
    load_weights,
    read_factors,
    resolve_adapter_name,
    saved_parameters,
    write_adapter_folder,
)

PEFT_PREFIX = "base_model.model."
BASE_KEY = "asymlora_base_weights"  # the base's sketch, in the weights file's header


def export_peft(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                adapter_name: str | None = None) -> str:
    """Write adapter ``adapter_name`` (default: the active one) in Hugging Face PEFT's LoRA
    format (frozen factors included).

    ``PeftModel.from_pretrained(base, directory)`` then reproduces this model's outputs: PEFT
    computes base(x) + (alpha/r)·B·A·x (alpha/sqrt(r) with use_rslora), the same function.
    """
    config = get_config(model, adapter_name)
    adapter_name = resolve_adapter_name(model, adapter_name)
    layers = {
        name: (*layer.factors(adapter_name), is_conv1d(layer.base))
        for name, layer in adapter_layers(model, adapter_name).items()
    }
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return _write_peft(directory, config, layers, saved_parameters(model, config), base,
                       base_sketch(model, list(layers)))


def export_peft_adapters(model: nn.Module, directory: str | os.PathLike, adapter_names: list[str] | None = None,
                         base_model_name_or_path: str | None = None) -> dict[str, str]:
    """Write every named adapter (or ``adapter_names``) in PEFT's multi-adapter layout and
    return name -> folder: the adapter named "default" in ``directory`` itself, each other
    adapter ``n`` in ``directory/n`` — the layout ``PeftModel.save_pretrained`` writes, read back
    with ``PeftModel.from_pretrained(base, directory)`` plus
    ``peft_model.load_adapter(directory/n, adapter_name=n)``."""
    names = list_adapters(model) if adapter_names is None else list(adapter_names)
    for name in names:
        get_config(model, name)  # every name checked before anything is written
    out = {}
    for name in names:
        folder = os.fspath(directory) if name == DEFAULT_ADAPTER else os.path.join(os.fspath(directory), name)
        out[name] = export_peft(model, folder, base_model_name_or_path, adapter_name=name)
    return out


def convert_to_peft(adapter_dir: str | os.PathLike, directory: str | os.PathLike) -> str:
    """Convert a saved asymlora adapter folder to PEFT's format without loading the base model.
    ``directory`` must be another folder: both formats name their config adapter_config.json."""
    if os.path.isdir(directory) and os.path.samefile(adapter_dir, directory):
        raise UserError(f"convert_to_peft: the output folder {os.fspath(directory)!r} is the adapter folder itself; "
                        "writing there would replace the asymlora adapter — pick another folder")
    meta, factors, saved = read_factors(adapter_dir)
    config = AsymLoraConfig.from_dict(meta["config"])
    layers = {n: (a, b, bool(meta["layers"][n].get("conv1d"))) for n, (a, b) in factors.items()}
    return _write_peft(directory, config, layers, saved, meta.get("base_model"), meta.get("base_weights"))


def _write_peft(
    directory: str | os.PathLike,
    config: AsymLoraConfig,
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, bool]],
    saved: dict[str, torch.Tensor],
    base_model_name_or_path: str | None,
    base_weights: dict[str, Any] | None = None,
) -> str:
    """PEFT's adapter_config.json and weights; the sketch of the base (``base_weights``) travels in
    the weights file's header, which PEFT ignores and ``import_peft`` compares."""
    conv = {c for _, _, c in layers.values()}
    if len(conv) > 1:
        raise UserError("PEFT needs one fan_in_fan_out for all layers; this adapter mixes Linear and Conv1D layers")
    rank_pattern = {n: int(a.shape[0]) for n, (a, _, _) in layers.items() if int(a.shape[0]) != config.r}
    alpha_pattern = {n: config.alpha_for(n) for n in layers if config.alpha_for(n) != config.alpha}
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.scaling == "rslora",
        "target_modules": sorted(layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": conv == {True},
        "modules_to_save": list(config.modules_to_save) or None,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b, _) in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    for p_name, p in saved.items():
        tensors[PEFT_PREFIX + p_name] = p
    directory = os.fspath(directory)
    header = {"format": "pt", **({BASE_KEY: json.dumps(base_weights)} if base_weights else {})}
    write_adapter_folder(directory, tensors, header, peft_config)
    return directory


_PEFT_UNSUPPORTED = {
    "bias": ("none", None),  # "all"/"lora_only": PEFT trained the base layers' biases too
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "layers_to_transform": (None,),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
}


def _peft_pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT resolves a pattern key k against a module name n by re.match(f"(.*\\.)?({k})$", n)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


_PEFT_FACTOR = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


def _peft_targets(target_modules: Any, name: str) -> bool | None:
    """Whether PEFT's ``target_modules`` covers layer ``name`` (PEFT's rule: a list entry t
    matches ``name == t`` or a name ending in ``.t``; a string is a full regex), or None where
    it depends on more than the name ("all-linear", unset)."""
    if target_modules is None or target_modules == "all-linear":
        return None
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name_matches(name, t) for t in target_modules)


def _read_peft(model: nn.Module, weights_path: str, pc: dict[str, Any]
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The factors ({layer: (A, B)}) and the modules_to_save values ([(model parameter, value)])
    of a PEFT weights file, refused (UserError naming the tensor) when a tensor is unreadable,
    not floating point, not finite, unexplained by ``pc`` (neither lora_A/lora_B of a targeted
    layer nor a parameter of modules_to_save), or missing (a layer or saved parameter that
    ``pc`` names). Nothing of the model is changed."""
    tensors = load_weights(weights_path)
    keep = list(pc.get("modules_to_save") or [])
    targets = pc.get("target_modules")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    params = dict(model.named_parameters())
    others: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, value in sorted(tensors.items()):
        check_tensor(weights_path, key, value)
        m = _PEFT_FACTOR.fullmatch(key)
        if m and _peft_targets(targets, m.group(1)) is not False:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        p_name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        p_name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", p_name)
        if m or not in_modules_to_save(p_name, keep):
            raise UserError(f"{weights_path} holds tensor {key!r}, which {CONFIG_NAME} does not explain (expected "
                            f"lora_A/lora_B of target_modules={targets!r} and parameters of modules_to_save={keep}); "
                            "refusing to load it")
        if p_name not in params:
            raise UserError(f"PEFT tensor {key!r} matches no parameter of the model")
        if params[p_name].shape != value.shape:
            raise UserError(f"PEFT tensor {key!r} has shape {tuple(value.shape)}, the model's {p_name!r} "
                            f"{tuple(params[p_name].shape)}: wrong base model?")
        others.append((params[p_name], value))
    if not pairs:
        raise UserError(f"{weights_path} holds no lora_A weights")
    for name, pair in pairs.items():
        for have, lack in (("A", "B"), ("B", "A")):
            if lack not in pair:
                raise UserError(f"{weights_path} has lora_{have} but no lora_{lack} for layer {name!r}")
    linear = {n for n, mod in model.named_modules() if n and (isinstance(mod, nn.Linear) or is_conv1d(mod))}
    excluded = pc.get("exclude_modules")  # PEFT leaves these out of target_modules' matches
    missing = sorted(n for n in linear - set(pairs) if _peft_targets(targets, n) and not (
        excluded and _peft_targets(excluded, n)))
    if missing:
        raise UserError(f"{weights_path} lacks lora_A/lora_B for layer {missing[0]!r} ({len(missing)} layer(s)), "
                        f"which {CONFIG_NAME}'s target_modules={targets!r} adapts; the file is incomplete")
    present = {id(p) for p, _ in others}
    unsaved = sorted(n for n, p in params.items() if in_modules_to_save(n, keep) and id(p) not in present)
    if unsaved:
        raise UserError(f"{weights_path} lacks {unsaved[0]!r} ({len(unsaved)} parameter(s) of "
                        f"modules_to_save={keep}); the file is incomplete")
    return {name: (pair["A"], pair["B"]) for name, pair in pairs.items()}, others


def _recorded_base(weights_path: str, pc: dict[str, Any]) -> dict[str, Any]:
    """What an exported PEFT file says about its base: the name in its config and the sketch in
    its weights header (absent from PEFT's own files)."""
    from safetensors import safe_open

    try:
        with safe_open(weights_path, framework="pt") as fh:
            text = (fh.metadata() or {}).get(BASE_KEY)
        sketch = json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - a damaged header is reported by _read_peft
        sketch = None
    return {"base_model": pc.get("base_model_name_or_path"), "base_weights": sketch}


def import_peft(model: nn.Module, directory: str | os.PathLike, trainable: str = "AB",
                strict: bool = False) -> nn.Module:
    """Load a PEFT LoRA adapter folder onto a plain ``model`` (wrapping it) and return it.

    All factors come from the file; ``trainable`` chooses which ones train from here on (e.g.
    ``"B"`` to continue a PEFT LoRA run with A frozen). The file is checked before the model is
    touched (``_read_peft``): a refused folder leaves the model as it was. A file exported by
    asymlora carries the sketch of its base: other base weights give a ``BaseMismatchWarning``,
    or with ``strict`` a UserError (``asymlora.formats.base_identity``).
    """
    # the initialiser recorded for each factor: only its name matters (every factor comes from the file)
    inits = {"AB": ("kaiming", "zero"), "A": ("zero", "gaussian"), "B": ("gaussian", "zero")}
    if trainable not in inits:
        raise UserError(f"trainable must be one of {list(inits)}, got {trainable!r}")
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, CONFIG_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise MissingFileError(f"no {CONFIG_NAME} in {directory!r}")
    if not os.path.isfile(weights_path):
        raise MissingFileError(
            f"{weights_path} is missing; only safetensors PEFT adapters are read (never adapter_model.bin)"
        )
    pc = read_json(cfg_path)
    if not isinstance(pc, dict) or pc.get("peft_type") != "LORA":
        kind = pc.get("peft_type") if isinstance(pc, dict) else None
        raise UserError(f"{cfg_path} has peft_type={kind!r}; only 'LORA' adapters can be imported")
    for key, allowed in _PEFT_UNSUPPORTED.items():
        if pc.get(key) not in allowed:
            raise UserError(f"PEFT adapter uses {key}={pc.get(key)!r}, which asymlora cannot represent")
    factors, others = _read_peft(model, weights_path, pc)
    check_base(_recorded_base(weights_path, pc), model, directory, strict)  # exported by asymlora: its base?
    r0, alpha0 = int(pc["r"]), float(pc["lora_alpha"])
    ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
    alphas = {name: float(_peft_pattern_value(pc.get("alpha_pattern") or {}, name, alpha0)) for name in factors}
    init_a, init_b = inits[trainable]
    saved_modules = list(pc.get("modules_to_save") or [])
    config = AsymLoraConfig(
        r=r0,
        alpha=alpha0,
        scaling="rslora" if pc.get("use_rslora") else "standard",
        dropout=float(pc.get("lora_dropout") or 0.0),
        trainable=trainable,
        init_A=init_a,
        init_B=init_b,
        target_modules=sorted(factors),
        modules_to_save=saved_modules,
        rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r0},
        alpha_pattern={re.escape(n): v for n, v in alphas.items() if v != alpha0},
    )
    modules = dict(model.named_modules())
    for name, (a, b) in factors.items():
        if name not in modules:
            raise UserError(f"PEFT layer {name!r} does not exist in {type(model).__name__}: wrong base model?")
        d_in, d_out = linear_shape(modules[name])
        if tuple(a.shape) != (ranks[name], d_in) or tuple(b.shape) != (d_out, ranks[name]):
            raise UserError(
                f"{weights_path}: PEFT factors of {name!r} are A{tuple(a.shape)} B{tuple(b.shape)}, expected "
                f"A({ranks[name]}, {d_in}) B({d_out}, {ranks[name]}) for the model's {d_in}->{d_out} layer at "
                f"r={ranks[name]}: wrong base model?"
            )
    wrap(model, config)  # keeps the modules_to_save and base parameters (the same objects)
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layers[name].lora_A.copy_(a.to(layers[name].lora_A.dtype))
            layers[name].lora_B.copy_(b.to(layers[name].lora_B.dtype))
        for param, value in others:
            param.copy_(value.to(param.dtype))
    return model
