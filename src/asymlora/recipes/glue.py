"""GLUE with RoBERTa (paper Table 2): sequence classification, STS-B as regression.

Data, either layout per task under ``--data``:

- the original GLUE TSV directories: ``<data>/SST-2/train.tsv``, ``dev.tsv``; MNLI has
  ``dev_matched.tsv`` / ``dev_mismatched.tsv``; CoLA's files have no header
  (source, label, original label, sentence);
- a ``datasets`` DatasetDict saved with ``save_to_disk`` at ``<data>/<task>`` (e.g.
  ``<data>/sst2``) — or at ``<data>`` itself — with the GLUE column names of the Hub's
  ``glue`` dataset and splits ``train`` / ``validation`` (MNLI: ``validation_matched``,
  ``validation_mismatched``).

Labels follow the Hub ``glue`` convention (MNLI: entailment 0, neutral 1,
contradiction 2; QNLI/RTE: entailment 0, not_entailment 1). Evaluation is on the dev
sets (GLUE test labels are hidden), as in the paper.

Metrics: accuracy; Matthews correlation (CoLA); Pearson and Spearman (STS-B);
F1 and accuracy (MRPC, QQP); MNLI matched and mismatched accuracy.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asymlora.errors import MissingFileError, UserError
from asymlora.recipes import metrics as M
from asymlora.recipes.base import (
    Prepared,
    Recipe,
    RunOptions,
    limit,
    model_device,
    torch_dtype,
)


@dataclass(frozen=True)
class GlueTask:
    name: str          # Hub config name
    dirname: str       # original GLUE directory
    text_keys: tuple[str, ...]   # Hub column names
    tsv_keys: tuple[str | int, ...]  # original TSV column names (or indices for CoLA)
    tsv_label: str | int
    num_labels: int
    label_map: dict[str, int] | None = None
    has_header: bool = True
    column: str = ""               # table column header
    headline: str = "accuracy"     # metric in the table


TASK_SPECS: dict[str, GlueTask] = {
    "mnli": GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label", 3,
                     {"entailment": 0, "neutral": 1, "contradiction": 2}, column="MNLI"),
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), ("sentence",), "label", 2, column="SST-2"),
    "mrpc": GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", 2,
                     column="MRPC"),
    "cola": GlueTask("cola", "CoLA", ("sentence",), (3,), 1, 2, has_header=False, column="CoLA", headline="mcc"),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", 2,
                     {"entailment": 0, "not_entailment": 1}, column="QNLI"),
    "qqp": GlueTask("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", 2,
                    column="QQP"),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", 2,
                    {"entailment": 0, "not_entailment": 1}, column="RTE"),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", 1,
                     column="STS-B", headline="pearson"),
}
TASKS: tuple[str, ...] = tuple(TASK_SPECS)
DATA_ARGS = ("max_length", "pad_to_multiple_of")
EVAL_ARGS = ("eval_batch_size",)

# eval splits: (name in results, TSV file, Hub split)
_EVAL_SPLITS: dict[str, list[tuple[str, str, str]]] = {
    "mnli": [("m", "dev_matched.tsv", "validation_matched"), ("mm", "dev_mismatched.tsv", "validation_mismatched")],
}
_DEFAULT_EVAL = [("", "dev.tsv", "validation")]


def eval_splits(task: str) -> list[tuple[str, str, str]]:
    return _EVAL_SPLITS.get(task, _DEFAULT_EVAL)


def _saved_dir(task: str, data: Path) -> Path | None:
    for cand in (data / task, data / TASK_SPECS[task].dirname, data):
        if (cand / "dataset_dict.json").is_file():
            return cand
    return None


def _tsv_dir(task: str, data: Path) -> Path | None:
    spec = TASK_SPECS[task]
    for cand in (data / spec.dirname, data / task, data):
        if (cand / "train.tsv").is_file():
            return cand
    return None


DOWNLOAD_HINT = ("Download GLUE (e.g. the original data via the GLUE benchmark's download_glue_data.py, "
                 "or `datasets.load_dataset('glue', task).save_to_disk(...)` on a machine with internet) and "
                 "pass --data DIR with DIR/<TASK>/train.tsv + dev.tsv (MNLI: dev_matched.tsv, dev_mismatched.tsv) "
                 "or DIR/<task>/ saved with save_to_disk.")


def check_data(task: str, data: str | Path, recipe: Recipe) -> None:
    """Fail before any work when the task's files are missing."""
    data = Path(data)
    if _saved_dir(task, data) is not None:
        return
    d = _tsv_dir(task, data)
    spec = TASK_SPECS[task]
    if d is None:
        raise MissingFileError(
            f"GLUE {task}: found neither {data / spec.dirname / 'train.tsv'} nor a saved dataset at "
            f"{data / task}. {recipe.data_hint or DOWNLOAD_HINT}")
    for _, fname, _ in eval_splits(task):
        if not (d / fname).is_file():
            raise MissingFileError(f"GLUE {task}: missing {d / fname}. {recipe.data_hint or DOWNLOAD_HINT}")


def _label(spec: GlueTask, raw: Any) -> float | int:
    if spec.num_labels == 1:
        return float(raw)
    if spec.label_map is not None and isinstance(raw, str) and raw in spec.label_map:
        return spec.label_map[raw]
    return int(raw)


