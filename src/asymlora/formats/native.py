"""Adapter files in our own format (PEFT's is ``asymlora.formats.peft``).

A folder:
  ``adapter_config.json``        the AsymLoraConfig, and per layer its shape, rank, scaling and,
                                 for each factor, its init, whether it trained, whether it is
                                 stored, and a fingerprint (``asymlora.core.init.fingerprint``).
  ``adapter_model.safetensors``  ``<layer>.lora_A`` / ``<layer>.lora_B`` for stored factors and
                                 ``saved.<parameter>`` for the modules kept trainable.

A frozen factor drawn from the seed (orthogonal, gaussian, kaiming) is not stored by default:
it is rebuilt from (seed, layer name, init) on load and checked against its fingerprint, which
halves a B-only file. ``svd`` factors depend on the base weights and are always stored. Only
safetensors is read or written — nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from asymlora.core.adapters import (
    attach,
    check_new_adapter,
    list_adapters,
    shared_frozen,
)
from asymlora.core.base import weight_of
from asymlora.core.config import AsymLoraConfig
from asymlora.core.init import (
    SEED_REPRODUCIBLE,
    fingerprint,
    fingerprints_match,
    init_factor,
)
from asymlora.core.inject import (
    PLAIN_NAME,
    adapter_state,
    factor_dtype,
    get_config,
    lora_layers,
    name_matches,
    saved_modules_of,
    wrap,
)
from asymlora.core.layer import (
    DEFAULT_ADAPTER,
    LoraLinear,
    factor_key,
    is_conv1d,
    linear_shape,
)
from asymlora.errors import MissingFileError, UserError
from asymlora.fileio import atomic_folder, fault_point, read_json
from asymlora.formats.base_identity import base_sketch, check_base
from asymlora.version import __version__

# (layer name, "A"/"B", recorded fingerprint) -> a tensor already held with that fingerprint, or None
Reuse = Callable[[str, str, dict], torch.Tensor | None]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "asymlora-adapter"
# 2: the config dict names which factors train ``trainable`` (version 1, asymlora 0.1.0, wrote
# ``train``; AsymLoraConfig.from_dict reads both).
FORMAT_VERSION = 2
SAVED_PREFIX = "saved."


def write_adapter_folder(directory: str, tensors: dict[str, torch.Tensor], header: dict[str, str],
                          config: dict[str, Any]) -> None:
    """Write the weights and the config as one unit: both go into a new hidden folder that then
    replaces ``directory`` in one step (``fileio.atomic_folder``), so a process killed at any
    moment leaves the previous adapter or the new one, never the weights of one with the
    config of the other."""
    with atomic_folder(directory, owned=(WEIGHTS_NAME, CONFIG_NAME)) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  os.path.join(tmp, WEIGHTS_NAME), metadata=header)
        fault_point("adapter.weights_written")
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(config, indent=2))


def saved_parameters(model: nn.Module, config: AsymLoraConfig) -> dict[str, torch.Tensor]:
    """Full-name -> tensor for the parameters of ``modules_to_save``."""
    modules = saved_modules_of(model, config.modules_to_save)
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in modules.items():
        for p_name, p in module.named_parameters():
            out[f"{mod_name}.{p_name}"] = p
    return out


# ---------------------------------------------------------------------------- our format
@dataclass
class LayerFactors:
    """One adapter's update ``s·B·A`` in one layer, as saved: the factors, the scaling ``s``,
    which factors trained, and whether the base is a transformers ``Conv1D``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    trains_A: bool
    trains_B: bool
    conv1d: bool = False


def save_adapter(model: nn.Module, directory: str | os.PathLike, store_frozen: bool = False,
                 adapter_name: str | None = None) -> str:
    """Save adapter ``adapter_name`` (default: the active one) of ``model`` to ``directory``
    (created if needed) and return its path.

    ``store_frozen``: also store seed-reproducible frozen factors (otherwise rebuilt on load).
    The folder is replaced as a whole (``write_adapter_folder``): a crash at any point leaves
    the previous adapter or this one.
    """
    config = get_config(model, adapter_name)
    adapter_name = resolve_adapter_name(model, adapter_name)
    layers = {
        name: LayerFactors(*layer.factors(adapter_name), layer.slots[adapter_name].scaling,
                           layer.trains(adapter_name, "A"), layer.trains(adapter_name, "B"), is_conv1d(layer.base))
        for name, layer in adapter_layers(model, adapter_name).items()
    }
    base_model = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return write_adapter(directory, config, layers, saved_parameters(model, config), base_model,
                         type(model).__name__, store_frozen=store_frozen,
                         extra={"base_weights": base_sketch(model, list(layers))})  # compared on load


