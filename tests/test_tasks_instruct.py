"""Alpaca instruction tuning + MMLU evaluation on a tiny config-built LlamaForCausalLM."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from asymlora.cli.main import main  # noqa: E402
from asymlora.recipes import instruct as I  # noqa: E402
from conftest import require  # noqa: E402

SUBJECTS = {"abstract_algebra": "STEM", "philosophy": "humanities", "marketing": "other"}


def _mmlu_rows(n: int, offset: int) -> list[list[str]]:
    return [[f"What is {i} plus {i}?", str(2 * i), str(i), str(i + 1), "seven", "ABCD"[(i + offset) % 4]]
            for i in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("instruct")
    alpaca = [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else f"numbers {i}",
               "output": f"It is {2 * i}."} for i in range(12)]
    (root / "alpaca_data.json").write_text(json.dumps(alpaca))
    for split, n in (("dev", 5), ("test", 4)):
        (root / "mmlu" / split).mkdir(parents=True)
        for k, subject in enumerate(SUBJECTS):
            with open(root / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as fh:
                csv.writer(fh).writerows(_mmlu_rows(n, k))
    return root


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, data_dir) -> Path:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("llama")
    texts = [I.alpaca_prompt(r) + r["output"] for r in json.loads((data_dir / "alpaca_data.json").read_text())]
    texts += [I.mmlu_prompt("marketing", {"question": q, "choices": [a, b, c, d], "answer": ans}, [])
              for q, a, b, c, d, ans in _mmlu_rows(5, 0)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_category_map():
    assert len(I.SUBJECT_CATEGORY) == 57
    counts = {c: sum(v == c for v in I.SUBJECT_CATEGORY.values()) for c in I.CATEGORIES}
    # lm-evaluation-harness's grouping (tasks/mmlu/_generate_configs.py; its per-subject YAML tags), which
    # puts anatomy in STEM (the original Hendrycks categories.py put it, as "health", in other)
    assert counts == {"STEM": 19, "humanities": 13, "social sciences": 12, "other": 13}
    assert I.SUBJECT_CATEGORY["anatomy"] == "STEM" and I.SUBJECT_CATEGORY["econometrics"] == "social sciences"


def test_prompt_format():
    row = {"question": "Q?", "choices": ["w", "x", "y", "z"], "answer": "C"}
    p = I.mmlu_prompt("high_school_physics", row, [row])
    assert p == ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                 "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\nQ?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    assert I.alpaca_prompt({"instruction": "Do", "input": ""}).endswith("### Instruction:\nDo\n\n### Response:\n")
    assert "### Input:\nX\n\n" in I.alpaca_prompt({"instruction": "Do", "input": "X"})


class _StubTok:
    """Whitespace tokenizer: word i -> id; ids 10..13 are the letters."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        vocab = {"A": 10, "B": 11, "C": 12, "D": 13}
        return {"input_ids": [vocab.get(w, 20) for w in text.split()]}


class _StubModel(torch.nn.Module):
    """Logits at position t favour letter (t mod 4); a real-length check of the last-position gather."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, 30)
        for pos in range(t):
            logits[:, pos, 10 + pos % 4] = 5.0
            logits[:, pos, 25] = 100.0  # a non-letter token with a larger logit is ignored
        return SimpleNamespace(logits=logits)


def test_score_choices_stub_model():
    prompts = ["x", "x x", "x x x", "x x x x x", "x x x x x x x x"]  # lengths 1,2,3,5,8 -> last pos 0,1,2,4,7
    preds = I.score_choices(_StubModel(), _StubTok(), prompts, [10, 11, 12, 13], batch_size=3)
    assert preds == [0, 1, 2, 0, 3]


def test_mmlu_accuracy_aggregation():
    res = {"abstract_algebra": [True, False, True, True], "philosophy": [False, False], "marketing": [True]}
    acc = I.mmlu_accuracy(res)
    assert acc["acc"] == pytest.approx(4 / 7)
    assert acc["category/STEM"] == pytest.approx(3 / 4) and acc["category/humanities"] == 0.0
    assert acc["category/other"] == 1.0 and "category/social sciences" not in acc
    assert acc["subject/philosophy"] == 0.0


def test_letter_tokens_and_masking(tiny_llama, data_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = I.letter_token_ids(tok)
    assert [tok.decode([i]).strip() for i in ids] == ["A", "B", "C", "D"]
    recs = I.read_alpaca(data_dir / "alpaca_data.json")[:2]
    ex = I.tokenize_alpaca(recs, tok, 512)
    for r, e in zip(recs, ex):
        n_prompt = len(tok(I.alpaca_prompt(r))["input_ids"])
        assert e["labels"][:n_prompt] == [-100] * n_prompt
        assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:] and e["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(e["labels"][n_prompt:-1]).strip() == r["output"]


def _hits_by_hand(model, tok, mmlu, shots: int) -> dict[str, list[bool]]:
    """Per subject, whether each test question's highest letter logit is its answer: one
    unpadded forward per question, the first ``shots`` dev rows as examples."""
    letters = [tok(" " + c, add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for subject, split in mmlu.items():
            hits[subject] = []
            for row in split["test"]:
                prompt = I.mmlu_prompt(subject, row, split["dev"][:shots])
                logits = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
                hits[subject].append("ABCD"[int(logits[letters].argmax())] == row["answer"])
    return hits


def _mean(hits) -> float:
    return sum(hits) / len(hits)


def test_mmlu_eval_matches_manual_scoring(tiny_llama, data_dir):
    """Batched, right-padded scoring == one unpadded forward per question, by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    mmlu = I.load_mmlu(data_dir / "mmlu")
    with torch.no_grad():
        acc = I.evaluate_mmlu(model, tok, mmlu, shots=2, batch_size=3)
    manual = _hits_by_hand(model, tok, mmlu, shots=2)
    for subject, hits in manual.items():
        assert acc[f"subject/{subject}"] == pytest.approx(_mean(hits))
    assert acc["acc"] == pytest.approx(sum(map(sum, manual.values())) / 12)


