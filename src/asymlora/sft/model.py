"""Response-only loss without the full-vocabulary logits, and answer generation.

A causal LM's output layer is its largest matrix for a small model (SmolLM2-135M: 49,152 ×
576, a fifth of the forward flops at 50 tokens); in instruction tuning only the few response
tokens carry labels. ``ResponseOnlyLM`` runs the decoder, keeps the hidden states at the
positions that predict a labelled token, and applies the output layer there only:

    loss = −(1/N) Σ_{t : y_{t+1} ≠ −100} log softmax(W_out h_t)[y_{t+1}],   N = #labelled tokens,

which is exactly what ``*ForCausalLM(..., labels=y).loss`` computes (mean over the shifted
labelled tokens), at a fraction of the cost (tested against it).
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from asymlora.sft.data import QAPair, encode_chat, exact_match

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["ResponseOnlyLM", "response_nll", "generate_answers", "exact_match_rate"]


class ResponseOnlyLM(nn.Module):
    """``forward(input_ids, attention_mask, labels)`` → ``.loss`` (mean NLL of the labelled
    tokens) and ``.tokens`` (how many there were). ``lm`` is any ``*ForCausalLM`` with
    ``get_decoder()`` and ``get_output_embeddings()``; it is trained in place."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                reduction: str = "mean") -> SimpleNamespace:
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
        loss = nn.functional.cross_entropy(logits, target[keep], reduction=reduction)
        return SimpleNamespace(loss=loss, tokens=int(keep.sum()))


def response_nll(model: ResponseOnlyLM, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean NLL per labelled token over all of ``batches`` (token-weighted, so it does not
    depend on how the data was batched)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            out = model(**batch, reduction="sum")
            total += float(out.loss)
            count += out.tokens
    model.train(was)
    return total / max(count, 1)


def generate_answers(lm: Any, tokenizer: Any, pairs: Sequence[QAPair], *, max_length: int,
                     max_new_tokens: int = 24, batch_size: int = 32) -> list[str]:
    """Greedy answers to each question (prompt in the chat template, left-padded batches,
    stop at the end-of-turn token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [encode_chat(tokenizer, p.question, None, max_length)[0] for p in pairs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    was = lm.training
    lm.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]):] = torch.as_tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            gen = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
    lm.train(was)
    return out


def exact_match_rate(predictions: Sequence[str], pairs: Sequence[QAPair]) -> float:
    """Fraction of predictions that match an accepted answer (``asymlora.sft.data.exact_match``)."""
    hits = [exact_match(p, q.answers) for p, q in zip(predictions, pairs, strict=True)]
    return sum(hits) / max(len(hits), 1)