def write_adapter(directory: str | os.PathLike, config: AsymLoraConfig, layers: dict[str, LayerFactors],
                  saved: dict[str, torch.Tensor], base_model: str | None, base_class: str | None,
                  store_frozen: bool = False, extra: dict[str, Any] | None = None) -> str:
    """Write an adapter folder in our format from its factors (``save_adapter`` without a model).

    ``saved``: parameter name -> tensor of ``config.modules_to_save``; ``extra``: more keys for
    ``adapter_config.json`` (e.g. how the adapter was made; ``base_weights``, the sketch of the base
    it was trained on, which ``load_adapter`` compares: ``asymlora.formats.base_identity``).
    """
    directory = os.fspath(directory)
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, Any] = {}
    for name, lf in layers.items():
        entry: dict[str, Any] = {
            "in_features": int(lf.A.shape[1]),
            "out_features": int(lf.B.shape[0]),
            "r": int(lf.A.shape[0]),
            "scaling": float(lf.scaling),
            "conv1d": bool(lf.conv1d),
        }
        for factor, init_name, value, trained in (("A", config.init_A, lf.A, lf.trains_A),
                                                  ("B", config.init_B, lf.B, lf.trains_B)):
            stored = trained or store_frozen or init_name not in SEED_REPRODUCIBLE
            if not stored and value.dtype != torch.float32:
                value, stored = _as_drawn(value, init_name, factor, config.seed, name)
            if stored:
                tensors[f"{name}.lora_{factor}"] = value
            entry[factor] = {
                "init": init_name,
                "trained": trained,
                "stored": stored,
                "fingerprint": fingerprint(value),
            }
            if stored:
                entry[factor]["dtype"] = _dtype_name(value)
        layers_meta[name] = entry
    saved_meta: dict[str, Any] = {}
    for p_name, p in saved.items():
        tensors[SAVED_PREFIX + p_name] = p
        saved_meta[p_name] = {"shape": list(p.shape), "dtype": _dtype_name(p)}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "asymlora_version": __version__,
        "base_model": base_model,
        "base_class": base_class,
        "config": config.to_dict(),
        "layers": layers_meta,
        "saved": saved_meta,
        **(extra or {}),
    }
    # the config travels in the safetensors header too: see check_config_matches_layers
    header = {"format": FORMAT, "config": json.dumps(config.to_dict(), sort_keys=True)}
    write_adapter_folder(directory, tensors, header, meta)
    return directory


def _as_drawn(value: torch.Tensor, init_name: str, factor: str, seed: int, layer: str) -> tuple[torch.Tensor, bool]:
    """A frozen seeded factor held in half precision (on a bf16/fp16 base) is the float32 draw
    rounded: its fingerprint is recorded from the float32 draw, which is what loading rebuilds,
    so the file stays seed-only. Returns (the tensor to fingerprint, whether it must be stored):
    a factor that is not the rounded draw is stored as it is."""
    drawn = init_factor(init_name, (int(value.shape[0]), int(value.shape[1])), factor, seed, layer)
    if torch.equal(drawn.to(value.dtype), value.detach().to("cpu")):
        return drawn, False
    return value, True


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise MissingFileError(
            f"no {CONFIG_NAME} in {directory!r}: not an adapter folder{_interrupted_save(directory)}"
        )
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        hint = " (a PEFT adapter: use asymlora.import_peft)" if meta.get("peft_type") else ""
        raise UserError(f"{path} is not an asymlora adapter (format={meta.get('format')!r}){hint}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {meta['format_version']}, this asymlora reads <= {FORMAT_VERSION}; "
            "upgrade asymlora"
        )
    return meta


def _interrupted_save(directory: str) -> str:
    """A hint when ``directory`` is missing because a save was killed between the two renames
    of ``fileio.atomic_folder``'s fallback: the previous adapter waits complete in a sibling."""
    parent, name = os.path.split(os.path.abspath(directory))
    if os.path.lexists(directory) or not os.path.isdir(parent):
        return ""
    kept = sorted(os.path.join(parent, e, name) for e in os.listdir(parent)
                  if e.startswith(f".old-{name}-") and os.path.isfile(os.path.join(parent, e, name, CONFIG_NAME)))
    return (f" (a save into it was interrupted; the previous adapter is complete in {kept[-1]!r}: move it back "
            f"to {directory!r} or save again)") if kept else ""


