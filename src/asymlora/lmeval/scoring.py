"""Log-likelihood of a continuation given a context under a causal LM, computed the way
lm-evaluation-harness 0.4.13's ``HFLM.loglikelihood`` computes it, but cheaper on a CPU.

For a request (context c, continuation x) the score is

    log p(x | c) = Σ_{t=1..|x|} log softmax(f(c, x_<t))[x_t]

over the continuation's tokens x_1..x_|x|, where f gives the model's next-token logits.

Tokenization follows lm-eval exactly (``_encode_pair``): whitespace at the end of the context is
moved to the front of the continuation; ``whole = encode(c + x)``, ``ctx = encode(c)`` and the
continuation tokens are ``whole[len(ctx):]``; ``encode`` is the tokenizer's own ``encode`` with
its default special tokens (none added when the string already starts with the BOS text). The
model sees ``(ctx + cont)[-(L+1):][:-1]`` (left-truncated to the model's maximum length L),
right-padded, without an attention mask (causal attention never looks at the padding).

What is cheaper than lm-eval: (1) requests whose model input is identical (every choice of an
MMLU question: one-token continuations " A".." D" after the same prompt) run once; (2) leading
tokens shared by several inputs (a question's context before each of its choices; the
description and k solved examples before every MMLU question of a subject) run once, and their
keys/values are reused (``share_prefix``); (3) the output layer is applied only at the
continuation positions — a pre-hook on ``model.get_output_embeddings()`` gathers those hidden
states, so the (batch × length × vocabulary) logits tensor is never built (SmolLM2's vocabulary
is 49,152); (4) batches are packed longest first so they pad little. (2) changes the order of
floating-point sums, not the math: scores agree with the plain forward pass to ~1e-5.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asymlora.errors import UserError

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer gives one
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


def max_length(model: Any, tokenizer: Any) -> int:
    """The model's context length, looked up as lm-eval does: the (text) config's
    ``n_positions``, ``max_position_embeddings`` or ``n_ctx``, else the tokenizer's
    ``model_max_length``, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != _TOKENIZER_INFINITY else DEFAULT_MAX_LENGTH


def _prefix_token_id(tokenizer: Any) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _encode(tokenizer: Any, text: str) -> list[int]:
    bos = tokenizer.decode(_prefix_token_id(tokenizer)) if _prefix_token_id(tokenizer) is not None else None
    if bos and text.startswith(bos):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's HFLM makes them (module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:  # lm-eval: condition on the BOS (else EOS) token alone
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


@dataclass
class _Input:
    """One distinct model input and every request scored on it."""

    tokens: list[int]
    requests: list[tuple[int, list[int]]]  # (request index, continuation tokens)

    @property
    def needed(self) -> int:  # how many final positions' outputs its requests read
        return max(len(cont) for _, cont in self.requests)

    @property
    def free(self) -> int:  # how many leading tokens a shared prefix may cover
        return len(self.tokens) - self.needed


@dataclass
class _Unit:
    """Inputs that share their first ``prefix`` tokens (run once, its keys/values reused)."""

    prefix: int
    inputs: list[_Input]


def _group_inputs(encoded: Sequence[tuple[list[int], list[int]]], limit: int) -> list[_Input]:
    groups: dict[tuple[int, ...], _Input] = {}
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise UserError(f"request {i}: the continuation is empty after tokenization")
        if len(cont) > limit:
            raise UserError(f"request {i}: continuation of {len(cont)} tokens exceeds the model's length {limit}")
        tokens = (ctx + cont)[-(limit + 1):][:-1]
        groups.setdefault(tuple(tokens), _Input(tokens, [])).requests.append((i, cont))
    return list(groups.values())


def _common(a: Sequence[int], b: Sequence[int], upto: int) -> int:
    n = 0
    while n < upto and a[n] == b[n]:
        n += 1
    return n


def _units(inputs: list[_Input], batch_size: int, share: bool) -> list[_Unit]:
    """Cluster inputs by shared leading tokens (all choices of one question; all MMLU questions
    of one subject under k shots). Inputs are visited in token order; one joins the open
    cluster when the tokens it would share, l, exceed what the members lose as the prefix
    shrinks from P to l: l > (P - l)·members. Clusters are cut to ``batch_size`` inputs."""
    if not share:
        return [_Unit(0, [g]) for g in inputs]
    clusters: list[_Unit] = []
    for g in sorted(inputs, key=lambda g: g.tokens):
        if clusters:
            open_ = clusters[-1]
            first = open_.inputs[0].tokens
            shared = _common(first, g.tokens, min(open_.prefix, g.free))
            if shared > 0 and shared > (open_.prefix - shared) * len(open_.inputs):
                open_.prefix = shared
                open_.inputs.append(g)
                continue
        clusters.append(_Unit(g.free, [g]))
    return [_Unit(c.prefix, c.inputs[i:i + batch_size]) for c in clusters
            for i in range(0, len(c.inputs), batch_size)]


