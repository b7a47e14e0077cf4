"""Instruction tuning on Alpaca, evaluated on MMLU (paper Table 4, LLaMA-2-7B).

Data under ``--data``:

- Alpaca: ``alpaca_data.json`` (or ``alpaca.json``, ``train.json``, a ``.jsonl``, or the path in
  ``data_args.alpaca_file``): a list of {"instruction", "input", "output"};
- MMLU in the original layout: ``<data>/mmlu/{dev,test}/<subject>_{dev,test}.csv`` (also
  accepted: ``<data>/mmlu/data/...``, ``<data>/data/...``, ``<data>/{dev,test}``, or
  ``data_args.mmlu_dir``); CSV without header: question, A, B, C, D, answer.

Training: causal LM on ``prompt + output + eos`` with the standard Alpaca prompt; the
prompt tokens are masked (-100) so only the response is learned.

MMLU: the usual prompt ("The following are multiple choice questions (with answers)
about <subject>." + k dev examples + the question + "Answer:"); the prediction is the
argmax over the next-token logits of the four answer letters (the token a space-prefixed
letter becomes after "Answer:" in this tokenizer). Accuracy is reported overall
(micro-average over questions), per category (STEM, humanities, social sciences, other;
the subject → category map of Hendrycks et al. 2021) and per subject.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asymlora.errors import MissingFileError, UserError
from asymlora.recipes.base import (
    Prepared,
    Recipe,
    RunOptions,
    limit,
    model_device,
    torch_dtype,
)

TASKS: tuple[str, ...] = ("mmlu",)
DATA_ARGS = ("max_length", "alpaca_file", "mmlu_dir")
EVAL_ARGS = ("shots", "eval_batch_size", "max_eval_length", "subjects")
CHOICES = ("A", "B", "C", "D")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

CATEGORIES = ("STEM", "humanities", "social sciences", "other")
_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}
#: subject → category for the 57 MMLU subjects.
SUBJECT_CATEGORY: dict[str, str] = {s: c for c, subs in _BY_CATEGORY.items() for s in subs}

MMLU_HINT = ("Get MMLU in its original layout (the Hendrycks test data tarball `data.tar`, which unpacks to "
             "data/dev/*_dev.csv and data/test/*_test.csv) and put it at DATA/mmlu/ (so DATA/mmlu/test/…).")
ALPACA_HINT = ("Get the Alpaca data (`alpaca_data.json` from the Stanford Alpaca repository, 52k "
               "instruction/input/output records) and put it at DATA/alpaca_data.json.")


def alpaca_prompt(example: dict[str, str]) -> str:
    """The standard Alpaca prompt (with or without an input field)."""
    if example.get("input", "").strip():
        return PROMPT_WITH_INPUT.format(instruction=example["instruction"], input=example["input"])
    return PROMPT_NO_INPUT.format(instruction=example["instruction"])


def _alpaca_path(data: Path, recipe: Recipe) -> Path | None:
    f = recipe.data_args.get("alpaca_file")
    cands = [Path(f) if Path(f).is_absolute() else data / f] if f else []
    cands += [data / n for n in ("alpaca_data.json", "alpaca.json", "alpaca_data_cleaned.json", "train.json",
                                 "alpaca_data.jsonl", "train.jsonl")]
    if data.is_file():
        cands.insert(0, data)
    return next((c for c in cands if c.is_file()), None)


def _mmlu_dir(data: Path, recipe: Recipe) -> Path | None:
    f = recipe.data_args.get("mmlu_dir")
    cands = [Path(f) if Path(f).is_absolute() else data / f] if f else []
    cands += [data / "mmlu", data / "mmlu" / "data", data / "data", data]
    return next((c for c in cands if (c / "test").is_dir() and any((c / "test").glob("*_test.csv"))), None)


def _required_alpaca_path(data: Path, recipe: Recipe) -> Path:
    path = _alpaca_path(data, recipe)
    if path is None:
        raise MissingFileError(f"no Alpaca training file under {data}. {ALPACA_HINT}")
    return path


def _required_mmlu_dir(data: Path, recipe: Recipe) -> Path:
    path = _mmlu_dir(data, recipe)
    if path is None:
        raise MissingFileError(f"no MMLU test CSVs under {data} (looked for mmlu/test/*_test.csv). {MMLU_HINT}")
    return path


def check_data(task: str, data: str | Path, recipe: Recipe) -> None:
    data = Path(data)
    _required_alpaca_path(data, recipe)
    _required_mmlu_dir(data, recipe)


def read_alpaca(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in fh if line.strip()]
        else:
            rows = json.load(fh)
    out = []
    for i, r in enumerate(rows):
        if "instruction" not in r or "output" not in r:
            raise UserError(f"{path}: record {i} lacks 'instruction'/'output' (keys: {sorted(r)})")
        out.append({"instruction": r["instruction"], "input": r.get("input", "") or "", "output": r["output"]})
    return out


def read_mmlu_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an MMLU CSV (no header): question, A, B, C, D, answer letter."""
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if len(row) != 6:
                raise UserError(f"{path}:{i + 1}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            ans = row[5].strip()
            if ans not in CHOICES:
                raise UserError(f"{path}:{i + 1}: answer {ans!r} is not one of {CHOICES}")
            rows.append({"question": row[0], "choices": row[1:5], "answer": ans})
    return rows


def load_mmlu(mmlu_dir: str | Path, subjects: Sequence[str] | None = None) -> dict[str, dict[str, list]]:
    """{subject: {"dev": [...], "test": [...]}} for every *_test.csv present."""
    d = Path(mmlu_dir)
    out: dict[str, dict[str, list]] = {}
    for p in sorted((d / "test").glob("*_test.csv")):
        subject = p.name[: -len("_test.csv")]
        if subjects and subject not in subjects:
            continue
        dev_path = d / "dev" / f"{subject}_dev.csv"
        out[subject] = {"test": read_mmlu_csv(p), "dev": read_mmlu_csv(dev_path) if dev_path.is_file() else []}
    return out


def format_question(row: dict[str, Any], with_answer: bool) -> str:
    text = row["question"]
    for letter, choice in zip(CHOICES, row["choices"]):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if with_answer:
        text += f" {row['answer']}\n\n"
    return text


def mmlu_prompt(subject: str, row: dict[str, Any], shots: Sequence[dict[str, Any]]) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "".join(format_question(s, True) for s in shots) + format_question(row, False)


def letter_token_ids(tokenizer) -> list[int]:
    """Token id of each answer letter as it follows "Answer:" (" A" in BPE, "▁A" in SentencePiece, ...).

    Found by tokenising the context with and without the letter and taking the first new
    token, which handles tokenizers that merge the space into the letter and those that
    emit a separate space token.
    """
    ctx = "Answer:"
    base = tokenizer(ctx, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in CHOICES:
        full = tokenizer(ctx + " " + letter, add_special_tokens=False)["input_ids"]
        if full[: len(base)] == base and len(full) > len(base):
            new = full[len(base):]
            # a bare space token followed by the letter: take the letter
            tid = new[-1] if len(new) > 1 and tokenizer.decode(new[:1]).strip() == "" else new[0]
        else:
            tid = tokenizer(" " + letter, add_special_tokens=False)["input_ids"][-1]
        ids.append(int(tid))
    if len(set(ids)) != 4:
        raise UserError(f"answer letters map to non-distinct tokens {ids} in this tokenizer")
    return ids


def score_choices(model, tokenizer, prompts: Sequence[str], letter_ids: Sequence[int], batch_size: int = 8,
                  max_length: int | None = None) -> list[int]:
    """argmax over the answer-letter logits at the last prompt position (right padding)."""
    import torch

    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    idx = torch.tensor(list(letter_ids), device=device)
    preds: list[int] = []
    for i in range(0, len(prompts), batch_size):
        enc = [tokenizer(p)["input_ids"] for p in prompts[i : i + batch_size]]
        if max_length is not None:
            enc = [e[-max_length:] for e in enc]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, : len(e)] = torch.tensor(e)
            mask[j, : len(e)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        last = mask.sum(1).to(device) - 1
        rows = logits[torch.arange(len(enc), device=device), last]  # (b, vocab)
        preds.extend(rows[:, idx].float().argmax(-1).cpu().tolist())
    return preds


def mmlu_accuracy(results: dict[str, list[bool]]) -> dict[str, float]:
    """From per-subject correctness lists: acc (micro), acc_<category> (micro), acc_<subject>."""
    out: dict[str, float] = {}
    cat_hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    everything: list[bool] = []
    for subject, hits in results.items():
        if not hits:
            continue
        out[f"subject/{subject}"] = sum(hits) / len(hits)
        cat = SUBJECT_CATEGORY.get(subject)
        if cat is not None:
            cat_hits[cat].extend(hits)
        everything.extend(hits)
    for c, hits in cat_hits.items():
        if hits:
            out[f"category/{c}"] = sum(hits) / len(hits)
    if everything:
        out["acc"] = sum(everything) / len(everything)
    return out


def evaluate_mmlu(model, tokenizer, mmlu: dict[str, dict[str, list]], shots: int, batch_size: int = 8,
                  max_length: int = 2048, max_per_subject: int | None = None) -> dict[str, float]:
    """k-shot MMLU accuracy (drops shots from the end while the prompt is longer than max_length)."""
    letter_ids = letter_token_ids(tokenizer)
    results: dict[str, list[bool]] = {}
    for subject, split in mmlu.items():
        rows = limit(split["test"], max_per_subject)
        prompts = []
        for row in rows:
            k = min(shots, len(split["dev"]))
            prompt = mmlu_prompt(subject, row, split["dev"][:k])
            while k > 0 and len(tokenizer(prompt)["input_ids"]) > max_length:
                k -= 1
                prompt = mmlu_prompt(subject, row, split["dev"][:k])
            prompts.append(prompt)
        preds = score_choices(model, tokenizer, prompts, letter_ids, batch_size, max_length)
        results[subject] = [CHOICES[p] == row["answer"] for p, row in zip(preds, rows)]
    return mmlu_accuracy(results)


class CausalCollator:
    """Right-pad pre-tokenised examples; labels -100 on padding (prompt positions already -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict:
        import torch

        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for j, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[j, :n] = torch.tensor(ex["input_ids"])
            mask[j, :n] = 1
            labels[j, :n] = torch.tensor(ex["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokenize_alpaca(records: list[dict[str, str]], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """input_ids = tok(prompt + output) + eos; labels = the same with the prompt tokens set to -100."""
    prompts = [alpaca_prompt(r) for r in records]
    p_ids = tokenizer(prompts)["input_ids"]
    f_ids = tokenizer([p + r["output"] for p, r in zip(prompts, records)])["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for p, f in zip(p_ids, f_ids):
        if eos is not None and (not f or f[-1] != eos):
            f = f + [eos]
        f = f[:max_length]
        n_prompt = min(len(p), len(f))
        labels = [-100] * n_prompt + f[n_prompt:]
        if all(x == -100 for x in labels):
            continue  # response truncated away: nothing to learn
        out.append({"input_ids": f, "labels": labels})
    return out


def prepare(task: str, model_path: str, data: str | Path, recipe: Recipe, opts: RunOptions) -> Prepared:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = Path(data)
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    da, ea = recipe.data_args, recipe.eval_args
    records = limit(read_alpaca(_required_alpaca_path(data, recipe)), opts.max_train_samples)
    train = tokenize_alpaca(records, tok, int(da.get("max_length", 512)))
    if not train:
        raise UserError("Alpaca: no training example left after tokenisation")
    mmlu = load_mmlu(_required_mmlu_dir(data, recipe), ea.get("subjects"))
    if not mmlu:
        raise UserError("MMLU: no subject found")
    shots = ea.get("shots", [5])
    shots = [shots] if isinstance(shots, int) else list(shots)
    dtype = torch_dtype(opts.dtype or recipe.dtype)

    def build_model():
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)

    def evaluate(model) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in shots:
            res = evaluate_mmlu(model, tok, mmlu, k, int(ea.get("eval_batch_size", 4)),
                                int(ea.get("max_eval_length", 2048)), opts.max_eval_samples)
            out.update({f"{k}shot/{name}": v for name, v in res.items()})
        return out

    return Prepared(train, CausalCollator(tok.pad_token_id), build_model, evaluate,
                    info={"n_train": len(train), "n_subjects": len(mmlu), "shots": shots,
                          "n_test": sum(len(limit(v["test"], opts.max_eval_samples)) for v in mmlu.values())})


def columns(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """Per shot count: the four category accuracies and the overall accuracy."""
    shots = list(dict.fromkeys(int(k.split("shot/")[0]) for k in metrics if "shot/" in k))  # recipe order
    cols: dict[str, float] = {}
    for k in shots:
        suffix = f" ({k}-shot)" if len(shots) > 1 else ""
        for c in CATEGORIES:
            key = f"{k}shot/category/{c}"
            if key in metrics:
                cols[f"{c[0].upper() + c[1:]}{suffix}"] = metrics[key]
        cols[f"Avg{suffix}"] = metrics[f"{k}shot/acc"]
    return cols


def avg_columns(task: str) -> list[str]:
    return []
