"""Statistics of ``asymlora compare``: mean ± std over seeds, paired differences with a
Student-t interval, the verdict they allow, and the convergence slope of a validation curve.

No SciPy: the t quantile comes from integrating the t density (Simpson's rule) and bisection,
accurate to ~1e-9 — checked against ``scipy.stats.t.ppf`` in the tests.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["mean_std", "t_quantile", "PairedDifference", "paired_difference", "verdict", "curve_slope",
           "VERDICTS", "summarize_runs", "paired_verdicts",
           "cheaper_not_worse"]


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1, Bessel's correction) of ``values``.

    The std estimates the spread between seeds, and one value carries no information about that
    spread: the sample std of n = 1 is 0/0, so it is NaN (as ``statistics.stdev`` refuses it and
    lm-eval's ``mean_stderr`` gives NaN), never 0, which would claim seeds agree exactly. Both
    are NaN for no values."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else float("nan")


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (x >= 0), Simpson's rule on
    the density f(t) = Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + t²/ν)^(−(ν+1)/2)."""
    nu = float(df)
    logc = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    m = 2000  # even number of Simpson intervals
    h = x / m
    total = 0.0
    for i in range(m + 1):
        t = i * h
        w = 1 if i in (0, m) else (4 if i % 2 else 2)
        total += w * math.exp(logc - (nu + 1) / 2 * math.log1p(t * t / nu))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` >= 1 degrees of freedom."""
    if not 0.5 < p < 1:
        raise ValueError(f"p={p!r}: need 0.5 < p < 1")
    if df < 1:
        raise ValueError(f"df={df!r}: need at least 1 degree of freedom")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


VERDICTS = ("better", "worse", "equivalent", "no worse", "no better", "inconclusive", "one seed")


def verdict(lo: float, hi: float, margin: float) -> str:
    """What a confidence interval [lo, hi] for (method − reference) allows one to say, with an
    equivalence margin ``margin`` (same units): "better" (lo > 0), "worse" (hi < 0),
    "equivalent" (inside ±margin), "no worse" (lo ≥ −margin), "no better" (hi ≤ margin),
    otherwise "inconclusive"."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "one seed"
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    if lo >= -margin and hi <= margin:
        return "equivalent"
    if lo >= -margin:
        return "no worse"
    if hi <= margin:
        return "no better"
    return "inconclusive"


@dataclass
class PairedDifference:
    """Per-seed differences ``method − reference`` and their mean with a two-sided t-interval."""

    method: str
    reference: str
    metric: str
    seeds: list[int]
    differences: list[float]
    mean: float
    std: float
    lo: float
    hi: float
    confidence: float
    margin: float
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, scale: float = 100.0, unit: str = "pts", digits: int = 1) -> str:
        """``b-only r=8 vs lora r=8: +2.1 pts [−0.4, +4.6] over 3 seeds → no worse``."""
        n = len(self.seeds)
        f = f"+.{digits}f"
        ci = (f" [{scale * self.lo:{f}}, {scale * self.hi:{f}}]" if math.isfinite(self.lo) else "")
        return (f"{self.method} vs {self.reference}: {scale * self.mean:{f}} {unit}{ci} over {n} "
                f"seed{'s' if n != 1 else ''} → {self.verdict}")


def paired_difference(method: str, reference: str, metric: str, by_seed_method: dict[int, float],
                      by_seed_reference: dict[int, float], confidence: float = 0.95,
                      margin: float = 0.01) -> PairedDifference:
    """d_s = method(s) − reference(s) over the seeds both have; mean d̄, sample std s_d and the
    interval d̄ ± t_{(1+c)/2, n−1} · s_d / √n. ``margin`` is in the metric's units (0.01 = 1 point
    of accuracy)."""
    seeds = sorted(set(by_seed_method) & set(by_seed_reference))
    if not seeds:
        raise ValueError(f"{method} and {reference} share no seed: nothing to pair")
    d = np.array([by_seed_method[s] - by_seed_reference[s] for s in seeds], dtype=float)
    mean, std = mean_std(d)
    if d.size > 1:
        half = t_quantile((1 + confidence) / 2, d.size - 1) * std / math.sqrt(d.size)
        lo, hi = mean - half, mean + half
    else:
        lo = hi = float("nan")
    return PairedDifference(method, reference, metric, seeds, d.tolist(), mean, std, lo, hi, confidence,
                            margin, verdict(lo, hi, margin))


def curve_slope(steps: Sequence[float], values: Sequence[float], fraction: float = 0.25) -> float:
    """Least-squares slope of ``values`` against ``steps`` over the last ``fraction`` of the run
    (by step), per 100 steps; NaN with fewer than two points there. A converged curve has a
    slope near 0 (within its noise); a rising one, a clearly positive slope."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.size < 2:
        return float("nan")
    start = s[-1] - fraction * (s[-1] - s[0])
    keep = s >= start
    if keep.sum() < 2:
        keep = np.zeros_like(keep)
        keep[-2:] = True
    ss, vv = s[keep], v[keep]
    return float(100 * np.polyfit(ss, vv, 1)[0])


def summarize_runs(runs: list[dict[str, Any]], order: list[str], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per strategy label: mean and sample std over seeds of the run metrics ``keys``; runs that
    diverged (``asymlora.sweep.divergence``) are left out and counted (``diverged``)."""
    rows = []
    for label in order:
        mine = [r for r in runs if r["strategy"] == label]
        rs = [r for r in mine if not r.get("diverged")]
        if not rs:
            continue
        row: dict[str, Any] = {"strategy": label, "preset": rs[0]["preset"], "rank": rs[0]["rank"],
                               "seeds": [r["seed"] for r in rs], "n": len(rs),
                               "trainable_params": rs[0]["trainable_params"],
                               "adapter_params": rs[0]["adapter_params"], "stopping": rs[0].get("stopping", "plateau"),
                               "plateaued": sum(bool(r.get("stopped_early")) for r in rs)}
        for key in keys:
            vals = [r[key] for r in rs if r.get(key) is not None and not _isnan(r[key])]
            row[key + "_mean"], row[key + "_std"] = mean_std(vals)
        if len(mine) > len(rs):
            row["diverged"] = len(mine) - len(rs)
        rows.append(row)
    return rows


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def paired_verdicts(runs: list[dict[str, Any]], specs: list[Any], margin: float,
                    metric: str = "test_accuracy") -> list[PairedDifference]:
    """Every adapter strategy against the reference strategy (``is_reference``: LoRA) at its
    base rank, paired by seed."""
    by = {(r["strategy"], r["seed"]): r[metric] for r in runs if r.get(metric) is not None}  # diverged: none
    refs = {s.rank: s.label for s in specs if s.is_adapter and s.is_reference}
    out = []
    for s in specs:
        ref = refs.get(s.base_rank)
        if s.preset is None or ref is None or s.label == ref:
            continue
        mine = {seed: v for (lab, seed), v in by.items() if lab == s.label}
        theirs = {seed: v for (lab, seed), v in by.items() if lab == ref}
        if set(mine) & set(theirs):
            out.append(paired_difference(s.label, ref, metric, mine, theirs, margin=margin))
    return out


NOT_WORSE = ("better", "equivalent", "no worse")


def cheaper_not_worse(verdicts: list[PairedDifference], summary: list[dict[str, Any]],
                      cost: str = "adapter_params") -> str | None:
    """The user's answer in one line: the row that trains fewer adapter parameters (``cost``)
    than its reference while its interval allows "better", "equivalent" or "no worse" — the
    cheapest such row, or None when no row is both."""
    rows = {r["strategy"]: r for r in summary}
    fits = [(rows[v.method][cost], v) for v in verdicts
            if v.verdict in NOT_WORSE and v.method in rows and v.reference in rows
            and rows[v.method].get(cost) is not None and rows[v.method][cost] < rows[v.reference][cost]]
    if not fits:
        return None
    c, v = min(fits, key=lambda x: x[0])
    ref = rows[v.reference][cost]
    return (f"cheaper and not worse: {v.method} trains {c:,} adapter parameters, "
            f"{ref / max(c, 1):.1f}× fewer than {v.reference} ({ref:,}), and its paired difference is "
            f"{v.verdict} ({100 * v.mean:+.1f} pts [{100 * v.lo:+.1f}, {100 * v.hi:+.1f}])")
