"""``evaluate``: score a causal LM on the benchmarks of ``asymlora.lmeval.benchmarks`` the way
lm-evaluation-harness 0.4.13 does (multiple choice by summed log-likelihood; ``acc`` and
``acc_norm`` with lm-eval's standard errors), with our cheaper scorer
(``asymlora.lmeval.scoring``). ``asymlora.lmeval.harness`` runs lm-eval itself on the same items.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from asymlora.errors import UserError
from asymlora.lmeval import mmlu
from asymlora.lmeval.benchmarks import TASKS, Item, build_items, check_tasks
from asymlora.lmeval.metrics import mean_stderr, pooled_stderr, predictions
from asymlora.lmeval.scoring import loglikelihoods

MAX_SHOTS = 5  # every MMLU subject's dev split has 5 rows


@dataclass
class ItemResult:
    doc_id: int
    gold: int
    pred: int  # argmax of the raw log-likelihoods
    pred_norm: int  # argmax of the per-character normalised ones
    logliks: list[float]
    subject: str = ""


@dataclass
class TaskScore:
    """One task's scores: accuracies in [0, 1] with their standard errors (lm-eval's formulas,
    ``asymlora.lmeval.metrics``), the number of items, and what the run cost."""

    task: str
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    n: int
    shots: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time (all threads)
    items: list[ItemResult] = field(default_factory=list, repr=False)
    subjects: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)  # MMLU: per subject

    def to_dict(self, with_items: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not with_items:
            out.pop("items")
        return out


def check_options(tasks: Sequence[str], limit: int | None, shots: int, batch_size: int) -> list[str]:
    """Every bad argument at once, as one UserError."""
    problems = []
    try:
        names = check_tasks(tasks)
    except UserError as err:
        problems.append(str(err))
        names = []
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        problems.append(f"limit must be an integer >= 1 (or None for every item), got {limit!r}")
    if isinstance(shots, bool) or not isinstance(shots, int) or not 0 <= shots <= MAX_SHOTS:
        problems.append(f"shots must be an integer in 0..{MAX_SHOTS} (MMLU dev examples), got {shots!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if problems:
        raise UserError("; ".join(problems))
    return names


def score_items(model: Any, tokenizer: Any, items: Sequence[Item], *, batch_size: int = 32, bf16: bool = False,
                progress: Callable[[int, int], None] | None = None) -> list[ItemResult]:
    """Score every choice of every item (one request per choice) and take both argmaxes."""
    requests = [(item.context, " " + choice) for item in items for choice in item.choices]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, bf16=bf16, progress=progress)
    out, k = [], 0
    for item in items:
        mine = lls[k:k + len(item.choices)]
        k += len(item.choices)
        pred, pred_norm = predictions(mine, item.choices)
        out.append(ItemResult(item.doc_id, item.gold, pred, pred_norm, mine, item.subject))
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def summarize(task: str, results: Sequence[ItemResult], shots: int = 0) -> TaskScore:
    """Accuracies and standard errors; MMLU's error pooled over its subjects."""
    acc = [float(r.pred == r.gold) for r in results]
    norm = [float(r.pred_norm == r.gold) for r in results]
    score = TaskScore(task, _mean(acc), mean_stderr(acc), _mean(norm), mean_stderr(norm), len(results), shots,
                      items=list(results))
    if task == "mmlu":
        score.subjects = _per_subject(results)
        score.acc_stderr = _mmlu_stderr(score.subjects, "acc")
        score.acc_norm_stderr = _mmlu_stderr(score.subjects, "acc_norm")
    return score


def _per_subject(results: Sequence[ItemResult]) -> dict[str, dict[str, float]]:
    out = {}
    for subject in mmlu.SUBJECTS:
        mine = [r for r in results if r.subject == subject]
        if mine:
            acc = [float(r.pred == r.gold) for r in mine]
            norm = [float(r.pred_norm == r.gold) for r in mine]
            out[subject] = {"acc": _mean(acc), "acc_stderr": mean_stderr(acc), "acc_norm": _mean(norm),
                            "acc_norm_stderr": mean_stderr(norm), "n": len(mine)}
    return out


def _mmlu_stderr(subjects: dict[str, dict[str, float]], metric: str) -> float:
    """lm-eval's group error: the subjects' errors pooled, weighted by size (lm-eval pools over
    the leaf tasks of a group, here the subjects, not over its category subgroups). A subject
    with one item (``limit=1``) adds nothing to the pooled variance; lm-eval reports "N/A" then."""
    present = list(subjects.values())
    return pooled_stderr([p[f"{metric}_stderr"] for p in present], [int(p["n"]) for p in present])


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None, shots: int = 0,
             batch_size: int = 32, seed: int | None = None, bf16: bool = False,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, TaskScore]:
    """Score ``model`` on each of ``tasks`` (names in ``TASKS``); returns {task: TaskScore}.

    ``limit``: the first ``limit`` items of each task (of each MMLU subject), as lm-eval's
    ``--limit``; with ``seed`` an int, a seeded random sample of that size instead. ``shots``:
    solved examples before each MMLU question (the subject's first dev rows, 0..5); the other
    tasks are zero-shot. ``bf16``: bfloat16 autocast for the forward passes. ``progress(task,
    done, total)`` is called after each batch. The model is put in eval mode for the run (and
    back to its previous mode after); nothing else about it changes."""
    names = check_options(tasks, limit, shots, batch_size)
    out = {}
    for task in names:
        items = build_items(task, limit=limit, shots=shots if task == "mmlu" else 0, seed=seed)
        wall, cpu = time.perf_counter(), time.process_time()
        report = None if progress is None else (lambda done, total, t=task: progress(t, done, total))
        results = score_items(model, tokenizer, items, batch_size=batch_size, bf16=bf16, progress=report)
        score = summarize(task, results, shots if task == "mmlu" else 0)
        score.wall_s, score.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        out[task] = score
    return out


__all__ = ["TASKS", "TaskScore", "ItemResult", "evaluate", "score_items", "summarize"]
