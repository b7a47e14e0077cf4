"""Accuracy and its standard error as lm-evaluation-harness 0.4.13 reports them.

Per item, with ℓ_i = log p(" " + choice_i | context):

    acc      = 1[argmax_i ℓ_i = gold]
    acc_norm = 1[argmax_i ℓ_i / len(choice_i) = gold]

where len is the choice's length in *characters* (Python ``len`` of the choice string, without
the leading delimiter; lm-eval's ``acc_bytes`` would use UTF-8 bytes). Ties go to the first
choice (``numpy.argmax``).

Standard error of a mean of n outcomes x_1..x_n (lm-eval's ``mean_stderr``)::

    se = s / sqrt(n),   s² = Σ (x_k - x̄)² / (n - 1)

A group of tasks weighted by size (MMLU over its 57 subjects: lm-eval pools a group's leaf
tasks, also through nested category groups) pools its members' errors (lm-eval's
``pooled_sample_stderr``)::

    se_group² = Σ_j (n_j - 1) · n_j · se_j² / (Σ_j n_j - m) / Σ_j n_j     (m members)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def predictions(logliks: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of the raw log-likelihoods, argmax of the per-character normalised ones)."""
    ll = np.asarray(logliks, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    return int(np.argmax(ll)), int(np.argmax(ll / lengths))


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1) over sqrt(n); NaN for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def pooled_stderr(stderrs: Sequence[float], sizes: Sequence[int]) -> float:
    """The standard error of a size-weighted group mean from its members' errors (docstring)."""
    total = sum(sizes)
    if total - len(sizes) <= 0:
        return math.nan
    var = sum((n - 1) * se ** 2 * n for se, n in zip(stderrs, sizes) if n > 1) / (total - len(sizes))
    return math.sqrt(var / total)