def _batches(units: list[_Unit], batch_size: int) -> Iterator[list[_Unit]]:
    """Units packed, longest first, into batches of at most ``batch_size`` inputs."""
    units = sorted(units, key=lambda u: -max(len(g.tokens) for g in u.inputs))
    batch: list[_Unit] = []
    for unit in units:
        if batch and sum(len(u.inputs) for u in batch) + len(unit.inputs) > batch_size:
            yield batch
            batch = []
        batch.append(unit)
    if batch:
        yield batch


@contextlib.contextmanager
def _only_at(model: Any, positions: torch.Tensor) -> Iterator[None]:
    """While active, the output layer sees only the hidden states at ``positions`` (batch × K)."""
    head = model.get_output_embeddings()

    def gather(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        index = positions.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1])
        return (hidden.gather(1, index), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _logits_at(model: Any, positions: torch.Tensor, **inputs: Any) -> Any:
    """The model's output with logits only at ``positions`` (batch × K) of each row."""
    if model.get_output_embeddings() is not None:
        with _only_at(model, positions):
            out = model(**inputs)
        if out.logits.shape[:2] != positions.shape:
            raise RuntimeError(f"{type(model).__name__}: expected logits at {positions.shape[1]} positions per row, "
                               f"got shape {tuple(out.logits.shape)}; its output layer is not applied to the hidden "
                               "states alone (pass share_prefix=False or use a standard causal LM)")
        return out
    out = model(**inputs)  # no separate output layer to hook: full logits, then pick the positions
    full = out.logits
    out.logits = full.gather(1, positions.to(full.device)[..., None].expand(-1, -1, full.shape[-1]))
    return out


def _cache_argument(model: Any) -> str:
    """The forward argument that takes a key/value cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (before)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _padded(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, :len(row)] = torch.tensor(row, dtype=torch.long)
    return ids


def _batch_logprobs(model: Any, batch: list[_Unit], bf16: bool) -> list[torch.Tensor]:
    """log-softmax outputs at the last ``needed`` positions of every input of the batch, in
    order (one K × vocabulary tensor per input; its last ``needed`` rows are the real ones).

    With shared prefixes: the prefixes run first (right-padded), their keys/values are copied
    to each input of their unit, and the rest of each input runs on top with an attention mask
    that hides the prefix padding and position ids that continue each prefix."""
    device = next(model.parameters()).device
    rows = [(u, g) for u in batch for g in u.inputs]
    k = max(g.needed for _, g in rows)
    width_p = max(u.prefix for u in batch)
    rests = [g.tokens[u.prefix:] for u, g in rows]
    lengths = torch.tensor([len(r) for r in rests])
    positions = (lengths[:, None] - k + torch.arange(k)[None, :]).clamp(min=0)
    ids = _padded(rests, int(lengths.max())).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        if width_p == 0:
            logits = _logits_at(model, positions, input_ids=ids, use_cache=False).logits
        else:
            prefixes = _padded([g.tokens[:u.prefix] for u in batch for g in u.inputs[:1]], width_p).to(device)
            out = _logits_at(model, torch.zeros(len(batch), 1, dtype=torch.long), input_ids=prefixes, use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            if cache is None:  # a model without a key/value cache: run whole inputs instead
                return _batch_logprobs(model, [_Unit(0, u.inputs) for u in batch], bf16)
            owner = torch.tensor([i for i, u in enumerate(batch) for _ in u.inputs], device=device)
            cache.batch_select_indices(owner)
            starts = torch.tensor([u.prefix for u, _ in rows])
            mask = torch.zeros(len(rows), width_p + ids.shape[1], dtype=torch.long)
            mask[:, :width_p] = (torch.arange(width_p)[None, :] < starts[:, None]).long()
            mask[:, width_p:] = 1
            pos = starts[:, None] + torch.arange(ids.shape[1])[None, :]
            logits = _logits_at(model, positions, input_ids=ids, attention_mask=mask.to(device),
                                position_ids=pos.to(device), use_cache=True, **{_cache_argument(model): cache}).logits
    return list(torch.log_softmax(logits.float(), dim=-1).cpu())


def loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], *, batch_size: int = 32,
                   bf16: bool = False, share_prefix: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> list[float]:
    """log p(continuation | context) for each (context, continuation) pair (module docstring).

    ``batch_size``: distinct model inputs per forward pass. ``bf16``: run the forward pass under
    bfloat16 autocast (faster on CPUs with bf16 support; scores change in the 3rd decimal).
    ``share_prefix``: run leading tokens that several inputs share once (module docstring).
    ``progress(done, total)`` is called after each batch with counts of distinct inputs."""
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    inputs = _group_inputs(encoded, max_length(model, tokenizer))
    batches = list(_batches(_units(inputs, batch_size, share_prefix), batch_size))
    out = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    done = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                inputs_in_order = [g for u in batch for g in u.inputs]
                for row, g in zip(_batch_logprobs(model, batch, bf16), inputs_in_order):
                    for index, cont in g.requests:
                        picked = row[-len(cont):].gather(1, torch.tensor(cont)[:, None])
                        out[index] = float(picked.sum())
                done += len(inputs_in_order)
                if progress is not None:
                    progress(done, len(inputs))
    finally:
        model.train(was_training)
    return out
