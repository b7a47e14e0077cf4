"""GLUE/RoBERTa recipe end to end on a tiny config-built RobertaForSequenceClassification.

The fixture data is written in the original GLUE TSV layout (SST-2 with header, CoLA
without header, STS-B regression, MNLI matched/mismatched) and as a `datasets` saved dir.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from asymlora.cli.main import main  # noqa: E402
from asymlora.recipes import glue  # noqa: E402
from conftest import child_process, require  # noqa: E402

WORDS = "the movie was good bad great awful plot actors fun boring a an is it not very".split()


def _sentences(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 8, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


def make_tokenizer(texts: list[str], path: Path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory) -> Path:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    path = tmp_path_factory.mktemp("roberta")
    tok = make_tokenizer(_sentences(200, 0), path)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=80, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(0)
    RobertaForSequenceClassification(cfg).save_pretrained(path)
    return path


def _write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        if header:
            fh.write("\t".join(header) + "\n")
        for r in rows:
            fh.write("\t".join(r) + "\n")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    s = _sentences(60, 1)
    for split, lo, hi in (("train", 0, 40), ("dev", 40, 60)):
        _write_tsv(root / "SST-2" / f"{split}.tsv", ["sentence", "label"],
                   [[x, str(int("good" in x or "great" in x))] for x in s[lo:hi]])
        # CoLA: no header; source, label, original label, sentence (a quote char must not break parsing)
        _write_tsv(root / "CoLA" / f"{split}.tsv", None,
                   [["gj04", str(i % 2), "*" if i % 2 == 0 else "", x + ' "'] for i, x in enumerate(s[lo:hi])])
        _write_tsv(root / "STS-B" / f"{split}.tsv",
                   ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                    "sentence2", "score"],
                   [[str(i), "g", "f", "y", "0", "a", "b", x, s[(i + 7) % 60], f"{(i % 6) * 0.9:.1f}"]
                    for i, x in enumerate(s[lo:hi])])
    mnli_header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                   "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    labels = ["entailment", "neutral", "contradiction"]

    def mnli_rows(lo, hi):
        return [[str(i), "0", "0", "g", "(", "(", "(", "(", x, s[(i + 3) % 60], labels[i % 3], labels[i % 3]]
                for i, x in enumerate(s[lo:hi], start=lo)]

    _write_tsv(root / "MNLI" / "train.tsv", mnli_header, mnli_rows(0, 40))
    _write_tsv(root / "MNLI" / "dev_matched.tsv", mnli_header, mnli_rows(40, 50))
    _write_tsv(root / "MNLI" / "dev_mismatched.tsv", mnli_header, mnli_rows(50, 60))
    return root


def test_read_tsv_formats(glue_dir):
    sst = glue.read_tsv(glue_dir / "SST-2" / "dev.tsv", glue.TASK_SPECS["sst2"])
    assert len(sst) == 20 and set(ex["label"] for ex in sst) <= {0, 1} and len(sst[0]["text"]) == 1
    cola = glue.read_tsv(glue_dir / "CoLA" / "train.tsv", glue.TASK_SPECS["cola"])
    assert [ex["label"] for ex in cola[:4]] == [0, 1, 0, 1] and cola[0]["text"][0].endswith('"')
    sts = glue.read_tsv(glue_dir / "STS-B" / "train.tsv", glue.TASK_SPECS["stsb"])
    assert isinstance(sts[1]["label"], float) and sts[1]["label"] == pytest.approx(0.9) and len(sts[0]["text"]) == 2
    m = glue.load_split("mnli", glue_dir, "mm")
    assert len(m) == 10 and [ex["label"] for ex in m[:3]] == [2, 0, 1]  # 50 % 3 = 2 -> contradiction = 2


@pytest.mark.parametrize("task, header, row, expected", [
    ("mrpc", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], ["1", "7", "8", "He said.", "He told."],
     {"text": ("He said.", "He told."), "label": 1}),
    ("qqp", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ["3", "1", "2", "Why?", "How?", "0"],
     {"text": ("Why?", "How?"), "label": 0}),
    ("qnli", ["index", "question", "sentence", "label"], ["0", "Who?", "Him.", "not_entailment"],
     {"text": ("Who?", "Him."), "label": 1}),
    ("rte", ["index", "sentence1", "sentence2", "label"], ["0", "A.", "B.", "entailment"],
     {"text": ("A.", "B."), "label": 0}),
])
def test_read_tsv_pair_tasks(tmp_path, task, header, row, expected):
    _write_tsv(tmp_path / "x.tsv", header, [row, row[:2]])  # the short (malformed) line is skipped
    assert glue.read_tsv(tmp_path / "x.tsv", glue.TASK_SPECS[task]) == [expected]


def test_saved_dataset_layout(tmp_path):
    datasets = require("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence1": ["a b", "c d"], "sentence2": ["e", "f"], "label": [0, 1]}),
        "validation": datasets.Dataset.from_dict({"sentence1": ["x"], "sentence2": ["y"], "label": [1]}),
    })
    dd.save_to_disk(str(tmp_path / "rte"))
    tr = glue.load_split("rte", tmp_path, "train")
    assert tr == [{"text": ("a b", "e"), "label": 0}, {"text": ("c d", "f"), "label": 1}]
    assert glue.load_split("rte", tmp_path, "")[0]["label"] == 1


def test_missing_data_message(tmp_path, tiny_roberta, capsys):
    rc = main(["run", "glue-roberta-large", "--model", str(tiny_roberta), "--data", str(tmp_path),
               "--tasks", "rte", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "RTE" in err and "train.tsv" in err
    assert not (tmp_path / "out").exists()  # failed before any work


def test_missing_model_message(tmp_path, glue_dir, capsys):
    rc = main(["run", "glue-roberta-large", "--model", str(tmp_path / "nope"), "--data", str(glue_dir),
               "--tasks", "sst2"])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "hf download" in err


def _scored_by_hand(model_dir: Path, adapter: Path, task: str, rows: list[dict]) -> list:
    """Predictions of the saved adapter on ``rows``, one unpadded forward per example: the model
    is rebuilt from the folders alone (base + adapter, the trained classifier among its modules)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from asymlora.formats.native import load_adapter

    spec = glue.TASK_SPECS[task]
    kw = {"problem_type": "regression"} if spec.num_labels == 1 else {}
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=spec.num_labels,
                                                               ignore_mismatched_sizes=True, **kw)
    model = load_adapter(model, adapter).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    preds = []
    with torch.no_grad():
        for ex in rows:
            logits = model(**tok(*ex["text"], truncation=True, max_length=128, return_tensors="pt")).logits[0]
            preds.append(float(logits[0]) if spec.num_labels == 1 else int(logits.argmax()))
    return preds


