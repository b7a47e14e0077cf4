r"""The paper's §4 theory measured on a real model and real data, layer by layer, before training.

Zhu et al. (ICML 2024), section 4: a linear layer ``y = W0·x`` adapted by ``W0 + B·A`` on
inputs with second moment Σ and target update Δ has excess loss ``‖(Δ − BA)·Σ^{1/2}‖²_F``.
With M = Δ·Σ^{1/2} the fraction of the signal ‖M‖² an adapter captures at rank r is

* b-only (A frozen Haar-random, B trained; Lemma 4.1 averaged as in Theorem 4.3):
  E_Q ‖M·P_Q‖² / ‖M‖², P_Q the projector onto col(Σ^{1/2}·Qᵀ) — Monte-Carlo with a standard
  error, or a closed form where one applies (``asymlora.theory.expected_loss_b_only``);
* a-only (B frozen Haar-random, A trained; Lemma 4.2, Theorem 4.3): exactly r/d_out
  (``expected_loss_a_only``);
* both trained: the Eckart–Young top-r share Σ_{i≤r} s_i(M)² / ‖M‖² (``optimal_both``).

This module estimates Σ and a proxy Δ for every target layer of a real network and hands them
to those functions; it does not re-derive any of them.

Estimating Σ (exact, streaming)
-------------------------------
Forward hooks on the target layers record the layer input x of every real (non-padding) token;
``Σ̂ = (1/N)·Σ_t x_t x_tᵀ`` is accumulated in float64, so memory is d_in² + d_out·d_in floats
per layer (18.9 MB for d_in = 1536) and no sketch is used: Σ̂ has no approximation error beyond
the sampling error of the N tokens (and float64 rounding). It is the *uncentred* second moment
E[xxᵀ]: the adapter has no bias, so the loss ‖(Δ − BA)x‖² involves E[xxᵀ]; it equals the
covariance of the paper for zero-mean inputs. The centred covariance's effective rank is also
reported. With N < d_in, Σ̂ is rank-deficient by construction and b-only looks better than it
is: the rows say ``n_tokens``; keep N several times d_in.

The proxy target update Δ (the choice, and why)
-----------------------------------------------
Fine-tuning starts at W0 (B = 0) with the freshly initialised classification head, so the
gradient the adapters first see is ``G = ∂L/∂W = Σ_t δ_t x_tᵀ`` (δ_t = ∂L/∂y_t at that token),
collected here on the same tokens as Σ̂. In the paper's linear model the gradient at W0 is
``G = −2·Δ·Σ``, and the loss as a function of an update C is, up to a constant,
``⟨G, C⟩ + tr(C Σ Cᵀ) = ‖(C − Δ)·Σ^{1/2}‖² − ‖Δ·Σ^{1/2}‖²``. So we take

    Δ = −½·G·Σ⁺,     M = Δ·Σ^{1/2} = −½·G·Σ^{+1/2} = −½·Σ_t δ_t (Σ^{+1/2} x_t)ᵀ,

the unique update (on range Σ) for which the paper's model reproduces both the observed
gradient and the observed input statistics: the local quadratic model of the loss with the
paper's isotropic output metric. For an exactly linear-regression layer Δ̂ is the
least-squares solution, i.e. the true Δ when the targets are noise-free (tested).
Why not Δ ∝ −G: that puts Σ in twice (M ∝ Δ·Σ^{3/2}) and leans M toward the high-variance
inputs by construction, which would flatter b-only before any data is seen; with our choice M
is the gradient in *whitened* input coordinates, and whether its energy sits in the
high-variance directions — the condition under which Theorem 4.3 favours b-only — is what the
probe measures. Limits: the output metric of a cross-entropy loss is not isotropic, and the
gradient is taken at step 0 with a random head; the numbers predict the first steps of
fine-tuning, not its end.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from asymlora.core.layer import linear_shape
from asymlora.errors import UserError
from asymlora.theory.linear import (
    LinearProblem,
    effective_rank,
    expected_loss_a_only,
    expected_loss_b_only,
    optimal_both,
)

__all__ = [
    "LayerMoments",
    "check_real_weights",
    "collect_moments",
    "proxy_problem",
    "analyse_layer",
    "smallest_rank",
    "layer_group",
    "summarize",
    "probe_memory_bytes",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


# ---- streaming statistics ----------------------------------------------------------------
@dataclass
class LayerMoments:
    """Running sums over the tokens seen by one linear layer (float64).

    ``xx = Σ_t x_t x_tᵀ`` (d_in × d_in), ``gx = Σ_t δ_t x_tᵀ`` (d_out × d_in: the loss gradient
    with respect to the dense weight W of y = W·x), ``x_sum = Σ_t x_t``, ``n_tokens``.
    """

    name: str
    d_in: int
    d_out: int
    xx: torch.Tensor
    gx: torch.Tensor
    x_sum: torch.Tensor
    n_tokens: int = 0

    @classmethod
    def empty(cls, name: str, d_in: int, d_out: int) -> LayerMoments:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(name, d_in, d_out, z(d_in, d_in), z(d_out, d_in), z(d_in))

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> None:
        """Add tokens: ``x`` (n × d_in) and their output gradients ``delta`` (n × d_out; None = 0)."""
        x = x.detach().to("cpu", torch.float64)
        self.xx += x.T @ x
        self.x_sum += x.sum(0)
        if delta is not None:
            self.gx += delta.detach().to("cpu", torch.float64).T @ x
        self.n_tokens += int(x.shape[0])

    @property
    def sigma(self) -> np.ndarray:
        """Σ̂ = E[x xᵀ] over the tokens seen (uncentred)."""
        return (self.xx / max(self.n_tokens, 1)).numpy()

    @property
    def centred_covariance(self) -> np.ndarray:
        mean = self.x_sum / max(self.n_tokens, 1)
        return self.sigma - torch.outer(mean, mean).numpy()

    @property
    def gradient(self) -> np.ndarray:
        """G = Σ_t δ_t x_tᵀ = ∂L/∂W (d_out × d_in)."""
        return self.gx.numpy()


def check_real_weights(model: nn.Module) -> None:
    """Raise UserError when any parameter or buffer lives on the ``meta`` device (no values)."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise UserError(
            f"the model has no real weights: {len(meta)} tensors are on the 'meta' device "
            f"(e.g. {meta[0]!r}); the probe runs real examples through the model, so load it with "
            "its weights (e.g. from_pretrained without device_map='meta' / init_empty_weights)"
        )


