"""asymlora.lmeval: log-likelihoods against closed forms and a naive reference, lm-eval's
tokenization rules, acc/acc_norm and the standard errors (issue 13, item 2).

The closed-form model is a bigram table: the logits after token t are row t of a fixed matrix W,
so log p(x | c) = Σ_t log softmax(W[prev_t])[x_t] by hand.
"""
from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from asymlora.lmeval import metrics
from asymlora.lmeval.scoring import (
    _group_inputs,
    _units,
    encode_pair,
    loglikelihoods,
    max_length,
)
from conftest import require, tiny_gpt2, tiny_llama


class CharTokenizer:
    """Characters -> ids 3.. (mod 60); BOS 1 prepended by default, as Llama's tokenizer does."""

    bos_token_id, eos_token_id, model_max_length = 1, 2, 10**30

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [3 + ord(ch) % 60 for ch in text]

    def decode(self, token: int) -> str:
        return "<s>" if token == 1 else chr(token)


class Bigram(nn.Module):
    """logits[t] = W[input[t]]: a one-hot 'hidden state' through a linear output layer W^T."""

    def __init__(self, vocab: int = 64, seed: int = 0, positions: int = 512):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(vocab, vocab, generator=g) * 2
        self.embed = nn.Embedding(vocab, vocab)
        self.embed.weight.data = torch.eye(vocab)
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        self.lm_head.weight.data = self.W.T.clone()
        self.config = SimpleNamespace(max_position_embeddings=positions)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids, cache=None, use_cache=False, **kwargs):
        """A bigram needs no cache; one is returned (and taken) so the shared-prefix path runs."""
        return SimpleNamespace(logits=self.lm_head(self.embed(input_ids)), cache=NoCache())


class NoCache:
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.indices = indices


def by_hand(W: torch.Tensor, tokens: list[int], n_cont: int) -> float:
    """Σ over the last n_cont tokens of log softmax(W[previous token])[token]."""
    lp = torch.log_softmax(W.double(), dim=-1)
    return float(sum(lp[tokens[i - 1], tokens[i]] for i in range(len(tokens) - n_cont, len(tokens))))


REQUESTS = [("Question: sky?\nAnswer:", " blue"), ("Question: sky?\nAnswer:", " green sea"),
            ("Question: sky?\nAnswer:", " A"), ("Question: sky?\nAnswer:", " B"), ("ends with a space ", "x"),
            ("Question: ground?\nAnswer:", " A")]


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_loglikelihood_equals_the_closed_form(share_prefix, batch_size):
    model, tok = Bigram(), CharTokenizer()
    got = loglikelihoods(model, tok, REQUESTS, batch_size=batch_size, share_prefix=share_prefix)
    for (ctx, cont), value in zip(REQUESTS, got):
        c, x = encode_pair(tok, ctx, cont)
        assert value == pytest.approx(by_hand(model.W, c + x, len(x)), abs=1e-4)


def test_encode_pair_follows_lm_eval():
    tok = CharTokenizer()
    # trailing whitespace of the context moves to the continuation; BOS only once, at the start
    assert encode_pair(tok, "ab ", "c") == ([1, 3 + ord("a") % 60, 3 + ord("b") % 60],
                                            [3 + ord(" ") % 60, 3 + ord("c") % 60])
    # a context that already starts with the BOS text gets no second BOS
    assert encode_pair(tok, "<s>a", "b")[0][:2] == [3 + ord("<") % 60, 3 + ord("s") % 60]
    # an empty context is conditioned on BOS alone
    assert encode_pair(tok, "", "xy") == ([1], [3 + ord("x") % 60, 3 + ord("y") % 60])


def test_inputs_are_deduplicated_and_truncated_from_the_left():
    tok = CharTokenizer()
    encoded = [encode_pair(tok, "Q?", " " + c) for c in "ABCD"]
    groups = _group_inputs(encoded, limit=512)
    assert len(groups) == 1 and len(groups[0].requests) == 4  # one forward pass for the four letters
    model = Bigram(positions=8)
    assert max_length(model, tok) == 8
    long = [("0123456789abcdef", " x")]
    (value,) = loglikelihoods(model, tok, long)
    c, x = encode_pair(tok, *long[0])
    assert value == pytest.approx(by_hand(model.W, (c + x)[-9:], len(x)), abs=1e-4)  # bigram: only the tail matters