def _mcc(pred: list[int], ref: list[int]) -> float:
    """Matthews' correlation from the 2x2 confusion counts (0 when a margin is empty)."""
    tp = sum(p == r == 1 for p, r in zip(pred, ref))
    tn = sum(p == r == 0 for p, r in zip(pred, ref))
    fp = sum(p == 1 and r == 0 for p, r in zip(pred, ref))
    fn = sum(p == 0 and r == 1 for p, r in zip(pred, ref))
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / den if den else 0.0


def test_glue_end_to_end(tmp_path, tiny_roberta, glue_dir, monkeypatch, capsys):
    stats = require("scipy.stats")
    out = tmp_path / "runs"
    rc = main(["run", "glue-roberta-large", "--model", str(tiny_roberta), "--data", str(glue_dir),
               "--out", str(out), "--tasks", "sst2", "cola", "stsb", "mnli", "--strategies", "b-only",
               "--rank", "4", "--seeds", "0", "--max-steps", "2", "--batch-size", "8", "--no-progress"])
    assert rc == 0
    run = {t: out / t / "b-only-r4" / "seed0" for t in ("sst2", "cola", "stsb", "mnli")}
    res = {t: json.loads((d / "result.json").read_text()) for t, d in run.items()}
    for r in res.values():
        assert r["steps"] == 2 and r["alpha"] == 8.0 and r["adapter_config"]["r"] == 4
        assert r["adapter_trainable_params"] > 0
    assert res["stsb"]["info"]["n_train"] == 40 and res["mnli"]["info"]["n_eval"] == {"m": 10, "mm": 10}
    # every metric recomputed from the saved adapter and the dev files, by hand (scipy for the correlations)
    dev = {t: glue.load_split(t, glue_dir, "") for t in ("sst2", "cola", "stsb")}
    dev["mnli_m"], dev["mnli_mm"] = glue.load_split("mnli", glue_dir, "m"), glue.load_split("mnli", glue_dir, "mm")

    def scored(task, rows):
        pred = _scored_by_hand(tiny_roberta, run[task] / "adapter", task, rows)
        return pred, [ex["label"] for ex in rows]

    def acc(pred, ref):
        return sum(p == r for p, r in zip(pred, ref)) / len(ref)

    pred, ref = scored("sst2", dev["sst2"])
    m_sst2 = acc(pred, ref)
    assert res["sst2"]["metrics"] == pytest.approx({"accuracy": m_sst2})
    pred, ref = scored("cola", dev["cola"])
    m_cola = _mcc(pred, ref)
    assert res["cola"]["metrics"] == pytest.approx({"mcc": m_cola, "accuracy": acc(pred, ref)})
    pred, ref = scored("stsb", dev["stsb"])
    m_stsb = stats.pearsonr(pred, ref)[0]
    assert res["stsb"]["metrics"] == pytest.approx({"pearson": stats.pearsonr(pred, ref)[0],
                                                    "spearman": stats.spearmanr(pred, ref)[0]}, abs=1e-5)
    assert len(set(pred)) > 1  # a regression output, not a constant
    m = {f"accuracy_{s}": acc(*scored("mnli", dev[f"mnli_{s}"])) for s in ("m", "mm")}
    assert res["mnli"]["metrics"] == pytest.approx(m)
    assert res["mnli"]["columns"] == {"MNLI": m["accuracy_m"], "MNLI-mm": m["accuracy_mm"]}
    # a second invocation skips completed runs: no training, the result and adapter files untouched
    done = run["sst2"]
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (done / "result.json",
                                                                  done / "adapter" / "adapter_model.safetensors")}
    import asymlora.training.loop

    def no_training(*args, **kwargs):
        raise AssertionError("a completed run was trained again")

    monkeypatch.setattr(asymlora.training.loop, "fit", no_training)
    capsys.readouterr()
    rc = main(["run", "glue-roberta-large", "--model", str(tiny_roberta), "--data", str(glue_dir),
               "--out", str(out), "--tasks", "sst2", "--strategies", "b-only", "--rank", "4", "--seeds", "0",
               "--max-steps", "2", "--no-progress"])
    assert rc == 0
    assert f"[skip] {done / 'result.json'} exists" in capsys.readouterr().err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == files
    monkeypatch.undo()
    # --overwrite trains it again, and the new run's result and adapter replace the earlier ones
    rc = main(["run", "glue-roberta-large", "--model", str(tiny_roberta), "--data", str(glue_dir),
               "--out", str(out), "--tasks", "sst2", "--strategies", "b-only", "--rank", "4", "--seeds", "0",
               "--max-steps", "2", "--batch-size", "8", "--no-progress", "--overwrite"])
    assert rc == 0 and "[skip]" not in capsys.readouterr().err
    assert all(p.stat().st_mtime_ns != mtime for p, (_, mtime) in files.items())
    assert json.loads((done / "result.json").read_text())["metrics"] == res["sst2"]["metrics"]  # same seed, steps
    # results table: each task's cell is its run's headline metric
    rc = main(["results", str(out), "-o", str(tmp_path / "table")])
    assert rc == 0
    md = (tmp_path / "table" / "results.md").read_text()
    assert "| b-only r=4 |" in md and "CoLA" in md and "STS-B" in md
    rows = list(csv.DictReader(open(tmp_path / "table" / "results.csv", encoding="utf-8")))
    cells = {row["column"]: float(row["mean"]) for row in rows if row["column"] != "Avg"}
    want = {"SST-2": m_sst2, "CoLA": m_cola, "STS-B": m_stsb, "MNLI": m["accuracy_m"], "MNLI-mm": m["accuracy_mm"]}
    assert cells == pytest.approx({k: 100 * v for k, v in want.items()}, abs=1e-3)  # percent