def _saved_config(weights_path: str) -> dict[str, Any] | None:
    """The config recorded in the weights file's header at save time (None for older files)."""
    try:
        with safe_open(weights_path, framework="pt") as fh:
            text = (fh.metadata() or {}).get("config")
        return None if text is None else json.loads(text)
    except Exception as err:  # damaged header
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{weights_path} is not a readable safetensors file (damaged or cut short): {first}") from err


def _targets_cover(targets: Any, name: str) -> bool:
    if targets is None or targets == "all-linear":
        return True  # depends on the model; checked when wrapping
    if isinstance(targets, str) and not PLAIN_NAME.match(targets):
        return re.fullmatch(targets, name) is not None
    return any(name_matches(name, t) for t in ([targets] if isinstance(targets, str) else targets))


def check_config_matches_layers(meta: dict[str, Any], weights_path: str) -> AsymLoraConfig:
    """The config of ``adapter_config.json``, refused (UserError naming the field and both
    values) if it disagrees with what was saved: the per-layer records (rank, scaling =
    alpha/r or alpha/sqrt(r), init and trained flag of each factor, layer names against
    target_modules) and the copy of the config in the weights file's header (every field,
    the seed included). Runs before any tensor is read or any model is touched."""
    path = os.path.join(os.path.dirname(weights_path), CONFIG_NAME)
    try:
        config = AsymLoraConfig.from_dict(meta["config"])
        layers = dict(meta["layers"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} holds an invalid adapter config: {err}") from err

    def refuse(field: str, says: Any, saved: Any, where: str) -> UserError:
        return UserError(f"{path} says {field}={says!r} but {where} was saved with {field}={saved!r}: the "
                         f"file was edited after saving; refusing to load it")

    for name, entry in layers.items():
        if int(entry["r"]) != config.rank_for(name):
            raise refuse("r", config.rank_for(name), int(entry["r"]), f"layer {name!r}")
        if not math.isclose(float(entry["scaling"]), config.scaling_for(name), rel_tol=1e-9):
            r = config.rank_for(name)
            saved_alpha = float(entry["scaling"]) * (math.sqrt(r) if config.scaling == "rslora" else r)
            raise refuse("alpha", config.alpha_for(name), saved_alpha, f"layer {name!r} (scaling {entry['scaling']:g})")
        for factor in ("A", "B"):
            if entry[factor]["init"] != getattr(config, f"init_{factor}"):
                raise refuse(f"init_{factor}", getattr(config, f"init_{factor}"), entry[factor]["init"],
                             f"layer {name!r}")
            if bool(entry[factor]["trained"]) != (factor in config.trainable):
                raise refuse("trainable", config.trainable, "".join(f for f in "AB" if layers[name][f]["trained"]),
                             f"layer {name!r}")
        if not _targets_cover(config.target_modules, name):
            raise UserError(f"{path} says target_modules={config.target_modules!r}, which does not cover the "
                            f"saved layer {name!r}: the file was edited after saving; refusing to load it")
    if isinstance(config.target_modules, list):
        unused = [t for t in config.target_modules if not any(name_matches(n, t) for n in layers)]
        if unused:
            raise UserError(f"{path} says target_modules={config.target_modules!r}, but no saved layer matches "
                            f"{unused}: the file was edited after saving; refusing to load it")
    saved = _saved_config(weights_path)
    if saved is not None:
        for field, value in config.to_dict().items():
            if field in saved and saved[field] != value:
                raise refuse(field, value, saved[field], f"the adapter (header of {WEIGHTS_NAME})")
    return config


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def check_tensor(path: str, key: str, value: torch.Tensor, shape: tuple[int, ...] | None = None,
                  dtype: str | None = None, why: str = "") -> None:
    """Refuse (one-line UserError naming the tensor and what was expected) a tensor of another
    dtype (recorded at save time, else any floating-point one) or shape, or with a NaN/inf."""
    if value.dtype not in _FLOAT_DTYPES or (dtype is not None and _dtype_name(value) != dtype):
        want = dtype or "a floating-point dtype (float16, bfloat16, float32, float64)"
        raise UserError(f"{path}: tensor {key!r} has dtype {_dtype_name(value)}, expected {want}{why}; refusing to "
                        "load it")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise UserError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}{why}; "
                        "refusing to load it")
    bad = int((~torch.isfinite(value)).sum())
    if bad:
        raise UserError(f"{path}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of {value.numel()}, "
                        "expected finite values; refusing to load it")


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a damaged or cut-short file is a one-line UserError."""
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} is not a readable safetensors file (damaged or cut short): {first}") from err


def _sha256(t: torch.Tensor) -> str:
    """The ``sha256`` of ``asymlora.core.init.fingerprint`` (float32 bytes), without its moments."""
    return hashlib.sha256(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def in_modules_to_save(p_name: str, targets: list[str]) -> bool:
    """Whether parameter ``p_name`` belongs to a module that ``modules_to_save`` names (the
    module itself or one inside it, as ``saved_parameters`` collects them)."""
    parts = p_name.split(".")[:-1]
    return any(name_matches(".".join(parts[:i]), t) for i in range(1, len(parts) + 1) for t in targets)


def _check_weights(weights_path: str, meta: dict[str, Any], config: AsymLoraConfig,
                   tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of an adapter's weights file is explained by its config (a stored factor of a
    saved layer, or a parameter of ``modules_to_save``), has the recorded dtype and shape, is
    finite and, for a factor, has the fingerprint recorded when it was saved (so the weights of
    one save never load under the config of another)."""
    expected: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}
    for name, entry in meta["layers"].items():
        r, d_in, d_out = int(entry["r"]), int(entry["in_features"]), int(entry["out_features"])
        for factor, factor_shape in (("A", (r, d_in)), ("B", (d_out, r))):
            if entry[factor]["stored"]:
                expected[f"{name}.lora_{factor}"] = (factor_shape, entry[factor])
    for key in sorted(tensors):
        if key in expected or (key.startswith(SAVED_PREFIX)
                               and in_modules_to_save(key[len(SAVED_PREFIX):], list(config.modules_to_save))):
            continue
        raise UserError(f"{weights_path} holds tensor {key!r}, which {CONFIG_NAME} does not explain (expected only "
                        f"the stored factors of its {len(meta['layers'])} layers and {SAVED_PREFIX}<parameter> of "
                        f"modules_to_save={list(config.modules_to_save)}); refusing to load it")
    saved_meta = meta.get("saved") or {}
    for key, value in tensors.items():
        if key in expected:
            shape, info = expected[key]
            check_tensor(weights_path, key, value, shape, info.get("dtype"), f" ({CONFIG_NAME}: layer "
                          f"{key.rsplit('.', 1)[0]!r} at r={shape[0] if key.endswith('A') else shape[1]})")
            if "sha256" in info["fingerprint"] and _sha256(value) != info["fingerprint"]["sha256"]:
                raise UserError(f"{weights_path}: tensor {key!r} does not match the fingerprint {CONFIG_NAME} recorded "
                                "when it was saved: the weights file was changed, or comes from another save; "
                                "refusing to load it")
        else:
            info = saved_meta.get(key[len(SAVED_PREFIX):], {})
            check_tensor(weights_path, key, value, info.get("shape"), info.get("dtype"),
                          f" (as saved, {CONFIG_NAME})" if info else "")


