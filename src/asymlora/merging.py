"""Weighted sums of adapters: exact when they share their frozen factor, measured when not.

    report = asymlora.adapters.add_weighted_adapter(model, ["topics", "sentiment"], [1.0, 1.0], "both")
    report = asymlora.adapters.save_weighted_adapter(["c1", "c2", "c3"], [120, 80, 40], "avg", normalize=True)
    print(report)          # method, weights, relative ΔW error per layer and overall

The math. An adapter's update of a layer is ΔW = s·B·A (A: r×d_in, B: d_out×r, s = alpha/r or
alpha/√r). The wanted result of combining adapters i = 1..K with weights wᵢ is

    T = Σ wᵢ·ΔWᵢ = Σ wᵢ·sᵢ·Bᵢ·Aᵢ                       (per layer; negative wᵢ allowed)

* ``exact``: b-only adapters made with one seed hold the *same* frozen A in a layer
  (``asymlora.core.adapters``), so T = s·(Σ wᵢ·(sᵢ/s)·Bᵢ)·A: a new b-only adapter on that same A,
  with the same rank r, whose B is the weighted sum of the B's. Nothing is approximated, the
  rank does not grow, and the result can be trained further like any b-only adapter (FFA-LoRA,
  ICLR 2024, freezes A in federated learning for this reason). The same holds for a-only
  adapters that share one frozen B (T = s·B·Σ wᵢ·(sᵢ/s)·Aᵢ). Whether the frozen factors are
  shared is decided from the tensors themselves (equal values, layer by layer; for folders
  also the SHA-256 fingerprints recorded at save time), never from the configs. Any other set
  of adapters (LoRA, which trains both factors; different seeds; a mix of b-only and a-only)
  is refused, naming the adapters that differ, unless an approximate method is asked for:
* ``linear``: the factors are summed separately, A' = Σ pᵢ·Aᵢ with pᵢ = wᵢ/Σwⱼ and
  B' = Σ wᵢ·sᵢ·Bᵢ (s' = 1): for weights that sum to 1 this is what naive FedAvg does to LoRA
  clients (and what PEFT's ``add_weighted_adapter(..., "linear")`` approximates, with √wᵢ on
  each factor). Wrong in general (B'·A' has cross terms Bᵢ·Aⱼ); equal to ``exact`` when the
  frozen factor is shared.
* ``cat``: A' = [A₁; …; A_K] stacked, B' = [w₁s₁B₁, …, w_Ks_KB_K] side by side (s' = 1):
  exact up to rounding, but the rank is Σ rᵢ.
* ``svd``: the best rank-``rank`` approximation of T (Eckart–Young), computed from the
  factors: T = Bc·Ac with Bc = [wᵢsᵢBᵢ] (d_out×R), Ac = [Aᵢ] (R×d_in), R = Σ rᵢ; QR of Bc and
  Acᵀ leaves an R×R core whose SVD gives T's — O((d_in + d_out)·R²), T is never decomposed.

Errors, reported for every method (``MergeReport``), against T computed densely in float64:
per layer ‖T − s'·B'·A'‖_F / ‖T‖_F, and overall √(Σ_layers ‖T − s'B'A'‖²) / √(Σ_layers ‖T‖²).
For ``exact`` it is the float32 rounding of the summed B (about 1e-8). A result whose error
exceeds 1e-3 is also announced with a ``UserWarning``: an approximation is never silent.
The dense T costs one d_out×d_in float64 matrix per layer at a time.

Trained factors in modules_to_save: inside a model they belong to the model (one copy, used by
every adapter), so the combined adapter has none and uses the model's. Saved folders each carry
their own copy; ``save_weighted_adapter(modules_to_save=...)`` says what to do with them:
``"refuse"`` (default: an error naming the folders that have them), ``"weighted"`` (the same
weighted sum Σ wᵢ·θᵢ of their parameters — with ``normalize`` the FedAvg of those parameters;
exact for the parameters, not for the function, which a head is not linear in together with
the encoder), or ``"drop"`` (the result has none).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from asymlora.core.adapters import attach, check_new_adapter
from asymlora.core.config import AsymLoraConfig
from asymlora.core.inject import adapter_configs, adapter_state, lora_layers
from asymlora.core.layer import is_conv1d
from asymlora.errors import UserError
from asymlora.formats.base_identity import check_same_base
from asymlora.formats.native import (
    WEIGHTS_NAME,
    LayerFactors,
    adapter_layers,
    check_config_matches_layers,
    placed_like_base,
    read_adapter_meta,
    read_factors,
    write_adapter,
)

__all__ = ["METHODS", "MergeReport", "add_weighted_adapter", "save_weighted_adapter"]

METHODS = ("exact", "linear", "cat", "svd")
MODULES_TO_SAVE_CHOICES = ("refuse", "weighted", "drop")
WARN_ERROR = 1e-3  # a relative ΔW error above this is announced with a UserWarning

Adapter = dict[str, LayerFactors]  # layer name -> factors of one adapter


@dataclass
class MergeReport:
    """What a weighted combination did: the inputs, the weights as applied, and the measured
    relative ΔW error (module docstring) per layer and overall."""

    name: str                   # the new adapter's name, or the output folder
    method: str
    adapters: list[str]
    weights: list[float]        # as applied (after ``normalize``)
    shared: str | None       # "A" / "B": the frozen factor all inputs share; None: none shared
    ranks: dict[str, int]       # layer -> rank of the result
    layer_errors: dict[str, float] = field(default_factory=dict)
    error: float = 0.0

    @property
    def exact(self) -> bool:
        """Σ wᵢ·ΔWᵢ is represented without approximation (a shared frozen factor and ``exact``
        or ``linear``, or ``cat``)."""
        return self.method == "cat" or (self.shared is not None and self.method in ("exact", "linear"))

    def worst_layer(self) -> tuple[str, float]:
        name = max(self.layer_errors, key=lambda n: self.layer_errors[n])
        return name, self.layer_errors[name]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "adapters": self.adapters, "weights": self.weights,
                "shared_frozen_factor": self.shared, "exact": self.exact, "relative_error": self.error,
                "layer_relative_errors": self.layer_errors, "ranks": self.ranks}

    def __str__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        how = {True: f"exact (shared frozen {self.shared})", False: "approximate"}[self.exact]
        if self.method == "cat":
            how = "exact up to rounding, rank grows"
        worst, worst_err = self.worst_layer()
        pairs = ", ".join(f"{a} x {w:g}" for a, w in zip(self.adapters, self.weights))
        return "\n".join([
            f"{self.name}: method {self.method}, {how}, rank {'/'.join(map(str, ranks))}, {len(self.ranks)} layers",
            f"  sum of: {pairs}",
            f"  relative dW error ||sum w*dW - result|| / ||sum w*dW||: overall {self.error:.3g}, "
            f"worst layer {worst_err:.3g} ({worst})",
        ])


# ---------------------------------------------------------------------------- checks
def _check_weights(adapters: Sequence[str], weights: Sequence[float], normalize: bool) -> list[float]:
    if isinstance(adapters, str):
        raise UserError(f"adapters must be a list of names or folders, got the string {adapters!r}")
    if not adapters:
        raise UserError("no adapters given: name at least one adapter to combine")
    weights = list(weights)
    if len(weights) != len(adapters):
        raise UserError(f"{len(weights)} weights {weights} for {len(adapters)} adapters {list(adapters)}: "
                        "give one weight per adapter")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise UserError(f"weight {w!r} is not a finite number; weights are numbers, negative allowed")
    weights = [float(w) for w in weights]
    if normalize:
        total = sum(weights)
        if total == 0:
            raise UserError(f"weights {weights} sum to 0: cannot normalize them (drop normalize, or change a weight)")
        weights = [w / total for w in weights]
    return weights


def _check_method(method: str, rank: int | None) -> None:
    if method not in METHODS:
        raise UserError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method == "svd":
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UserError(f"method 'svd' needs rank = an integer >= 1 (the rank of the result), got {rank!r}")
    elif rank is not None:
        raise UserError(f"rank={rank!r} is only used by method 'svd' (method {method!r} sets the rank itself)")


def _frozen_factor(adapter: Adapter) -> str | None:
    """"A" if the adapter trains only B in every layer (b-only), "B" if only A; else None."""
    if all(not lf.trains_A and lf.trains_B for lf in adapter.values()):
        return "A"
    if all(lf.trains_A and not lf.trains_B for lf in adapter.values()):
        return "B"
    return None


def _same_tensor(x: Any, y: Any) -> bool:
    """Equal values (a tensor), or equal recorded fingerprints (``_Recorded``)."""
    if x is y:
        return True
    if isinstance(x, _Recorded) or isinstance(y, _Recorded):
        return isinstance(x, _Recorded) and isinstance(y, _Recorded) and x.equal(y)
    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y.to(x.device))


def _describe(adapter: Adapter) -> str:
    kinds = {(lf.trains_A, lf.trains_B) for lf in adapter.values()}
    if kinds == {(True, True)}:
        return "trains A and B (LoRA), so it has no frozen factor to share"
    return "trains " + " or ".join(sorted({"".join(f for f, t in zip("AB", k) if t) or "nothing" for k in kinds}))


def shared_frozen_factor(sources: dict[str, Adapter]) -> tuple[str | None, list[str]]:
    """The frozen factor ("A" or "B") that every adapter of ``sources`` holds with equal values
    in every layer, and [] — or None and the reasons, one per adapter that differs."""
    names = list(sources)
    first = names[0]
    ref = _frozen_factor(sources[first])
    problems: list[str] = []
    if ref is None:
        problems.append(f"{first!r} {_describe(sources[first])}")
    for name in names[1:]:
        kind = _frozen_factor(sources[name])
        if kind is None:
            problems.append(f"{name!r} {_describe(sources[name])}")
        elif ref is not None and kind != ref:
            problems.append(f"{name!r} freezes {kind} but {first!r} freezes {ref}")
        elif ref is not None:
            differ = [layer for layer, lf in sources[name].items()
                      if not _same_tensor(getattr(sources[first][layer], ref), getattr(lf, ref))]
            if differ:
                problems.append(f"{name!r} has another frozen {ref} than {first!r} in {len(differ)} of "
                                f"{len(sources[name])} layers (e.g. {differ[0]!r}; a different seed, init or rank)")
    return (ref if not problems else None), problems


def _check_layers(sources: dict[str, Adapter]) -> list[str]:
    names = list(sources)
    layers = list(sources[names[0]])
    for name in names[1:]:
        missing = sorted(set(layers) - set(sources[name]))
        extra = sorted(set(sources[name]) - set(layers))
        if missing or extra:
            what = f"lacks layer {missing[0]!r}" if missing else f"has layer {extra[0]!r}"
            raise UserError(f"adapters {names[0]!r} and {name!r} adapt different layers ({name!r} {what}, "
                            f"{len(missing) + len(extra)} differences): combine adapters of the same target modules")
        for layer in layers:
            a, b = sources[names[0]][layer], sources[name][layer]
            if (a.A.shape[1], a.B.shape[0]) != (b.A.shape[1], b.B.shape[0]):
                raise UserError(f"layer {layer!r} is {a.A.shape[1]}->{a.B.shape[0]} in {names[0]!r} but "
                                f"{b.A.shape[1]}->{b.B.shape[0]} in {name!r}: adapters of different base models")
    return layers


def _refusal(names: Sequence[str], problems: list[str]) -> UserError:
    return UserError(
        f"cannot combine {list(names)} exactly: {'; '.join(problems)}. An exact weighted sum needs every adapter to "
        "train only B on one shared frozen A (b-only adapters made with one seed and rank) or only A on one shared "
        "frozen B; ask for an approximation whose error is measured and reported instead: method='svd' with "
        "rank=K, 'cat' (rank adds up) or 'linear' (factors averaged separately)"
    )


# ---------------------------------------------------------------------------- the combination
def _total(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ terms in order: the builtin ``sum`` (which starts from the int 0), typed as the tensor it returns."""
    return cast(torch.Tensor, sum(terms))


