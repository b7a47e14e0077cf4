"""Stop paying for learning rates that are clearly losing: the pruning rule of the lr search.

The search trains one pilot run per rate of the grid on the first seed, each with the same
fixed budget of ``T`` steps and a decaying schedule, and picks the rate whose run ends with the
best validation score (``asymlora.compare.protocol``). Most grids hold a rate that is plainly
wrong (LoRA at 1e-2 on the default task: 45-53 % validation accuracy, flat from the first
evaluation, while the other rates pass 80 %). Running such a rate to the end buys nothing.

**Rule.** Pilots pause at *rungs* (fractions of ``T``, by default 1/4 and 1/2). At a rung
step ``t`` every pilot of a strategy has a validation curve ``v(s)`` evaluated at the same
steps ``s ≤ t``. For each pilot take its *optimistic final score*

    u = max_{s ≤ t} v(s) + max(0, g) · (T − t)

where ``g`` is the steepest climb between two consecutive evaluations so far (the largest
secant slope), and the leader's current score ``l = max_p v_p(t)``. A pilot is dropped when

    u + z · σ  <  l

with ``σ`` the standard error of a difference of two validation scores (for an accuracy ``p``
on ``n`` examples, ``σ = sqrt(2 p (1 − p) / n)``) and ``z = 2`` by default. Higher-is-better
metrics are shown; for a loss the signs flip.

**Why it cannot drop the winner (up to noise).** For a curve that is non-decreasing and
concave in the step, every later gain is at most the steepest slope seen so far times the
steps left, so ``u`` bounds the pilot's final score from above; and the leader's final score
is at least its current ``l`` (a decaying rate only adds to a score at the end, it does not
take it away). When ``u < l`` the pilot cannot end above the leader, so a full search would
not have picked it; ``z · σ`` covers the evaluation noise of both sides. The bound is taken
from the best score and the steepest climb *so far*, not from the last point and its local
slope, because a curve at a high rate wanders: it can sit in a dip at the rung and still gain
several points when the rate decays at the end (b-only at 1e-2 on the default task did
exactly this, and a rule built on the last slope dropped it). A rate that starts slowly but
climbs has a large ``g`` and a large ``u``: it is kept (``tests/test_compare_pruning.py``
holds this on synthetic curves whose winner is the slowest starter). What is dropped is a
rate that never climbed (diverged, or stuck) or climbs far too slowly to matter. What the
rule can still get wrong is a curve that is flat for a quarter of the budget and then rises
(convex); ``--no-prune`` turns the rule off.

This is successive halving (Jamieson & Talwalkar 2016; ASHA, Li et al. 2020) with a bound in
place of a fixed fraction: a rate is dropped only when it is *shown* to be losing, never because
it ranks in the bottom half.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["PruneDecision", "prune_rates", "accuracy_difference_se", "optimistic_final"]

Curve = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class PruneDecision:
    """The outcome for one rate at one rung: its current and optimistic final score, the
    leader's current score and the allowance; ``pruned`` says whether it stops here."""

    lr: float
    step: int
    value: float
    optimistic: float
    leader: float
    allowance: float
    pruned: bool


def accuracy_difference_se(p: float, n: int) -> float:
    """Standard error of the difference of two accuracies near ``p``, each on ``n`` examples:
    sqrt(2·p·(1 − p)/n) (binomial; the two runs are scored on the same examples, so this
    over-states it a little — on the safe side for pruning)."""
    if n < 1:
        return float("inf")
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(2.0 * p * (1.0 - p) / n)


def _steepest_climb(points: Curve, sign: float) -> float:
    """The largest improvement per step between consecutive evaluations (``sign`` −1 for a
    loss); infinite with fewer than two points (nothing is known yet, so nothing is dropped)."""
    pts = list(points)
    if len(pts) < 2:
        return math.inf
    return max(sign * (v1 - v0) / (s1 - s0) for (s0, v0), (s1, v1) in zip(pts, pts[1:]))


def optimistic_final(curve: Curve, total_steps: int, higher_is_better: bool = True) -> float:
    """``max_{s≤t} v(s) + max(0, g)·(T − t)`` for a higher-is-better curve (its mirror for a
    loss), ``g`` the steepest climb between consecutive evaluations: the best score so far plus
    the fastest progress seen, kept up to the end of the budget — never pessimistic."""
    sign = 1.0 if higher_is_better else -1.0
    t = curve[-1][0]
    best = max(sign * v for _, v in curve)
    gain = max(0.0, _steepest_climb(curve, sign)) * (total_steps - t)
    return sign * (best + gain) if math.isfinite(gain) else sign * math.inf


def prune_rates(curves: Mapping[float, Curve], step: int, total_steps: int, allowance: float,
                higher_is_better: bool = True) -> list[PruneDecision]:
    """The decision for every rate whose curve reaches ``step`` (points after ``step`` are
    ignored, so finished pilots can stand in the same comparison as paused ones).

    ``allowance`` is ``z·σ`` in the metric's units. The leader is never pruned."""
    upto = {lr: [(s, v) for s, v in c if s <= step] for lr, c in curves.items()}
    here = {lr: c for lr, c in upto.items() if c and c[-1][0] == step}
    if len(here) < 2:
        return [PruneDecision(lr, step, c[-1][1], c[-1][1], c[-1][1], allowance, False) for lr, c in here.items()]
    sign = 1.0 if higher_is_better else -1.0
    leader = max((c[-1][1] for c in here.values()), key=lambda v: sign * v)
    out = []
    for lr, c in sorted(here.items()):
        u = optimistic_final(c, total_steps, higher_is_better)
        pruned = sign * (u - leader) + allowance < 0
        out.append(PruneDecision(lr, step, c[-1][1], u, leader, allowance, pruned))
    return out