def read_factors(
    directory: str | os.PathLike, reuse: Reuse | None = None
) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Read an adapter folder: (meta, {layer: (A, B)}, {saved param: tensor}).

    Every tensor of the file is checked first (``_check_weights``); rebuilt factors are drawn from the
    stored seed and must match the recorded fingerprint — unless ``reuse(layer, factor,
    fingerprint)`` returns a tensor already held whose fingerprint matches (shared factors).
    """
    directory = os.fspath(directory)
    meta = read_adapter_meta(directory)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise MissingFileError(f"{weights_path} is missing (only safetensors files are read)")
    config = check_config_matches_layers(meta, weights_path)
    tensors = load_weights(weights_path)
    _check_weights(weights_path, meta, config, tensors)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, entry in meta["layers"].items():
        r, d_in, d_out = int(entry["r"]), int(entry["in_features"]), int(entry["out_features"])
        pair = []
        for factor, shape in (("A", (r, d_in)), ("B", (d_out, r))):
            info = entry[factor]
            key = f"{name}.lora_{factor}"
            if info["stored"]:
                if key not in tensors:
                    raise UserError(f"{weights_path} lacks {key!r}, which {CONFIG_NAME} says is stored")
                value = tensors[key]  # dtype, shape, values and fingerprint checked by _check_weights
            elif reuse is not None and (held := reuse(name, factor, info["fingerprint"])) is not None:
                value = held
            else:
                value = init_factor(info["init"], shape, factor, config.seed, name)
                if not fingerprints_match(info["fingerprint"], fingerprint(value)):
                    raise UserError(
                        f"factor {factor} of layer {name!r}, rebuilt from seed={config.seed} init={info['init']!r} "
                        f"shape={shape}, does not match the fingerprint recorded at save time: the seed, init, "
                        f"rank or layer name in {CONFIG_NAME} was changed after saving"
                    )
            pair.append(value)
        factors[name] = (pair[0], pair[1])
    saved = {k[len(SAVED_PREFIX):]: v for k, v in tensors.items() if k.startswith(SAVED_PREFIX)}
    return meta, factors, saved


def load_factors(directory: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer name -> (A, B) from an adapter folder, without needing the base model."""
    factors = read_factors(directory)[1]
    return {n: (a.float(), b.float()) for n, (a, b) in factors.items()}


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None,
                 strict: bool = False) -> nn.Module:
    """Put the adapter saved in ``directory`` onto ``model`` and return the model.

    The base weights the adapter was trained on (a sketch recorded at save time:
    ``asymlora.formats.base_identity``) are compared with ``model``'s first: other weights of the
    same shapes give a ``BaseMismatchWarning`` naming both, or with ``strict`` a UserError before
    the model is touched. Files saved before the record existed load without the check.

    A plain model is wrapped with the saved config first (as adapter ``adapter_name``, default
    "default"). On a wrapped model the file replaces the values of adapter ``adapter_name``
    (default: the active one), which must have exactly the saved layers — or, if no adapter has
    that name yet, it is added as a new, inactive adapter whose frozen factors are shared with
    identical ones already held (``asymlora.core.adapters``). Every shape is checked before any
    weight is written.
    """
    adding = adapter_name is not None and bool(lora_layers(model)) and adapter_name not in list_adapters(model)
    reuse = _reuse_from(model) if adding else None
    meta, factors, saved = read_factors(directory, reuse)
    config = AsymLoraConfig.from_dict(meta["config"])
    layer_names = list(meta["layers"])
    modules = dict(model.named_modules())
    for name, entry in meta["layers"].items():
        module = modules.get(name)
        if module is None:
            raise UserError(f"adapter layer {name!r} does not exist in {type(model).__name__}: wrong base model?")
        shape = linear_shape(module)
        if shape != (entry["in_features"], entry["out_features"]):
            raise UserError(
                f"adapter layer {name!r} was saved for a {entry['in_features']}->{entry['out_features']} layer, "
                f"the model's is {shape[0]}->{shape[1]}: wrong base model?"
            )
    check_base(meta, model, os.fspath(directory), strict)  # the base it was trained on?
    own_params = saved_parameters(model, config)  # only modules_to_save may be written, never a base weight
    for p_name, value in saved.items():
        own = own_params.get(p_name)
        if own is None or own.shape != value.shape:
            where = (f"not a parameter of modules_to_save={list(config.modules_to_save)}" if own is None
                     else f"of shape {tuple(own.shape)}")
            raise UserError(f"saved parameter {p_name!r} {tuple(value.shape)} is {where} in the model")
    unsaved = sorted(set(saved_parameters(model, config)) - set(saved))
    if unsaved:
        raise UserError(
            f"{os.path.join(os.fspath(directory), WEIGHTS_NAME)} lacks {SAVED_PREFIX}{unsaved[0]!r} ({len(unsaved)} "
            f"parameter(s) of modules_to_save={list(config.modules_to_save)} missing); the file is incomplete"
        )
    if adding and adapter_name is not None:  # adding implies a name; said again for the type checker
        _add_from_file(model, adapter_name, config, meta, factors)
        return model
    if lora_layers(model):
        target = resolve_adapter_name(model, adapter_name)
        existing = adapter_layers(model, target)
        if sorted(existing) != sorted(layer_names):
            raise UserError(
                f"model is wrapped with layers {sorted(existing)[:3]}... "
                f"but the adapter has {sorted(layer_names)[:3]}..."
            )
        if get_config(model, target).trainable != config.trainable:
            raise UserError(f"model trains {get_config(model, target).trainable!r}, adapter was saved with "
                            f"trainable={config.trainable!r}: unload the model or wrap it with the adapter's config")
        for name, entry in meta["layers"].items():
            if existing[name].slots[target].r != int(entry["r"]):
                raise UserError(f"model's layer {name!r} is wrapped at rank {existing[name].slots[target].r}, the "
                                f"adapter's is r={entry['r']}: unload the model or wrap it with the adapter's config")
    else:
        target = adapter_name or DEFAULT_ADAPTER
        ranks = {re.escape(n): int(e["r"]) for n, e in meta["layers"].items() if int(e["r"]) != config.r}
        wrap_config = config.replace(target_modules=layer_names, rank_pattern=ranks)
        wrap(model, _placeholder_inits(wrap_config), adapter_name=target)
        state = adapter_state(model)
        state.asymlora_configs[target] = config
        state.asymlora_config = config
    layers = lora_layers(model)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            layer = layers[name]
            _assign(layer, target, "A", a)
            _assign(layer, target, "B", b)
            layer.slots[target].scaling = float(meta["layers"][name]["scaling"])
        for p_name, value in saved.items():
            own_params[p_name].copy_(value.to(own_params[p_name].dtype))
    return model


