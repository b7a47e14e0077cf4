r"""Information-theoretic generalisation bound for low-rank adapters (Zhu et al. 2024, §4.2).

Xu & Raginsky (2017): for a σ-sub-Gaussian loss and n i.i.d. training samples, the expected
generalisation gap of a learning algorithm with output W obeys

    |E gen| ≤ sqrt(2σ² · I(W; data) / n).

If the k trained parameters are stored with q bits each, I(W; data) ≤ H(W) ≤ q·k·ln 2 nats,
hence |E gen| ≤ sqrt(2σ² · ln2 · q · k / n).  The frozen factor is data-independent (random,
or fixed by a seed), so only the trained factor counts:

    k_both = r · Σ_l (d_in,l + d_out,l),   k_B-only = r · Σ_l d_out,l,   k_A-only = r · Σ_l d_in,l

summed over the adapted layers l.  The B-only/both ratio of the bounds is
sqrt(Σ d_out / Σ (d_in + d_out)) (= 1/√2 for square layers), whatever q, σ and n are.

Layer shapes come from a real module tree (a transformers model built from a config on the
``meta`` device needs no weights), from a local ``config.json`` / model directory, from a
built-in preset of published configurations, or from a list of (d_in, d_out) pairs.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asymlora.errors import UserError

__all__ = [
    "LayerShape",
    "STRATEGIES",
    "PRESETS",
    "count_trainable",
    "info_bound",
    "bound_table",
    "layer_shapes_from_pairs",
    "layer_shapes_from_model",
    "parse_shapes",
    "build_meta_model",
    "load_shapes",
]

STRATEGIES = ("a-only", "b-only", "both")


@dataclass(frozen=True)
class LayerShape:
    """One adapted linear layer: its name and (d_in, d_out)."""

    name: str
    d_in: int
    d_out: int


# ---- parameter counts and the bound -----------------------------------------------------
def _check_pos_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be a positive integer, got {x!r}")
    return x


def _check_pos_float(x: Any, name: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a positive number, got {x!r}") from err
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    return v


def count_trainable(shapes: Sequence[LayerShape], r: int) -> dict[str, int]:
    """Trained adapter parameters for rank r: A-only r·Σd_in, B-only r·Σd_out, both r·Σ(d_in+d_out)."""
    r = _check_pos_int(r, "r")
    if not shapes:
        raise ValueError("no adapted layers: the list of layer shapes is empty")
    s_in = sum(s.d_in for s in shapes)
    s_out = sum(s.d_out for s in shapes)
    return {"a-only": r * s_in, "b-only": r * s_out, "both": r * (s_in + s_out)}


def info_bound(k: int, n: int, q: float = 16, sigma: float = 1.0) -> float:
    """Xu–Raginsky bound sqrt(2σ²·ln2·q·k/n) for k trained parameters of q bits, n samples."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (number of trained parameters) must be an integer >= 0, got {k!r}")
    n = _check_pos_int(n, "n")
    q = _check_pos_float(q, "q")
    sigma = _check_pos_float(sigma, "sigma")
    return math.sqrt(2.0 * sigma * sigma * math.log(2.0) * q * k / n)


def bound_table(
    shapes: Sequence[LayerShape],
    ranks: Iterable[int] = (8, 16),
    q: float = 16,
    sigma: float = 1.0,
    ns: Iterable[int] = (10_000,),
) -> list[dict[str, Any]]:
    """One row per (r, strategy, n): parameters k, the bound, and its ratio to 'both'."""
    ranks = [_check_pos_int(r, "r") for r in ranks]
    ns = [_check_pos_int(n, "n") for n in ns]
    if not ranks:
        raise ValueError("ranks must not be empty")
    if not ns:
        raise ValueError("n must not be empty")
    q = _check_pos_float(q, "q")
    sigma = _check_pos_float(sigma, "sigma")
    rows = []
    for r in ranks:
        counts = count_trainable(shapes, r)
        for n in ns:
            ref = info_bound(counts["both"], n, q, sigma)
            for strat in STRATEGIES:
                b = info_bound(counts[strat], n, q, sigma)
                rows.append(
                    {
                        "r": r,
                        "strategy": strat,
                        "n": n,
                        "q": q,
                        "sigma": sigma,
                        "layers": len(shapes),
                        "params": counts[strat],
                        "bound": b,
                        "ratio_to_both": b / ref if ref > 0 else float("nan"),
                    }
                )
    return rows


# ---- shapes from pairs ------------------------------------------------------------------
def layer_shapes_from_pairs(pairs: Iterable[tuple[int, int]]) -> list[LayerShape]:
    """Layer shapes from (d_in, d_out) pairs (named layer0, layer1, ...)."""
    out = []
    for i, pair in enumerate(pairs):
        try:
            d_in, d_out = pair
        except (TypeError, ValueError) as err:
            raise UserError(f"layer {i}: expected a (d_in, d_out) pair, got {pair!r}") from err
        out.append(LayerShape(f"layer{i}", _check_pos_int(d_in, "d_in"), _check_pos_int(d_out, "d_out")))
    if not out:
        raise UserError("no (d_in, d_out) pairs given")
    return out