def read_tsv(path: str | Path, spec: GlueTask) -> list[dict[str, Any]]:
    """Read one GLUE TSV into examples {"text": (a[, b]), "label": y}. Unlabeled rows are skipped."""
    csv.field_size_limit(sys.maxsize)
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader) if spec.has_header else None
        if header is not None:
            missing = [k for k in (*spec.tsv_keys, spec.tsv_label) if k not in header]
            if missing:
                raise UserError(f"{path}: columns {missing} not found in header {header}")
            # names here: every key was found in the header above
            idx = [header.index(str(k)) for k in spec.tsv_keys]
            lidx = header.index(str(spec.tsv_label))
        else:
            idx = [int(k) for k in spec.tsv_keys]  # column indices (CoLA's TSV has no header)
            lidx = int(spec.tsv_label)
        skipped = 0
        for row in reader:
            if not row:
                continue
            if len(row) <= max(idx + [lidx]) or row[lidx] in ("", "-"):
                skipped += 1  # a few malformed QQP lines; unlabeled MNLI rows
                continue
            rows.append({"text": tuple(row[i] for i in idx), "label": _label(spec, row[lidx])})
    if skipped:
        print(f"[glue] {path}: skipped {skipped} malformed/unlabeled row(s)", file=sys.stderr)
    return rows


def _from_saved(split, spec: GlueTask) -> list[dict[str, Any]]:
    cols = split.column_names
    missing = [k for k in (*spec.text_keys, "label") if k not in cols]
    if missing:
        raise UserError(f"saved GLUE {spec.name} split lacks columns {missing}; has {cols}")
    out = []
    for ex in split:
        if spec.num_labels > 1 and int(ex["label"]) < 0:
            continue  # unlabeled (test) rows
        out.append({"text": tuple(ex[k] for k in spec.text_keys), "label": _label(spec, ex["label"])})
    return out


def load_split(task: str, data: str | Path, which: str) -> list[dict[str, Any]]:
    """which: 'train' or an eval split suffix ('' / 'm' / 'mm')."""
    spec = TASK_SPECS[task]
    data = Path(data)
    saved = _saved_dir(task, data)
    if which == "train":
        fname, hub = "train.tsv", "train"
    else:
        _, fname, hub = next(s for s in eval_splits(task) if s[0] == which)
    if saved is not None:
        from datasets import load_from_disk

        dd = load_from_disk(str(saved))
        if hub not in dd:
            raise UserError(f"saved dataset {saved} has no split {hub!r}; has {list(dd)}")
        return _from_saved(dd[hub], spec)
    d = _tsv_dir(task, data)
    assert d is not None
    return read_tsv(d / fname, spec)


class _Collator:
    def __init__(self, tokenizer, max_length: int, regression: bool, pad_to_multiple_of: int | None = None):
        self.tok = tokenizer
        self.max_length = max_length
        self.regression = regression
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: list[dict[str, Any]]) -> dict:
        import torch

        texts = [ex["text"] for ex in batch]
        a = [t[0] for t in texts]
        b = [t[1] for t in texts] if len(texts[0]) > 1 else None
        enc = self.tok(a, b, truncation=True, max_length=self.max_length, padding=True,
                       pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        dtype = torch.float32 if self.regression else torch.long
        enc = dict(enc)
        enc["labels"] = torch.tensor([ex["label"] for ex in batch], dtype=dtype)
        return enc


def predict(model, dataset: list[dict[str, Any]], collate, batch_size: int, regression: bool) -> list:
    device = model_device(model)
    preds: list = []
    for i in range(0, len(dataset), batch_size):
        batch = collate(dataset[i : i + batch_size])
        batch.pop("labels")
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits.float()
        if regression:
            preds.extend(logits[:, 0].cpu().tolist())
        else:
            preds.extend(logits.argmax(-1).cpu().tolist())
    return preds


def prepare(task: str, model_path: str, data: str | Path, recipe: Recipe, opts: RunOptions) -> Prepared:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = TASK_SPECS[task]
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    train = limit(load_split(task, data, "train"), opts.max_train_samples)
    evals = {s: limit(load_split(task, data, s), opts.max_eval_samples) for s, _, _ in eval_splits(task)}
    if not train:
        raise UserError(f"GLUE {task}: the training split is empty")
    regression = spec.num_labels == 1
    collate = _Collator(tok, int(recipe.data_args.get("max_length", 128)), regression,
                        recipe.data_args.get("pad_to_multiple_of"))
    dtype = torch_dtype(opts.dtype or recipe.dtype)
    ebs = int(recipe.eval_args.get("eval_batch_size", 64))

    def build_model() -> Any:  # a transformers sequence classifier
        kw: dict[str, Any] = {"num_labels": spec.num_labels, "dtype": dtype, "ignore_mismatched_sizes": True}
        if regression:
            kw["problem_type"] = "regression"
        model = AutoModelForSequenceClassification.from_pretrained(model_path, **kw)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        return model

    def evaluate(model) -> dict[str, float]:
        out: dict[str, float] = {}
        for suffix, ds in evals.items():
            preds = predict(model, ds, collate, ebs, regression)
            refs = [ex["label"] for ex in ds]
            for k, v in M.glue_metrics(task, preds, refs).items():
                out[f"{k}_{suffix}" if suffix else k] = v
        return out

    return Prepared(train, collate, build_model, evaluate,
                    info={"n_train": len(train), "n_eval": {k or "dev": len(v) for k, v in evals.items()}})


def columns(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """The task's cells in the paper's GLUE table (MNLI: matched; also reports mismatched)."""
    spec = TASK_SPECS[task]
    if task == "mnli":
        return {"MNLI": metrics["accuracy_m"], "MNLI-mm": metrics["accuracy_mm"]}
    return {spec.column: metrics[spec.headline]}


def avg_columns(task: str) -> list[str]:
    """Columns that enter the GLUE average (one number per task)."""
    return [TASK_SPECS[task].column]
