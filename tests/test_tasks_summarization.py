"""XSum / CNN-DM BART recipes end to end on a tiny config-built BartForConditionalGeneration."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from conftest import require  # noqa: E402

require("rouge_score")

from asymlora.cli.main import main  # noqa: E402
from asymlora.recipes import summarization as S  # noqa: E402

WORDS = "police said the man was arrested on monday after a fire in the city council meeting report".split()


def _docs(n: int, seed: int) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        doc = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (20,), generator=g)) + "."
        out.append((doc, " ".join(doc.split()[:5]) + "."))
    return out


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory) -> Path:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    path = tmp_path_factory.mktemp("bart")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([d for d, _ in _docs(50, 0)],
                            trainers.BpeTrainer(vocab_size=350,
                                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")
    fast.save_pretrained(path)
    cfg = BartConfig(vocab_size=len(fast), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)
    torch.manual_seed(0)
    BartForConditionalGeneration(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("summ")
    pairs = _docs(30, 1)
    (root / "xsum").mkdir()
    for split, lo, hi in (("train", 0, 20), ("validation", 20, 25), ("test", 25, 30)):
        with open(root / "xsum" / f"{split}.jsonl", "w") as fh:
            for d, s in pairs[lo:hi]:
                fh.write(json.dumps({"document": d, "summary": s, "id": "x"}) + "\n")
    (root / "cnn_dailymail").mkdir()
    for split, lo, hi in (("train", 0, 20), ("validation", 20, 30)):  # no test split: evaluate on validation
        with open(root / "cnn_dailymail" / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "article", "highlights"])
            for d, s in pairs[lo:hi]:
                w.writerow(["i", d, s])
    return root


def test_readers(data_dir):
    tr = S.load_split("xsum", data_dir, "train")
    assert len(tr) == 20 and set(tr[0]) == {"source", "target"}
    va = S.load_split("cnn_dailymail", data_dir, "validation")
    assert len(va) == 10 and va[0]["target"].endswith(".")
    assert S.load_split("cnn_dailymail", data_dir, "test") == []


def test_label_masking(tiny_bart):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bart)
    col = S.Seq2SeqCollator(tok, 64, 16)
    batch = col([{"source": "police said", "target": "the man was arrested on monday"},
                 {"source": "a fire", "target": "fire"}])
    tgt = tok(text_target=["fire"])["input_ids"][0]
    row = batch["labels"][1].tolist()
    assert row[: len(tgt)] == tgt and all(x == -100 for x in row[len(tgt):])  # pad -> -100, nothing else
    assert (batch["labels"][0] != -100).all()


def test_xsum_end_to_end(tmp_path, tiny_bart, data_dir, monkeypatch):
    out = tmp_path / "runs"
    # the model generates as usual (a random tiny model: no word in common with the references),
    # and the run then scores known predictions: the first reference itself, the first half of
    # the second, an unrelated word
    refs = [row["target"] for row in S.load_split("xsum", data_dir, "test")[:3]]
    half = refs[1].split()[: len(refs[1].split()) // 2]
    preds = [refs[0], " ".join(half), "zebra"]
    generated = []
    real_generate = S.generate_summaries

    def known_predictions(*args, **kwargs):
        generated.append(real_generate(*args, **kwargs))
        return preds

    monkeypatch.setattr(S, "generate_summaries", known_predictions)
    rc = main(["run", "xsum-bart-large", "--model", str(tiny_bart), "--data", str(data_dir), "--out", str(out),
               "--strategies", "b-only", "--rank", "4", "--max-steps", "2", "--batch-size", "4",
               "--max-test", "3", "--no-progress", "--set", "eval_args.max_new_tokens=6",
               "--set", "eval_args.min_new_tokens=2", "--set", "data_args.max_source_length=48"])
    assert rc == 0
    for s in ("b-only",):
        r = json.loads((out / "xsum" / f"{s}-r4" / "seed0" / "result.json").read_text())
        assert {"rouge1", "rouge2", "rougeL", "rougeLsum"} <= set(r["metrics"])
        # the scores are those of the predictions against the first 3 test references, in order:
        # ROUGE-1 F of a prefix of k of n distinct-enough words is 2k/(n+k) (precision 1, recall k/n)
        from rouge_score import rouge_scorer

        assert len(generated) == 1 and len(generated[0]) == 3
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        by_hand = [scorer.score(ref, pred) for pred, ref in zip(preds, refs)]
        n, k = len(refs[1].split()), len(half)
        assert by_hand[1]["rouge1"].fmeasure == pytest.approx(2 * k / (n + k))
        assert r["metrics"]["rouge1"] == pytest.approx((1 + 2 * k / (n + k) + 0) / 3, abs=1e-12)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert r["metrics"][key] == pytest.approx(sum(x[key].fmeasure for x in by_hand) / 3, abs=1e-12)
        assert r["metrics"]["gen_len"] == pytest.approx(sum(len(p.split()) for p in preds) / 3)
        assert r["columns"] == {"XSum R-1": r["metrics"]["rouge1"], "XSum R-2": r["metrics"]["rouge2"],
                                "XSum R-L": r["metrics"]["rougeLsum"]}
        assert r["info"]["eval_split"] == "test" and r["info"]["n_eval"] == 3
        assert r["info"]["generation"]["num_beams"] == 8 and r["info"]["generation"]["max_new_tokens"] == 6
        assert r["adapter_config"]["target_modules"] == ["q_proj", "k_proj", "v_proj"]


def test_cnndm_end_to_end_csv_validation(tmp_path, tiny_bart, data_dir):
    out = tmp_path / "runs"
    rc = main(["run", "cnndm-bart-large", "--model", str(tiny_bart), "--data", str(data_dir), "--out", str(out),
               "--strategies", "a-only", "--rank", "2", "--max-steps", "1", "--batch-size", "4",
               "--max-test", "2", "--no-progress", "--set", "eval_args.max_new_tokens=6",
               "--set", "eval_args.min_new_tokens=2"])
    assert rc == 0
    r = json.loads((out / "cnn_dailymail" / "a-only-r2" / "seed0" / "result.json").read_text())
    assert r["info"]["eval_split"] == "validation" and r["info"]["generation"]["num_beams"] == 4


def test_missing_data(tmp_path, tiny_bart, capsys):
    rc = main(["run", "xsum-bart-large", "--model", str(tiny_bart), "--data", str(tmp_path)])
    assert rc == 2 and "document/summary" in capsys.readouterr().err