def resolve_adapter_name(model: nn.Module, adapter_name: str | None) -> str:
    """``adapter_name``, or the one active adapter's name."""
    if adapter_name is None:
        get_config(model)  # raises unless exactly one adapter is active
        return adapter_state(model).asymlora_active[0]
    get_config(model, adapter_name)  # raises for an unknown name
    return adapter_name


def adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, LoraLinear]:
    return {n: layer for n, layer in lora_layers(model).items() if adapter_name in layer.slots}


def _assign(layer: LoraLinear, adapter_name: str, factor: str, value: torch.Tensor) -> None:
    """Write a loaded factor. A trained one is copied in place (optimizers keep their handle);
    a frozen one that differs gets a tensor of its own, so a factor shared with another
    adapter is never changed under it."""
    held = layer.factor(adapter_name, factor)
    value = value.to(device=held.device, dtype=held.dtype)
    if layer.trains(adapter_name, factor):
        held.copy_(value)
    elif not torch.equal(held, value):
        layer.register_buffer(factor_key(factor, adapter_name), value.clone(), persistent=True)


def _reuse_from(model: nn.Module) -> Reuse:
    """A lookup for ``read_factors``: a frozen factor the named layer already holds whose
    fingerprint matches the recorded one (no rebuild, one shared tensor)."""
    modules = dict(model.named_modules())

    def reuse(layer_name: str, factor: str, recorded: dict) -> torch.Tensor | None:
        layer = modules.get(layer_name)
        return shared_frozen(layer, None, recorded) if isinstance(layer, LoraLinear) else None

    return reuse