def probe_memory_bytes(shapes: Iterable[tuple[int, int]]) -> int:
    """Bytes of the float64 accumulators for layers of (d_in, d_out): 8·(d_in² + d_out·d_in + d_in)."""
    return sum(8 * (i * i + o * i + i) for i, o in shapes)


def _tokens(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``t`` (…, d) for the real tokens: ``t[mask]`` when the leading dims are the mask's."""
    if mask is not None and tuple(t.shape[:-1]) == tuple(mask.shape):
        return t[mask]
    return t.reshape(-1, t.shape[-1])


class _Recorder:
    """Forward hooks that keep each call's (input, output) of the target layers for one batch."""

    def __init__(self, targets: Mapping[str, nn.Module]) -> None:
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in targets.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.calls.append((name, args[0], output))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@contextlib.contextmanager
def _probe_mode(model: nn.Module, targets: Mapping[str, nn.Module]) -> Iterator[_Recorder]:
    """eval mode, gradients only through the target weights, hooks on; all restored on exit."""
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    recorder = None
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for m in targets.values():
            m.weight.requires_grad_(True)  # so the layer outputs carry a graph to take δ from
        recorder = _Recorder(targets)
        yield recorder
    finally:
        if recorder is not None:
            recorder.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def collect_moments(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn,
    targets: Mapping[str, nn.Module],
    mask_fn: Callable[[Any], torch.Tensor | None] | None = None,
) -> dict[str, LayerMoments]:
    """Run ``batches`` through the frozen model and accumulate Σ̂ and G for every target layer.

    ``loss_fn(model, batch)`` returns a scalar loss summed (not averaged) over the batch's
    examples, so every example weighs the same whatever the batch sizes. ``mask_fn(batch)``
    returns a bool (batch × seq) mask of the real tokens (default: ``batch["attention_mask"]``
    when the batch is a dict with one); other positions are left out of both sums. The model's
    parameters, buffers, ``requires_grad`` flags and train/eval mode are unchanged afterwards and
    no hook stays registered; parameters' ``.grad`` are not touched (``torch.autograd.grad``).
    """
    check_real_weights(model)
    if not targets:
        raise UserError("no target layers to probe")
    moments = {n: LayerMoments.empty(n, *linear_shape(m)) for n, m in targets.items()}
    mask_fn = mask_fn or _attention_mask
    with _probe_mode(model, targets) as rec:
        for batch in batches:
            rec.calls.clear()
            mask = mask_fn(batch)
            loss = loss_fn(model, batch)
            outs = [y for _, _, y in rec.calls]
            grads = torch.autograd.grad(loss, outs, allow_unused=True) if outs else []
            for (name, x, _y), g in zip(rec.calls, grads):
                moments[name].add(_tokens(x, mask), None if g is None else _tokens(g, mask))
            rec.calls.clear()
    missing = [n for n, m in moments.items() if m.n_tokens == 0]
    if missing:
        raise UserError(f"target layer(s) {missing[:3]} never ran in the forward pass; pick layers the model uses")
    return moments


def _attention_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    return None


# ---- the theory, per layer -----------------------------------------------------------------
def proxy_problem(moments: LayerMoments) -> LinearProblem:
    """The paper's linear problem for one layer: W0 = 0, W_t = Δ = −½·G·Σ̂⁺, Σ = Σ̂ (σ² = 0).

    Σ̂⁺ is taken from the clipped eigendecomposition ``LinearProblem`` itself uses, so
    M = Δ·Σ̂^{1/2} = −½·G·Σ̂^{+1/2} exactly (see the module docstring for the choice of Δ).
    """
    zeros = np.zeros((moments.d_out, moments.d_in))
    base = LinearProblem(zeros, moments.gradient, moments.sigma)
    delta = -0.5 * moments.gradient @ base.pinv_sqrt_sigma @ base.pinv_sqrt_sigma
    return LinearProblem(zeros, delta, moments.sigma)


def _b_only(problem: LinearProblem, r: int, n_samples: int, seed: Any, method: str) -> tuple[float, float, str]:
    """(fraction, its s.e., method) of the signal b-only captures at rank r (Lemma 4.1, Thm 4.3)."""
    e = expected_loss_b_only(problem, r, method=method, n_samples=n_samples, seed=np.random.default_rng(seed))
    return e.fraction, e.se / problem.signal, e.method


def _both(problem: LinearProblem, r: int) -> float:
    return optimal_both(problem, r).explained / problem.signal


def smallest_rank(
    problem: LinearProblem,
    target: float = 0.9,
    *,
    r_max: int | None = None,
    n_samples: int = 200,
    samples_at: int = 8,
    seed: Any = 0,
    method: str = "auto",
) -> int | None:
    """Smallest r ≤ r_max at which E[b-only fraction] ≥ target · (both fraction); None if none.

    Doubling r = 1, 2, 4, … (then r_max), then bisection inside the first bracket that passes,
    down to a bracket of width max(1, r/32): the answer is exact below r = 32 and at most ~3 %
    too large above. This assumes the ratio grows with r (it is 1 once r ≥ rank Σ), and a
    decision near the threshold carries the Monte-Carlo error. To keep the cost ∝ d_in²·r·n
    flat, ranks above ``samples_at`` use n_samples·samples_at/r draws (at least 4): the b-only
    fraction concentrates as r grows.
    """
    if not problem.signal > 0:
        return None
    r_max = min(problem.d_in, problem.d_out) if r_max is None else min(r_max, problem.d_in, problem.d_out)
    cache: dict[int, bool] = {}

    def passes(r: int) -> bool:
        if r not in cache:
            n = n_samples if r <= samples_at else max(4, math.ceil(n_samples * samples_at / r))
            frac, _, _ = _b_only(problem, r, n, [*np.atleast_1d(seed).tolist(), r], method)
            cache[r] = frac >= target * _both(problem, r)
        return cache[r]

    lo, hi = 0, None
    r = 1
    while r <= r_max:
        if passes(r):
            hi = r
            break
        lo = r
        r = r * 2 if r * 2 <= r_max or r == r_max else r_max
    if hi is None:
        return None
    while hi - lo > max(1, hi // 32):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi


def analyse_layer(
    moments: LayerMoments,
    r: int,
    *,
    n_samples: int = 200,
    seed: Any = 0,
    method: str = "auto",
    target: float = 0.9,
    r_max: int | None = None,
) -> dict[str, Any]:
    """One row of the probe table: Σ̂'s effective rank and the fractions of the proxy signal
    ‖M‖² captured at rank r by b-only (± Monte-Carlo s.e.), a-only and both, plus r90."""
    if r > min(moments.d_in, moments.d_out):
        raise UserError(f"rank r={r} exceeds layer {moments.name!r} ({moments.d_in}→{moments.d_out}); "
                        f"valid: 1..{min(moments.d_in, moments.d_out)}")
    prob = proxy_problem(moments)
    row: dict[str, Any] = {
        "layer": moments.name,
        "group": layer_group(moments.name),
        "d_in": moments.d_in,
        "d_out": moments.d_out,
        "n_tokens": moments.n_tokens,
        "sigma_rank": prob.sigma_rank,
        "effective_rank": effective_rank(prob.Sigma),
        "effective_rank_centred": effective_rank(moments.centred_covariance),
        "r": r,
        "signal": prob.signal,
    }
    if not prob.signal > 0:  # the layer does not influence the loss on these examples
        nan = float("nan")
        return {**row, "frac_a_only": nan, "frac_b_only": nan, "se_b_only": nan, "method_b_only": "none",
                "frac_both": nan, "b_over_both": nan, "r90_b_only": None}
    b, b_se, b_method = _b_only(prob, r, n_samples, [*np.atleast_1d(seed).tolist(), r], method)
    both = _both(prob, r)
    r90 = smallest_rank(prob, target, r_max=r_max, n_samples=n_samples, samples_at=r, seed=seed, method=method)
    return {
        **row,
        "frac_a_only": expected_loss_a_only(prob, r).fraction,
        "frac_b_only": b,
        "se_b_only": b_se,
        "method_b_only": b_method,
        "frac_both": both,
        "b_over_both": b / both if both > 0 else float("nan"),
        "r90_b_only": r90,
    }


# ---- grouping and the verdict --------------------------------------------------------------
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def layer_group(name: str) -> str:
    """The layer's role with its block index replaced: ``encoder.layer.3.attention.self.query``
    → ``encoder.layer.*.attention.self.query``."""
    return _INDEX.sub("*", name)


def _verdict(rows: list[dict[str, Any]], r: int) -> str:
    """One line per layer group: where b-only / a-only is ahead by ≥ 10 % (relative), and r90."""
    n = len(rows)
    n_b = sum(x["frac_b_only"] >= 1.1 * x["frac_a_only"] for x in rows)
    n_a = sum(x["frac_a_only"] >= 1.1 * x["frac_b_only"] for x in rows)
    n_safe = sum(x["frac_b_only"] >= 0.9 * x["frac_both"] for x in rows)
    b = float(np.mean([x["frac_b_only"] for x in rows]))
    a = float(np.mean([x["frac_a_only"] for x in rows]))
    if n_safe == n:
        head = f"b-only at r={r} is safe: it keeps ≥90% of what training both factors captures on all {n} layers"
    elif 2 * n_b > n:
        head = f"asymmetry predicted: b-only ahead of a-only on {n_b}/{n} layers (mean fraction {b:.3f} vs {a:.3f})"
    elif 2 * n_a > n:
        head = (f"reverse asymmetry predicted: a-only ahead of b-only on {n_a}/{n} layers "
                f"(mean {a:.3f} vs b-only {b:.3f})")
    else:
        head = (f"no clear asymmetry at r={r}: b-only ahead on {n_b}, a-only on {n_a}, within 10% on "
                f"{n - n_b - n_a} of {n} layers (mean {b:.3f} vs {a:.3f})")
    r90 = [x["r90_b_only"] for x in rows]
    known = sorted(x for x in r90 if x is not None)
    if not known:
        return f"{head}; b-only does not reach 90% of both within min(d_in, d_out)."
    never = f", never on {n - len(known)} of {n} layers" if len(known) < n else ""
    return f"{head}; b-only reaches 90% of both at median r={known[len(known) // 2]}{never}."


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer group: mean fractions over its layers and a one-line recommendation."""
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        sub = [r for r in rows if r["group"] == group and r["signal"] > 0]
        if not sub:
            out.append({"group": group, "layers": 0, "recommendation": "no gradient signal reaches these layers"})
            continue
        mean = lambda k, sub=sub: float(np.mean([r[k] for r in sub]))  # noqa: E731
        out.append({
            "group": group, "layers": len(sub), "d_in": sub[0]["d_in"], "d_out": sub[0]["d_out"], "r": sub[0]["r"],
            "mean_effective_rank": mean("effective_rank"), "mean_frac_a_only": mean("frac_a_only"),
            "mean_frac_b_only": mean("frac_b_only"), "mean_frac_both": mean("frac_both"),
            "r90_b_only": [x["r90_b_only"] for x in sub], "recommendation": _verdict(sub, sub[0]["r"]),
        })
    return out
