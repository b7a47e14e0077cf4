"""Abstractive summarisation with BART (paper Table 3): XSum and CNN/DailyMail.

Data under ``--data`` (per task, at ``<data>/<task>`` or at ``<data>`` itself):

- ``train.jsonl`` / ``validation.jsonl`` (or ``val``/``dev``) / ``test.jsonl``, or the same
  names as ``.csv``; columns ``document``/``summary`` (XSum) or ``article``/``highlights``
  (CNN/DailyMail) — either pair is accepted for either task;
- or a ``datasets`` DatasetDict saved with ``save_to_disk`` with those columns.

Training: teacher-forced seq2seq cross-entropy; label padding is replaced by -100 so it
is ignored by the loss. Evaluation: beam search, then ROUGE-1/2/L/Lsum F-measures
(``rouge-score``, stemming) on the test split (validation when no test split exists).
"""
from __future__ import annotations

import csv
import json
import sys
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

TASKS: tuple[str, ...] = ("xsum", "cnn_dailymail")
DATA_ARGS = ("max_source_length", "max_target_length", "source_prefix")
EVAL_ARGS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "no_repeat_ngram_size",
             "eval_batch_size", "eval_split")
COLUMN_PAIRS = (("document", "summary"), ("article", "highlights"))
_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val", "dev"), "test": ("test",)}
LABELS = {"xsum": "XSum", "cnn_dailymail": "CNN/DM"}

DOWNLOAD_HINT = ("Download the dataset (e.g. `datasets.load_dataset('EdinburghNLP/xsum')` or "
                 "`load_dataset('abisee/cnn_dailymail', '3.0.0')` then `.save_to_disk(DIR/<task>)` on a machine "
                 "with internet, or export train/validation/test .jsonl files with document/summary or "
                 "article/highlights fields) and pass --data DIR.")


def _task_dir(task: str, data: Path) -> Path:
    for cand in (data / task, data):
        if (cand / "dataset_dict.json").is_file() or _find_file(cand, "train") is not None:
            return cand
    return data / task


def _find_file(d: Path, split: str) -> Path | None:
    for name in _SPLIT_NAMES[split]:
        for ext in (".jsonl", ".json", ".csv"):
            p = d / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def check_data(task: str, data: str | Path, recipe: Recipe) -> None:
    d = _task_dir(task, Path(data))
    if (d / "dataset_dict.json").is_file():
        return
    if _find_file(d, "train") is None:
        raise MissingFileError(f"{task}: no train.jsonl/.csv (or saved dataset) under {d}. "
                                f"{recipe.data_hint or DOWNLOAD_HINT}")
    if _find_file(d, "test") is None and _find_file(d, "validation") is None:
        raise MissingFileError(f"{task}: no test or validation split under {d}. {recipe.data_hint or DOWNLOAD_HINT}")


def _pair(record_keys, where: str) -> tuple[str, str]:
    for src, tgt in COLUMN_PAIRS:
        if src in record_keys and tgt in record_keys:
            return src, tgt
    raise UserError(f"{where}: need columns document/summary or article/highlights, found {sorted(record_keys)}")


def read_records(path: Path) -> list[dict[str, str]]:
    """Read a JSONL (one object per line), JSON (a list) or CSV file into {"source", "target"} records."""
    if path.suffix == ".csv":
        csv.field_size_limit(sys.maxsize)
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif path.suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            rows = json.load(fh)
    else:
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    if not rows:
        return []
    src, tgt = _pair(rows[0].keys(), str(path))
    return [{"source": r[src], "target": r[tgt]} for r in rows]


def load_split(task: str, data: str | Path, split: str) -> list[dict[str, str]]:
    d = _task_dir(task, Path(data))
    if (d / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        dd = load_from_disk(str(d))
        name = next((n for n in _SPLIT_NAMES[split] if n in dd), None)
        if name is None:
            return []
        ds = dd[name]
        src, tgt = _pair(ds.column_names, f"{d}[{name}]")
        return [{"source": ex[src], "target": ex[tgt]} for ex in ds]
    p = _find_file(d, split)
    return read_records(p) if p is not None else []


class Seq2SeqCollator:
    """Tokenise source and target; labels = target ids with padding → -100 (ignored by the loss)."""

    def __init__(self, tokenizer, max_source_length: int, max_target_length: int, prefix: str = ""):
        self.tok = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.prefix = prefix

    def __call__(self, batch: list[dict[str, str]]) -> dict:
        enc = self.tok([self.prefix + ex["source"] for ex in batch], truncation=True,
                       max_length=self.max_source_length, padding=True, return_tensors="pt")
        tgt = self.tok(text_target=[ex["target"] for ex in batch], truncation=True,
                       max_length=self.max_target_length, padding=True, return_tensors="pt")
        labels = tgt["input_ids"].clone()
        labels[tgt["attention_mask"] == 0] = -100
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def generate_summaries(model, tokenizer, sources: list[str], collate: Seq2SeqCollator, gen_kwargs: dict,
                       batch_size: int) -> list[str]:
    device = model_device(model)
    out: list[str] = []
    for i in range(0, len(sources), batch_size):
        enc = tokenizer([collate.prefix + s for s in sources[i : i + batch_size]], truncation=True,
                        max_length=collate.max_source_length, padding=True, return_tensors="pt")
        ids = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             **gen_kwargs)
        out.extend(t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True))
    return out


def prepare(task: str, model_path: str, data: str | Path, recipe: Recipe, opts: RunOptions) -> Prepared:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    da, ea = recipe.data_args, recipe.eval_args
    train = [r for r in load_split(task, data, "train") if r["source"] and r["target"]]
    train = limit(train, opts.max_train_samples)
    split = ea.get("eval_split") or ("test" if load_split(task, data, "test") else "validation")
    evals = limit(load_split(task, data, split), opts.max_eval_samples)
    if not train or not evals:
        raise UserError(f"{task}: empty split (train {len(train)}, {split} {len(evals)})")
    collate = Seq2SeqCollator(tok, int(da.get("max_source_length", 1024)), int(da.get("max_target_length", 128)),
                              str(da.get("source_prefix", "")))
    gen_kwargs: dict[str, Any] = {"num_beams": int(ea.get("num_beams", 4))}
    for key in ("max_new_tokens", "min_new_tokens", "length_penalty", "no_repeat_ngram_size"):
        if key in ea:
            gen_kwargs[key] = ea[key]
    gen_kwargs.setdefault("max_new_tokens", collate.max_target_length)
    dtype = torch_dtype(opts.dtype or recipe.dtype)
    ebs = int(ea.get("eval_batch_size", 16))

    def build_model():
        return AutoModelForSeq2SeqLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)

    def evaluate(model) -> dict[str, float]:
        preds = generate_summaries(model, tok, [r["source"] for r in evals], collate, gen_kwargs, ebs)
        scores = M.rouge(preds, [r["target"] for r in evals])
        scores["gen_len"] = sum(len(p.split()) for p in preds) / len(preds)
        return scores

    return Prepared(train, collate, build_model, evaluate,
                    info={"n_train": len(train), "eval_split": split, "n_eval": len(evals),
                          "generation": gen_kwargs})


def columns(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """ROUGE-1/2/L cells (R-L is the summary-level ROUGE-Lsum, the usual BART convention)."""
    lab = LABELS[task]
    return {f"{lab} R-1": metrics["rouge1"], f"{lab} R-2": metrics["rouge2"], f"{lab} R-L": metrics["rougeLsum"]}


def avg_columns(task: str) -> list[str]:
    return []