def _add_from_file(model: nn.Module, adapter_name: str, config: AsymLoraConfig, meta: dict[str, Any],
                   factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add a new named adapter whose factors were read from a file (frozen ones shared)."""
    check_new_adapter(model, adapter_name, config)
    modules = dict(model.named_modules())
    for name, (a, b) in factors.items():
        base = modules[name].base if isinstance(modules[name], LoraLinear) else modules[name]
        a_placed, b_placed = placed_like_base(a, base, config.trains_A), placed_like_base(b, base, config.trains_B)
        attach(model, adapter_name, name, modules[name], a_placed, b_placed, config,
               float(meta["layers"][name]["scaling"]))
    adapter_state(model).asymlora_configs[adapter_name] = config


def placed_like_base(value: torch.Tensor, base: nn.Module, trained: bool) -> torch.Tensor:
    """A factor on the base's device in ``inject.factor_dtype`` (frozen: the base's compute
    dtype; trained: float32 when that is half precision); a tensor already held is kept."""
    device, dtype = weight_of(base).device, factor_dtype(base, trained)
    if value.device == device and (value.dtype == dtype or trained):
        return value
    return value.to(device=device, dtype=dtype)


def _placeholder_inits(config: AsymLoraConfig) -> AsymLoraConfig:
    """Every factor is overwritten from the file right after wrapping: draw cheap placeholders
    (no QR, no SVD) for all non-zero inits."""
    changes = {f: "gaussian" for f in ("init_A", "init_B") if getattr(config, f) != "zero"}
    return config.replace(**changes) if changes else config
