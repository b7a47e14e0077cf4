"""A malformed dataset is refused, not guessed (``asymlora.compare.table_checks``): each fault of a
--data file is one line naming the file, the row and what was expected; texts longer than
--max-length are counted (compare) and so are the exchanges sft cuts or drops."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from asymlora.cli.main import main
from asymlora.compare.data import TextSplit, TokenizedDataset, load_text_dataset
from asymlora.errors import UserError


def good_rows(n: int = 12) -> list[tuple[str, str]]:
    return [(f"text number {i}", "pos" if i % 2 else "neg") for i in range(n)]


def write_csv(path, rows, header=("text", "label")) -> str:
    lines = [",".join(header)] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_a_well_formed_csv_loads(tmp_path):
    ds = load_text_dataset(write_csv(tmp_path / "d.csv", good_rows()))
    assert ds.label_names == ["neg", "pos"] and len(ds.train) + len(ds.val) + len(ds.test) == 12


def test_a_file_that_is_not_utf8_is_refused_with_its_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"text,label\nfine,pos\ncaf\xe9 au lait,neg\n")
    with pytest.raises(UserError, match=rf"^--data {p}: line 3 is not UTF-8 \(byte 0xe9\); save the file as UTF-8$"):
        load_text_dataset(str(p))


def test_an_unquoted_comma_that_shifts_the_columns_is_refused(tmp_path):
    rows = good_rows()
    rows[4] = ("hello, world", "pos")  # written unquoted: three fields
    p = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(UserError, match=rf"^--data {p}: row 6 has 3 fields, the header has 2 \(text, label\): a "
                                        "comma inside an unquoted text shifts the columns; quote such fields$"):
        load_text_dataset(p)
    rows[4] = ('"hello, world"', "pos")  # quoted: fine
    assert len(load_text_dataset(write_csv(tmp_path / "q.csv", rows)).label_names) == 2


def test_a_blank_label_is_refused(tmp_path):
    rows = good_rows()
    rows[2] = ("text without a class", " ")
    p = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(UserError, match=rf"^--data {p}: row 4 has a blank label; every row needs a class$"):
        load_text_dataset(p)


@pytest.mark.parametrize("spelling", ["1.0", " 1", "1 "])
def test_labels_that_differ_only_in_spelling_are_refused(tmp_path, spelling):
    rows = [(f"t{i}", "1" if i % 2 else "0") for i in range(12)]
    rows[7] = ("t7", spelling)
    p = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(UserError, match=rf"^--data {p}: labels '1' \(row 3\) and {spelling!r} \(row 9\) differ only "
                                        "in spelling; write each class one way$"):
        load_text_dataset(p)


def test_a_single_class_is_refused(tmp_path):
    p = write_csv(tmp_path / "d.csv", [(f"t{i}", "pos") for i in range(12)])
    with pytest.raises(UserError, match="has 1 label value\\(s\\) \\['pos'\\]: need at least 2 classes"):
        load_text_dataset(p)


def test_a_class_too_small_for_validation_and_test_is_refused(tmp_path):
    rows = good_rows() + [("the only one", "rare"), ("the other", "rare")]
    p = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(UserError, match=rf"^--data {p}: class 'rare' has 2 row\(s\); each class needs at least 3"):
        load_text_dataset(p)


def test_jsonl_rows_are_checked_too(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": t, "label": lab} for t, lab in good_rows()]
    rows[5]["label"] = ""
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^--data {p}: row 6 has a blank label"):
        load_text_dataset(str(p))


def test_the_cli_reports_a_malformed_file_in_one_line(tmp_path, capsys):
    rows = good_rows()
    rows[4] = ("hello, world", "pos")
    p = write_csv(tmp_path / "d.csv", rows)
    assert main(["compare", "--quick", "--data", p, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"asymlora compare: error: --data {p}: row 6 has 3 fields"), err
    assert not (tmp_path / "out").exists()


class WordTokenizer:
    """One token per word, as a transformers tokenizer is called."""

    def __call__(self, texts, truncation=False, max_length=None):
        ids = [[len(w) for w in t.split()] for t in texts]
        return {"input_ids": [x[:max_length] if truncation else x for x in ids]}


def test_texts_longer_than_max_length_are_counted():
    split = TextSplit(["one two three", " ".join(["w"] * 8), " ".join(["w"] * 9), " ".join(["w"] * 30)], [0, 1, 0, 1])
    ds = TokenizedDataset(split, WordTokenizer(), max_length=8)
    assert ds.truncated == 2 and [len(x) for x in ds.input_ids] == [3, 8, 8, 8]


def test_sft_counts_dropped_questions_and_cut_answers():
    from asymlora.sft.data import ChatQADataset, QAPair

    class Chat:
        """A chat tokenizer of words: the prompt "Q: <question> A:", then the answer and "<eos>"."""

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = f"Q: {messages[0]['content']} A:"
            return text + (f" {messages[1]['content']} <eos>" if len(messages) > 1 else "")

        def __call__(self, text, add_special_tokens=False):
            class Enc:
                input_ids = [hash(w) % 1000 for w in text.split()]
            return Enc()

    pairs = [QAPair("short one", ("yes",), "s"),                       # 4 prompt + 2 tokens: whole
             QAPair("a b c d e f", ("a long answer here",), "s"),      # 8 prompt + 5: the answer cut at 12
             QAPair(" ".join(["q"] * 20), ("no",), "s")]               # the prompt alone passes 12: dropped
    ds = ChatQADataset(pairs, Chat(), max_length=12)
    assert len(ds) == 2 and ds.dropped == 1 and ds.answers_cut == 1
