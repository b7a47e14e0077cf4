"""Metric code against hand-computed values, closed forms and scipy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from asymlora.recipes import metrics as M
from conftest import require


def test_accuracy_and_f1_by_hand():
    preds = [1, 1, 0, 1, 0, 0, 1, 0]
    refs = [1, 0, 0, 1, 1, 0, 1, 1]
    # TP = 3 (idx 0,3,6), FP = 1 (idx 1), FN = 2 (idx 4,7), TN = 2
    assert M.accuracy(preds, refs) == pytest.approx(5 / 8)
    assert M.f1_binary(preds, refs) == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert M.f1_binary([0, 0], [0, 0]) == 0.0


def test_mcc_binary_closed_form():
    preds = [1, 1, 0, 1, 0, 0, 1, 0]
    refs = [1, 0, 0, 1, 1, 0, 1, 1]
    tp, tn, fp, fn = 3, 2, 1, 2
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert M.matthews_corrcoef(preds, refs) == pytest.approx(expected)
    assert M.matthews_corrcoef(refs, refs) == pytest.approx(1.0)
    assert M.matthews_corrcoef([1 - r for r in refs], refs) == pytest.approx(-1.0)
    assert M.matthews_corrcoef([1] * 8, refs) == 0.0  # constant prediction: undefined -> 0


def test_mcc_equals_phi_coefficient():
    # For binary labels MCC is the Pearson correlation of the 0/1 vectors.
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert M.matthews_corrcoef(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])


def test_pearson_spearman_vs_scipy():
    stats = require("scipy.stats")
    x = [0.1, 2.0, 2.0, 3.5, 4.0, 1.0, 5.5]
    y = [0.0, 1.0, 2.5, 2.5, 5.0, 0.5, 4.0]
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])  # with ties on both sides
    assert M.spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)


def test_rankdata_ties():
    np.testing.assert_allclose(M.rankdata([10, 20, 20, 5]), [2.0, 3.5, 3.5, 1.0])


def test_glue_metrics_by_hand():
    preds = [1, 1, 0, 1, 0, 0, 1, 0]
    refs = [1, 0, 0, 1, 1, 0, 1, 1]  # TP 3, TN 2, FP 1, FN 2
    acc = 5 / 8
    assert M.glue_metrics("cola", preds, refs) == pytest.approx(
        {"mcc": (3 * 2 - 1 * 2) / math.sqrt(4 * 5 * 3 * 4), "accuracy": acc})
    for task in ("mrpc", "qqp"):
        assert M.glue_metrics(task, preds, refs) == pytest.approx({"f1": 2 * 3 / (2 * 3 + 1 + 2), "accuracy": acc})
    for task in ("rte", "sst2", "qnli", "mnli"):
        assert M.glue_metrics(task, preds, refs) == pytest.approx({"accuracy": acc})
    # STS-B: x - mean(x) = (-0.4, 0.4, 0), y - mean(y) = (-1.4, 1.6, -0.2)/3; both rank as (1, 3, 2)
    stsb = M.glue_metrics("stsb", [0.1, 0.9, 0.5], [0.0, 1.0, 0.4])
    assert stsb == pytest.approx({"pearson": 0.4 / math.sqrt(0.32 * 4.56 / 9), "spearman": 1.0})
    # one swapped pair of ranks: rho = 1 - 6·Σd²/(n(n²-1)) = 1 - 6·2/24 = 0.5
    assert M.glue_metrics("stsb", [0.1, 0.5, 0.9], [0.0, 1.0, 0.4])["spearman"] == pytest.approx(0.5)


def test_rouge_known_pair_by_hand():
    require("rouge_score")
    ref = "the cat sat on the mat"
    pred = "the cat lay on the mat"
    # unigrams: ref {the:2, cat, sat, on, mat}, pred {the:2, cat, lay, on, mat}: overlap 5 of 6 each side
    # bigrams: ref {the cat, cat sat, sat on, on the, the mat}, pred {the cat, cat lay, lay on, on the, the mat}:
    #   overlap 3 of 5; LCS = "the cat on the mat" = 5 of 6
    s = M.rouge([pred], [ref])
    assert s["rouge1"] == pytest.approx(5 / 6)
    assert s["rouge2"] == pytest.approx(3 / 5)
    assert s["rougeL"] == pytest.approx(5 / 6)
    assert s["rougeLsum"] == pytest.approx(5 / 6)
    # precision != recall case: pred "the cat" -> R1 P = 1, R = 2/6, F = 2PR/(P+R) = 0.5
    assert M.rouge(["the cat"], [ref])["rouge1"] == pytest.approx(0.5)
    # averaging over pairs
    assert M.rouge([pred, ref], [ref, ref])["rouge2"] == pytest.approx((3 / 5 + 1) / 2)


def test_errors():
    with pytest.raises(ValueError, match="differ in length"):
        M.accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="zero examples"):
        M.pearson([], [])