_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*(?:\*\s*(\d+))?\s*$")


def parse_shapes(text: str) -> list[LayerShape]:
    """Parse ``"DINxDOUT[*COUNT],..."``, e.g. ``"4096x4096*64"`` (64 layers of 4096→4096)."""
    pairs: list[tuple[int, int]] = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        m = _SHAPE_RE.match(part)
        if not m:
            raise UserError(f"bad shape {part.strip()!r}: expected DINxDOUT or DINxDOUT*COUNT, e.g. 4096x4096*64")
        count = int(m.group(3)) if m.group(3) else 1
        if count < 1:
            raise UserError(f"bad shape {part.strip()!r}: COUNT must be >= 1")
        pairs.extend([(int(m.group(1)), int(m.group(2)))] * count)
    return layer_shapes_from_pairs(pairs)


# ---- shapes from a model ----------------------------------------------------------------


def layer_shapes_from_model(model: Any, targets: Any = None) -> list[LayerShape]:
    """Shapes of the layers an adapter would wrap in ``model`` (works on meta-device models).

    ``targets``: None (per-architecture default), a list of module-name suffixes, a regex
    string, or ``"all-linear"`` — the semantics of ``asymlora.core.inject.find_target_modules``.
    """
    from asymlora.core.inject import find_target_modules
    from asymlora.core.layer import linear_shape

    try:
        found = find_target_modules(model, targets)
    except (ValueError, re.error) as err:  # the targets came from the user
        raise UserError(f"--target-modules {targets!r}: {err}") from err
    out = []
    for name, module in found.items():
        d_in, d_out = linear_shape(module)
        out.append(LayerShape(name, int(d_in), int(d_out)))
    if not out:
        raise UserError(f"no target modules matched targets={targets!r} in {type(model).__name__}")
    return out


# ---- presets of published configurations -------------------------------------------------
# name -> (model_type, config kwargs, description, default targets). Numbers from the published
# model configs; default targets follow the paper's setting for that model (DESIGN §3a):
# query/value for RoBERTa, ViT and LLaMA, q/k/v in every attention block for BART.
PRESETS: dict[str, tuple[str, dict[str, Any], str, list[list[str]]]] = {
    "llama-2-7b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
        "LLaMA-2-7B (32 layers, hidden 4096, MLP 11008)",
        [["q_proj", "v_proj"]],
    ),
    "roberta-large": (
        "roberta",
        dict(
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        "RoBERTa-large (24 layers, hidden 1024)",
        [["query", "value"]],
    ),
    "bart-large": (
        "bart",
        dict(
            vocab_size=50265,
            d_model=1024,
            encoder_layers=12,
            decoder_layers=12,
            encoder_attention_heads=16,
            decoder_attention_heads=16,
            encoder_ffn_dim=4096,
            decoder_ffn_dim=4096,
            max_position_embeddings=1024,
        ),
        "BART-large (12+12 layers, d_model 1024)",
        [["q_proj", "k_proj", "v_proj"]],
    ),
    "vit-base": (
        "vit",
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            image_size=224,
            patch_size=16,
            num_channels=3,
        ),
        "ViT-B/16 (12 layers, hidden 768, 224px)",
        # transformers < 5 names the projections query/value, >= 5 q_proj/v_proj
        [["query", "value"], ["q_proj", "v_proj"]],
    ),
}


def build_meta_model(config: Any) -> Any:
    """Instantiate ``AutoModel.from_config(config)`` on the meta device (no weight memory)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(config)


def _config_from_path(path: Path) -> Any:
    from transformers import AutoConfig

    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise UserError(f"--model {str(path)!r}: no config.json found (give a config.json file or a model directory)")
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"could not read {cfg_file}: {err}") from err
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{cfg_file} has no 'model_type' field; cannot tell which architecture to build")
    mtype = data.pop("model_type")
    try:
        return AutoConfig.for_model(mtype, **data)
    except ValueError as err:
        raise UserError(f"{cfg_file}: unsupported model_type {mtype!r}: {err}") from err


def load_shapes(model: str, targets: Any = None) -> tuple[list[LayerShape], str]:
    """Layer shapes for a preset name (see ``PRESETS``) or a local config.json / model dir.

    ``targets=None`` takes the preset's targets (the paper's setting) or, for a path, the
    per-architecture default of ``asymlora.core.inject``.
    Returns (shapes, description). The model is built on the meta device: no weights are
    read or allocated, nothing is downloaded.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    key = str(model).strip().lower()
    if key in PRESETS:
        from transformers import AutoConfig

        mtype, kwargs, desc, preset_targets = PRESETS[key]
        config = AutoConfig.for_model(mtype, **kwargs)
        if targets is None:
            net = build_meta_model(config)
            names = {n.rsplit(".", 1)[-1] for n, _ in net.named_modules() if n}
            chosen = next((t for t in preset_targets if set(t) <= names), preset_targets[0])
            return layer_shapes_from_model(net, chosen), desc
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise UserError(
                f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}) and no such path"
            )
        config = _config_from_path(path)
        desc = f"{getattr(config, 'model_type', '?')} from {path}"
    net = build_meta_model(config)
    return layer_shapes_from_model(net, targets), desc