def test_shared_prefix_clusters_each_question_and_caps_at_the_needed_positions():
    tok = CharTokenizer()
    encoded = [encode_pair(tok, q, " " + c) for q in ("Question one?", "Other question?") for c in ("yes", "no way")]
    units = _units(_group_inputs(encoded, 512), batch_size=32, share=True)
    assert sorted(len(u.inputs) for u in units) == [2, 2]
    context_of = {tuple(c + x[:-1]): c for c, x in encoded}
    for u in units:  # the whole context but its last token, whose output predicts the continuation
        (context,) = {tuple(context_of[tuple(g.tokens)]) for g in u.inputs}
        assert u.prefix == len(context) - 1
    assert len(_units(_group_inputs(encoded, 512), batch_size=1, share=True)) == 4  # cut to the batch size
    assert all(u.prefix == 0 for u in _units(_group_inputs(encoded, 512), batch_size=32, share=False))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_real_architectures_match_a_naive_full_forward(build):
    """Batched, deduplicated, prefix-shared, output layer applied only where needed == one
    plain forward pass per request with the full logits."""
    model, tok = build(), CharTokenizer()  # GPT-2 here has 32 positions: every input fits
    reqs = [(c, x) for c in ("Q: sky?\nA:", "Q: the ground?\nA:", "ends in space ") for x in (" blue", " green sea",
                                                                                             " A", " B")]

    def naive(ctx: str, cont: str) -> float:
        c, x = encode_pair(tok, ctx, cont)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([c + x])).logits[0].double(), -1)
        return float(sum(lp[len(c) - 1 + t, x[t]] for t in range(len(x))))

    want = [naive(*r) for r in reqs]
    for share in (True, False):
        got = loglikelihoods(model, tok, reqs, batch_size=3, share_prefix=share)
        assert got == pytest.approx(want, abs=1e-4)
    assert not model.training


def test_bf16_autocast_rounds_the_logits_to_bfloat16():
    """Under bf16 autocast the bigram's output layer multiplies a one-hot row by W in bfloat16:
    its logits are W's rows rounded to bfloat16, exactly. So the scores equal the float64 scores
    of the same bigram with W rounded to bfloat16 beforehand, and differ from float32's (a
    scorer that ignored bf16 fails the first check, one that rounded elsewhere the second)."""
    model, tok = Bigram(), CharTokenizer()
    rounded = Bigram()
    rounded.lm_head.weight.data = model.lm_head.weight.data.bfloat16().float()

    def naive(m, ctx: str, cont: str) -> float:
        c, x = encode_pair(tok, ctx, cont)
        with torch.no_grad():
            lp = torch.log_softmax(m(torch.tensor([c + x])).logits[0].double(), -1)
        return float(sum(lp[len(c) - 1 + t, x[t]] for t in range(len(x))))

    want_bf16 = [naive(rounded, *r) for r in REQUESTS]
    want_fp32 = [naive(model, *r) for r in REQUESTS]
    assert max(abs(a - b) for a, b in zip(want_bf16, want_fp32)) > 1e-2  # the rounding shows at this scale
    assert loglikelihoods(model, tok, REQUESTS) == pytest.approx(want_fp32, abs=1e-4)
    for share in (True, False):
        got = loglikelihoods(model, tok, REQUESTS, bf16=True, batch_size=3, share_prefix=share)
        assert got == pytest.approx(want_bf16, abs=1e-4)
    # a real model in bf16 stays near its float32 scores (8 mantissa bits: ~1e-3 per token here)
    llama, reqs = tiny_llama(), [(c[:10], x) for c, x in REQUESTS]
    exact = loglikelihoods(llama, tok, reqs)
    got = loglikelihoods(llama, tok, reqs, bf16=True)
    assert got == pytest.approx(exact, abs=2e-2) and got != exact


# --------------------------------------------------------------------------- metrics
def test_acc_and_acc_norm_take_the_argmax_per_character():
    # raw: choice 1 wins; per character: -3/1 > -4/2 ? no: -3 < -2 -> choice 0 ("long") wins
    lls, choices = [-4.0, -3.0], ["ab", "c"]
    assert metrics.predictions(lls, choices) == (1, 0)
    # characters, not UTF-8 bytes: "éé" is 2 characters (4 bytes)
    assert metrics.predictions([-4.0, -2.1], ["éé", "x"]) == (1, 0)
    assert metrics.predictions([-1.0, -1.0], ["a", "b"]) == (0, 0)  # ties: the first choice


def test_mean_stderr_is_the_sample_std_over_sqrt_n():
    xs = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert metrics.mean_stderr(xs) == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)))
    assert math.isnan(metrics.mean_stderr([1.0]))


def test_pooled_stderr_closed_form():
    groups = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]]
    errs = [metrics.mean_stderr(g) for g in groups]
    sizes = [len(g) for g in groups]
    within = sum(sum((x - np.mean(g)) ** 2 for x in g) for g in groups)  # Σ_j (n_j-1)·s_j²
    want = math.sqrt(within / (sum(sizes) - len(groups)) / sum(sizes))
    assert metrics.pooled_stderr(errs, sizes) == pytest.approx(want)


def test_stderr_formulas_are_lm_evals():
    """The same numbers as lm-eval's own functions (its mean_stderr; its pooled_sample_stderr,
    which a size-weighted group applies to its leaf tasks: for MMLU, the subjects)."""
    lm_metrics = require("lm_eval.api.metrics")
    rng = np.random.default_rng(0)
    groups = [list(rng.integers(0, 2, size=n).astype(float)) for n in (2, 5, 9, 30)]
    errs = [metrics.mean_stderr(g) for g in groups]
    assert errs == pytest.approx([lm_metrics.mean_stderr(g) for g in groups])
    assert metrics.pooled_stderr(errs, [len(g) for g in groups]) == pytest.approx(
        float(lm_metrics.pooled_sample_stderr(errs, [len(g) for g in groups])))
