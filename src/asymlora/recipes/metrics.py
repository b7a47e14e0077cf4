"""Evaluation metrics of the paper's four experiment families.

All functions take plain Python sequences / numpy arrays and return floats in
[0, 1] (accuracy, F1, ROUGE) or [-1, 1] (correlations); the results table
multiplies by 100.

- accuracy             mean(y_hat == y)
- f1 (binary)          2·TP / (2·TP + FP + FN)                 (positive class = 1)
- matthews_corrcoef    (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)),
                       multi-class form via the confusion matrix C:
                       (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)),
                       c = trace C, s = ΣC, p_k / t_k = predicted / true counts
- pearson              cov(x, y) / (σ_x σ_y)
- spearman             pearson of the (average-tied) ranks
- rouge                ROUGE-1/2/L/Lsum F-measure (Lin 2004) via the maintained
                       ``rouge-score`` package, Porter stemming on
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "rankdata",
    "rouge",
    "split_sentences",
    "glue_metrics",
]


def _as_array(x: Iterable) -> np.ndarray:
    return np.asarray(list(x) if not isinstance(x, np.ndarray) else x)


def _check_same_length(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"predictions and references differ in length: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError("cannot compute a metric on zero examples")


def accuracy(preds: Sequence, refs: Sequence) -> float:
    """Fraction of exact matches."""
    p, r = _as_array(preds), _as_array(refs)
    _check_same_length(p, r)
    return float(np.mean(p == r))


def f1_binary(preds: Sequence[int], refs: Sequence[int], positive: int = 1) -> float:
    """Binary F1 of the ``positive`` class: 2TP / (2TP + FP + FN); 0 when undefined."""
    p, r = _as_array(preds), _as_array(refs)
    _check_same_length(p, r)
    tp = float(np.sum((p == positive) & (r == positive)))
    fp = float(np.sum((p == positive) & (r != positive)))
    fn = float(np.sum((p != positive) & (r == positive)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corrcoef(preds: Sequence[int], refs: Sequence[int]) -> float:
    """Matthews correlation (the CoLA metric), multi-class (Gorodkin 2004) form; 0 when undefined."""
    p, r = _as_array(preds), _as_array(refs)
    _check_same_length(p, r)
    labels = np.unique(np.concatenate([p, r]))
    index = {v: i for i, v in enumerate(labels.tolist())}
    k = len(labels)
    conf = np.zeros((k, k), dtype=np.float64)
    for yt, yp in zip(r.tolist(), p.tolist()):
        conf[index[yt], index[yp]] += 1
    t_k = conf.sum(axis=1)  # true counts
    p_k = conf.sum(axis=0)  # predicted counts
    c = np.trace(conf)
    s = conf.sum()
    num = c * s - float(np.dot(p_k, t_k))
    den = math.sqrt((s * s - float(np.dot(p_k, p_k))) * (s * s - float(np.dot(t_k, t_k))))
    return 0.0 if den == 0 else float(num / den)


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation cov(x,y)/(σx σy); 0 when either side is constant."""
    a, b = _as_array(x).astype(np.float64), _as_array(y).astype(np.float64)
    _check_same_length(a, b)
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return 0.0 if den == 0 else float(np.dot(a, b) / den)


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span."""
    a = _as_array(x).astype(np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    sorted_a = a[order]
    i = 0
    n = len(a)
    while i < n:
        j = i
        while j + 1 < n and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation = Pearson correlation of average-tied ranks."""
    return pearson(rankdata(x), rankdata(y))


_SENT_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line (for ROUGE-Lsum), by a simple end-of-sentence rule."""
    text = text.strip()
    if "\n" in text:
        return "\n".join(s.strip() for s in text.splitlines() if s.strip())
    return "\n".join(s for s in _SENT_END.split(text) if s)


def rouge(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE F-measures over the pairs: keys rouge1, rouge2, rougeL, rougeLsum.

    ROUGE-N F = 2·P·R/(P+R) with P = overlap / |pred n-grams|, R = overlap / |ref n-grams|
    (clipped counts); ROUGE-L uses the longest common subsequence; ROUGE-Lsum the
    union-LCS over sentences (newline-separated).
    """
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references differ in length: {len(predictions)} vs {len(references)}")
    if not predictions:
        raise ValueError("cannot compute ROUGE on zero examples")
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:  # pragma: no cover - dependency is in the tasks extra
        raise ImportError("ROUGE needs the `rouge-score` package: pip install rouge-score") from err
    keys = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=use_stemmer)
    totals = {k: 0.0 for k in keys}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(split_sentences(ref), split_sentences(pred))
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in totals.items()}


def glue_metrics(task: str, preds: Sequence, refs: Sequence) -> dict[str, float]:
    """The GLUE metric set per task (predictions already argmaxed; floats for STS-B).

    cola: mcc (+accuracy); stsb: pearson, spearman; mrpc/qqp: f1, accuracy; others: accuracy.
    """
    if task == "cola":
        return {"mcc": matthews_corrcoef(preds, refs), "accuracy": accuracy(preds, refs)}
    if task == "stsb":
        return {"pearson": pearson(preds, refs), "spearman": spearman(preds, refs)}
    if task in ("mrpc", "qqp"):
        return {"f1": f1_binary(preds, refs), "accuracy": accuracy(preds, refs)}
    return {"accuracy": accuracy(preds, refs)}