def _check_metrics_by_hand(result: dict, model, tok, data_dir: Path) -> None:
    """A run's MMLU metrics and table columns, recomputed by hand from the model it saved."""
    mmlu = I.load_mmlu(data_dir / "mmlu")
    m, cols = result["metrics"], result["columns"]
    for k in (5, 0):
        hits = _hits_by_hand(model, tok, mmlu, shots=k)
        for subject, h in hits.items():
            assert m[f"{k}shot/subject/{subject}"] == pytest.approx(_mean(h)), (k, subject)
            category = SUBJECTS[subject]  # one subject per category in the fixture
            assert m[f"{k}shot/category/{category}"] == pytest.approx(_mean(h))
            assert cols[f"{category[0].upper() + category[1:]} ({k}-shot)"] == pytest.approx(_mean(h))
        every = [x for h in hits.values() for x in h]
        assert m[f"{k}shot/acc"] == pytest.approx(_mean(every)) and len(every) == 12
        assert cols[f"Avg ({k}-shot)"] == pytest.approx(_mean(every))


def test_instruct_end_to_end(tmp_path, tiny_llama, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asymlora.formats.native import load_adapter

    out = tmp_path / "runs"
    rc = main(["run", "alpaca-mmlu-llama2-7b", "--model", str(tiny_llama), "--data", str(data_dir),
               "--out", str(out), "--strategies", "b-only", "--rank", "4", "--max-steps", "2", "--batch-size", "4",
               "--dtype", "float32", "--mixed-precision", "no", "--set", "train.grad_accum=1",
               "--no-progress"])
    assert rc == 0
    run = out / "mmlu" / "b-only-r4" / "seed0"
    r = json.loads((run / "result.json").read_text())
    assert r["steps"] == 2 and r["alpha"] == 8.0
    assert list(r["columns"])[:5] == ["STEM (5-shot)", "Humanities (5-shot)", "Other (5-shot)", "Avg (5-shot)",
                                      "STEM (0-shot)"]
    assert r["info"]["n_subjects"] == 3 and r["info"]["n_test"] == 12
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "adapter").eval()
    _check_metrics_by_hand(r, model, AutoTokenizer.from_pretrained(tiny_llama), data_dir)


def test_instruct_on_a_quantized_base(tmp_path, tiny_llama, data_dir):
    """The recipe field ``quantize`` (here set with --set): the base's linear layers are nf4, the
    run trains and evaluates, and the saved adapter loads back onto an nf4 base, where it scores
    what the run recorded."""
    require("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asymlora.core import quant
    from asymlora.core.inject import lora_layers
    from asymlora.formats.native import load_adapter

    out = tmp_path / "runs"
    rc = main(["run", "alpaca-mmlu-llama2-7b", "--model", str(tiny_llama), "--data", str(data_dir),
               "--out", str(out), "--strategies", "b-only", "--rank", "4", "--max-steps", "2", "--batch-size", "4",
               "--dtype", "float32", "--mixed-precision", "no", "--set", "train.grad_accum=1",
               "--set", "quantize=nf4", "--no-progress"])
    assert rc == 0
    run = out / "mmlu" / "b-only-r4" / "seed0"
    r = json.loads((run / "result.json").read_text())
    assert r["quantize"] == "nf4" and r["steps"] == 2
    base = quant.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama), "nf4")
    model = load_adapter(base, run / "adapter").eval()
    assert set(quant.quantized_layers(model).values()) == {"nf4"} and len(lora_layers(model)) == 4
    _check_metrics_by_hand(r, model, AutoTokenizer.from_pretrained(tiny_llama), data_dir)


def test_missing_mmlu(tmp_path, tiny_llama, capsys):
    (tmp_path / "alpaca_data.json").write_text("[]")
    rc = main(["run", "alpaca-mmlu-llama2-7b", "--model", str(tiny_llama), "--data", str(tmp_path)])
    assert rc == 2 and "MMLU" in capsys.readouterr().err
