"""The paper's linear theory (Zhu et al. 2024, section 4) and its generalisation bound.

``asymlora.theory.linear``: closed forms for the optimal trained factor when the other is
frozen (Lemmas 4.1, 4.2), the optimal pair, expectations over Haar-random frozen factors
(Theorem 4.3) and a synthetic simulation. ``asymlora.theory.bounds``: the Xu–Raginsky
information-theoretic bound with parameter counts taken from real module shapes.
"""
from __future__ import annotations

from asymlora.theory.bounds import (
    PRESETS,
    LayerShape,
    bound_table,
    count_trainable,
    info_bound,
    layer_shapes_from_model,
    layer_shapes_from_pairs,
    load_shapes,
    parse_shapes,
)
from asymlora.theory.linear import (
    SPECTRA,
    ExpectedLoss,
    FactorSolution,
    JointSolution,
    LinearProblem,
    effective_rank,
    expected_loss_a_only,
    expected_loss_b_only,
    haar_orthonormal,
    make_covariance,
    optimal_a_given_b,
    optimal_b_given_a,
    optimal_both,
    simulate,
)

__all__ = [
    "PRESETS",
    "SPECTRA",
    "ExpectedLoss",
    "FactorSolution",
    "JointSolution",
    "LayerShape",
    "LinearProblem",
    "bound_table",
    "count_trainable",
    "effective_rank",
    "expected_loss_a_only",
    "expected_loss_b_only",
    "haar_orthonormal",
    "info_bound",
    "layer_shapes_from_model",
    "layer_shapes_from_pairs",
    "load_shapes",
    "make_covariance",
    "optimal_a_given_b",
    "optimal_b_given_a",
    "optimal_both",
    "parse_shapes",
    "simulate",
]