def _dense(lf: LayerFactors) -> torch.Tensor:
    return lf.scaling * (lf.B.detach().to("cpu", torch.float64) @ lf.A.detach().to("cpu", torch.float64))


def _combine_layer(parts: list[LayerFactors], weights: list[float], method: str, shared: str | None,
                   rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A', B', s') of the result in one layer (float64 on CPU, except a shared frozen factor,
    which is returned as the very tensor the inputs hold)."""
    first = parts[0]
    s0 = first.scaling

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64)

    if shared is not None and method in ("exact", "linear"):
        coef = [w * lf.scaling / s0 for w, lf in zip(weights, parts)]
        trained = "B" if shared == "A" else "A"
        summed = _total(c * f64(getattr(lf, trained)) for c, lf in zip(coef, parts))
        return (first.A, summed, s0) if shared == "A" else (summed, first.B, s0)
    if method == "linear":
        ranks = {lf.A.shape[0] for lf in parts}
        if len(ranks) > 1:
            raise UserError(f"method 'linear' sums A's and B's entry by entry, which needs one rank; the adapters "
                            f"have ranks {sorted(ranks)} in a layer: use method 'cat' or 'svd'")
        total = sum(weights)
        if total == 0:
            raise UserError(f"method 'linear' averages the A's with weights w/sum(w), but the weights {weights} sum "
                            "to 0: use method 'cat' or 'svd'")
        a = _total((w / total) * f64(lf.A) for w, lf in zip(weights, parts))
        b = _total((w * lf.scaling) * f64(lf.B) for w, lf in zip(weights, parts))
        return a, b, 1.0
    ac = torch.cat([f64(lf.A) for lf in parts], 0)                                   # (R, d_in)
    bc = torch.cat([(w * lf.scaling) * f64(lf.B) for w, lf in zip(weights, parts)], 1)  # (d_out, R)
    if method == "cat":
        return ac, bc, 1.0
    # svd: T = bc·ac = Qb·(Rb·Raᵀ)·Qaᵀ; the SVD of the R×R core gives T's singular triplets
    assert rank is not None  # the arguments' check requires a rank for svd
    qb, rb = torch.linalg.qr(bc)
    qa, ra = torch.linalg.qr(ac.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(int(rank), s.numel())
    b_new = (qb @ u[:, :k]) * s[:k]
    a_new = vh[:k] @ qa.T
    d_out, d_in = bc.shape[0], ac.shape[1]
    want = min(int(rank), d_in, d_out)
    if k < want:  # T has rank <= R < rank: pad with zero directions, the result is exact
        a_new = torch.cat([a_new, a_new.new_zeros(want - k, d_in)])
        b_new = torch.cat([b_new, b_new.new_zeros(d_out, want - k)], 1)
    return a_new, b_new, 1.0


def combine(sources: dict[str, Adapter], weights: list[float], method: str, rank: int | None,
            name: str) -> tuple[dict[str, LayerFactors], str | None, MergeReport]:
    """The result of combining ``sources`` (name -> layer -> factors) with ``weights``: its
    factors per layer (in the dtype of the first adapter's trained factor), the shared frozen
    factor ("A"/"B"/None) and the report with the measured errors. Everything is checked first."""
    names = list(sources)
    layers = _check_layers(sources)
    shared, problems = shared_frozen_factor(sources)
    if method == "exact" and shared is None:
        raise _refusal(names, problems)
    out: dict[str, LayerFactors] = {}
    errors: dict[str, float] = {}
    err_sq = ref_sq = 0.0
    for layer in layers:
        parts = [sources[n][layer] for n in names]
        a, b, s = _combine_layer(parts, weights, method, shared, rank)
        target = sum(w * _dense(lf) for w, lf in zip(weights, parts))
        first = parts[0]
        if shared is not None and method in ("exact", "linear"):
            trained = "B" if shared == "A" else "A"
            held = getattr(first, trained)
            a, b = (a, b.to(held.dtype)) if shared == "A" else (a.to(held.dtype), b)
            lf_new = LayerFactors(a, b, s, first.trains_A, first.trains_B, first.conv1d)
        else:
            dtype = first.B.dtype if first.trains_B else first.A.dtype
            lf_new = LayerFactors(a.to(dtype), b.to(dtype), s, True, True, first.conv1d)
        diff = float(torch.linalg.matrix_norm(target - _dense(lf_new)) ** 2)
        ref = float(torch.linalg.matrix_norm(target) ** 2)
        errors[layer] = math.sqrt(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf)
        err_sq, ref_sq = err_sq + diff, ref_sq + ref
        out[layer] = lf_new
    error = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf)
    report = MergeReport(name, method, names, weights, shared, {n: int(lf.A.shape[0]) for n, lf in out.items()},
                         errors, error)
    if error > WARN_ERROR:
        worst, worst_err = report.worst_layer()
        warnings.warn(f"{name}: method {method!r} approximates the weighted sum of {names} with a relative dW error "
                      f"of {error:.3g} overall ({worst_err:.3g} in {worst})", UserWarning, stacklevel=3)
    return out, shared, report


def result_config(base: AsymLoraConfig, factors: dict[str, LayerFactors], shared: str | None,
                  method: str, modules_to_save: list[str]) -> AsymLoraConfig:
    """The config of the result: the first adapter's when the frozen factor is shared and the
    method keeps it (same seed, init, rank, alpha); otherwise a LoRA config (train "AB") with
    the scaling folded into B (alpha = r, so s = 1) and each layer's rank."""
    if shared is not None and method in ("exact", "linear"):
        return base.replace(modules_to_save=list(modules_to_save))
    ranks = {n: int(lf.A.shape[0]) for n, lf in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {re.escape(n): k for n, k in ranks.items() if k != r}
    return AsymLoraConfig(r=r, alpha=float(r), scaling="standard", dropout=base.dropout, trainable="AB",
                          init_A="kaiming", init_B="zero", seed=base.seed, target_modules=sorted(factors),
                          modules_to_save=list(modules_to_save), rank_pattern=other,
                          alpha_pattern={p: float(k) for p, k in other.items()})


# ---------------------------------------------------------------------------- on a model
def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         method: str = "exact", rank: int | None = None, normalize: bool = False) -> MergeReport:
    """Add adapter ``adapter_name`` whose update is Σ wᵢ·ΔWᵢ of the named ``adapters`` with
    ``weights`` (negative allowed; ``normalize``: divided by their sum, a weighted mean) and
    return the report with its measured error (module docstring).

    ``method="exact"`` (default) needs the adapters to share their frozen factor — b-only
    adapters of one seed and rank, checked on the tensors — and refuses anything else with a
    ``UserError`` naming the adapters that differ. The result then is an adapter of the same
    kind on the same frozen A (one buffer, shared with the inputs). ``"linear"``, ``"cat"``
    and ``"svd"`` (with ``rank``) approximate instead; their result trains A and B. The new
    adapter is inactive (``set_adapter``) and has no modules_to_save (the model's are used).
    Everything is checked before the model changes.
    """
    names = list(adapters) if not isinstance(adapters, str) else adapters
    weights = _check_weights(names, weights, normalize)
    _check_method(method, rank)
    configs = adapter_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise UserError(f"unknown adapter(s) {unknown}; the model has {list(configs)}")
    check_new_adapter(model, adapter_name, configs[names[0]].replace(modules_to_save=[]))
    if len(set(names)) != len(names):
        raise UserError(f"adapters {names} name one adapter twice; add its weights up instead")
    sources = {
        n: {ln: LayerFactors(*layer.factors(n), layer.slots[n].scaling, layer.trains(n, "A"), layer.trains(n, "B"),
                             is_conv1d(layer.base))
            for ln, layer in adapter_layers(model, n).items()}
        for n in names
    }
    factors, shared, report = combine(sources, weights, method, rank, adapter_name)
    config = result_config(configs[names[0]], factors, shared, method, [])
    layers = lora_layers(model)
    with torch.no_grad():
        placed = {}
        for ln, lf in factors.items():
            base = layers[ln].base
            placed[ln] = (placed_like_base(lf.A, base, lf.trains_A), placed_like_base(lf.B, base, lf.trains_B))
    for ln, lf in factors.items():
        attach(model, adapter_name, ln, layers[ln], *placed[ln], config, lf.scaling)
    adapter_state(model).asymlora_configs[adapter_name] = config
    return report


# ---------------------------------------------------------------------------- on folders
def _folder_check(folders: list[str], method: str) -> list[dict[str, Any]]:
    """Read and check every folder's config before any tensor is loaded; for ``exact``, refuse
    from the recorded fingerprints already (the tensors are compared again after loading)."""
    metas = []
    for folder in folders:
        meta = read_adapter_meta(folder)
        weights_path = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights_path):
            raise UserError(f"{weights_path} is missing: {folder!r} is not a complete adapter folder")
        check_config_matches_layers(meta, weights_path)
        metas.append(meta)
    if method == "exact":
        recorded = {f: {ln: LayerFactors(_recorded(e["A"]), _recorded(e["B"]), e["scaling"], e["A"]["trained"],
                                         e["B"]["trained"]) for ln, e in m["layers"].items()}
                    for f, m in zip(folders, metas)}
        _check_layers(recorded)
        shared, problems = shared_frozen_factor(recorded)
        if shared is None:
            raise _refusal(folders, problems)
    return metas