def test_stsb_model_is_regression(tiny_roberta, glue_dir):
    """STS-B trains a one-output regressor on the file's scores: the batch carries the scores as
    written (fixture: (i % 6) * 0.9) and the loss the run minimises is their mean squared error."""
    from asymlora.recipes.base import RunOptions, load_recipe

    recipe = load_recipe("glue-roberta-large").for_task("stsb")
    prep = glue.prepare("stsb", str(tiny_roberta), glue_dir, recipe, RunOptions(max_eval_samples=4))
    assert prep.loss_fn is None  # the model's own loss
    model = prep.build_model().eval()
    batch = prep.collate_fn(prep.train_dataset[:5])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([(i % 6) * 0.9 for i in range(5)])
    out = model(**batch)
    assert out.logits.shape == (5, 1)
    assert float(out.loss) == pytest.approx(float(((out.logits[:, 0] - batch["labels"]) ** 2).mean()), rel=1e-6)


def test_a_run_killed_while_overwriting_keeps_its_result_and_adapter_a_pair(tmp_path, tiny_roberta, glue_dir):
    """run --overwrite SIGKILLed at the moment the new files are swapped in: the result.json and
    adapter/ in the run's folder are both the earlier run's or both the new run's, never the
    metrics of one with the weights of the other."""
    import subprocess
    import sys
    import time

    import asymlora
    from asymlora.fileio import FAULT_ENV, FAULT_MARK_ENV

    out = tmp_path / "runs"
    argv = ["run", "glue-roberta-large", "--model", str(tiny_roberta), "--data", str(glue_dir), "--out", str(out),
            "--tasks", "stsb", "--strategies", "b-only", "--rank", "4", "--seeds", "0", "--batch-size", "8",
            "--no-progress"]
    assert main([*argv, "--max-steps", "2"]) == 0
    done = out / "stsb" / "b-only-r4" / "seed0"
    files = (done / "result.json", done / "adapter" / "adapter_model.safetensors")
    earlier = [p.read_bytes() for p in files]
    mark = tmp_path / "mark"
    src = str(Path(asymlora.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
               **{FAULT_ENV: "folder.swapped", FAULT_MARK_ENV: str(mark)})
    with child_process([sys.executable, "-m", "asymlora.cli", *argv, "--max-steps", "4", "--overwrite"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) as child:
        end = time.monotonic() + 600
        while not mark.exists() and child.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
        if not mark.exists():
            pytest.skip("this file system swaps no folders in one step (renameat2 RENAME_EXCHANGE)")
    # SIGKILLed there, by the end of the block
    now = [p.read_bytes() for p in files]
    assert now[0] != earlier[0] or now[1] == earlier[1]  # the earlier result, so the earlier adapter
    assert now[0] == earlier[0] or now[1] != earlier[1]  # a new result, so a new adapter
    assert json.loads(now[0])["steps"] == 4  # the swap had happened: the new pair