class _Recorded:
    """A factor known only by its recorded fingerprint: compares by SHA-256 and shape."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.fp = info["fingerprint"]
        self.shape = tuple(self.fp["shape"])

    def equal(self, other: _Recorded) -> bool:
        return self.fp["sha256"] == other.fp["sha256"] and self.shape == other.shape


def _recorded(info: dict[str, Any]) -> torch.Tensor:
    """A :class:`_Recorded` in a factor's place: the folder checks read only its ``shape`` and
    compare it with ``equal``."""
    return cast(torch.Tensor, _Recorded(info))


def save_weighted_adapter(adapter_dirs: Sequence[str | os.PathLike], weights: Sequence[float],
                          output_dir: str | os.PathLike, method: str = "exact", rank: int | None = None,
                          normalize: bool = False, modules_to_save: str = "refuse",
                          strict: bool = False) -> MergeReport:
    """Combine saved adapter folders into one saved adapter folder, Σ wᵢ·ΔWᵢ, without the base
    model, and return the report (also recorded as ``"weighted_sum"`` in the new
    ``adapter_config.json``). Same methods, checks and refusals as ``add_weighted_adapter``;
    ``normalize=True`` with sample counts as weights is federated averaging. ``modules_to_save``:
    ``"refuse"`` | ``"weighted"`` | ``"drop"`` (module docstring). ``output_dir`` must not
    exist or be empty; it appears complete or not at all. Folders trained on different base weights
    (their recorded sketches: ``asymlora.formats.base_identity``) give a warning naming two of them,
    or with ``strict`` a UserError.
    """
    if isinstance(adapter_dirs, (str, os.PathLike)):
        raise UserError(f"adapter_dirs must be a list of folders, got the single path {os.fspath(adapter_dirs)!r}")
    folders = [os.fspath(d) for d in adapter_dirs]
    weights = _check_weights(folders, weights, normalize)
    _check_method(method, rank)
    if modules_to_save not in MODULES_TO_SAVE_CHOICES:
        raise UserError(f"modules_to_save={modules_to_save!r} is not one of {', '.join(MODULES_TO_SAVE_CHOICES)}")
    out = os.path.abspath(os.fspath(output_dir))
    if os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise UserError(f"output folder {os.fspath(output_dir)!r} already exists and is not empty; remove it or "
                        "pick another folder")
    if len({os.path.abspath(f) for f in folders}) != len(folders):
        raise UserError(f"adapter folders {folders} name one folder twice; add its weights up instead")
    metas = _folder_check(folders, method)
    base_weights = check_same_base(dict(zip(folders, metas)), strict)
    configs = [AsymLoraConfig.from_dict(m["config"]) for m in metas]
    with_saved = [f for f, c in zip(folders, configs) if c.modules_to_save]
    keep: list[str] = []
    if with_saved and modules_to_save == "refuse":
        raise UserError(f"{with_saved} carry modules_to_save ({configs[folders.index(with_saved[0])].modules_to_save})"
                        ": pass modules_to_save='weighted' to sum their parameters with the same weights, or 'drop' "
                        "to leave them out of the result")
    if modules_to_save == "weighted" and with_saved:
        lists = {tuple(c.modules_to_save) for c in configs}
        if len(lists) > 1:
            raise UserError(f"the folders have different modules_to_save ({sorted(lists)}): 'weighted' needs the same "
                            "modules in every folder; use 'drop'")
        keep = list(configs[0].modules_to_save)
    reuse_cache: dict[tuple[str, str, str], torch.Tensor] = {}

    def reuse(layer: str, factor: str, recorded: dict) -> torch.Tensor | None:
        return reuse_cache.get((layer, factor, recorded["sha256"]))  # rebuild a shared frozen factor once

    sources: dict[str, Adapter] = {}
    saved_params: list[dict[str, torch.Tensor]] = []
    for folder in folders:
        meta, factors, saved = read_factors(folder, reuse)
        adapter = {}
        for ln, (a, b) in factors.items():
            entry = meta["layers"][ln]
            for factor, t in (("A", a), ("B", b)):
                if not entry[factor]["trained"]:
                    reuse_cache.setdefault((ln, factor, entry[factor]["fingerprint"]["sha256"]), t)
            adapter[ln] = LayerFactors(a, b, float(entry["scaling"]), bool(entry["A"]["trained"]),
                                       bool(entry["B"]["trained"]), bool(entry.get("conv1d")))
        sources[folder] = adapter
        saved_params.append(saved)
    combined, shared, report = combine(sources, weights, method, rank, os.fspath(output_dir))
    saved_out: dict[str, torch.Tensor] = {}
    if keep:
        keys = set(saved_params[0])
        for folder, params in zip(folders[1:], saved_params[1:]):
            if set(params) != keys:
                raise UserError(f"{folder!r} saved other modules_to_save parameters than {folders[0]!r}")
        for key in sorted(keys):
            total = _total(w * p[key].to(torch.float64) for w, p in zip(weights, saved_params))
            saved_out[key] = total.to(saved_params[0][key].dtype)
    config = result_config(configs[0], combined, shared, method, keep)
    extra = {"weighted_sum": {**report.to_dict(), "adapters": [os.fspath(f) for f in folders],
                              "modules_to_save": modules_to_save if with_saved else None}}
    extra["weighted_sum"].pop("name")
    if base_weights is not None:
        extra["base_weights"] = base_weights
    # write_adapter fills a hidden sibling folder and swaps it in: the output appears complete or not at all
    write_adapter(out, config, combined, saved_out, metas[0].get("base_model"), metas[0].get("base_class"),
                  extra=extra)
    return report

