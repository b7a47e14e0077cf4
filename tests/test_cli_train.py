"""``asymlora train`` and ``asymlora bench`` end to end, on a tiny local BERT folder and CSV.

What the files say is checked against independent truth: the saved adapter, put on a fresh
base model and scored with a plain per-example loop, gives the test accuracy in metrics.json;
a resumed run ends with the metrics and adapter of the uninterrupted one; parameter counts are
the arithmetic of the shapes.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

from asymlora.cli.main import main

WORDS = {"cat": "cat cats kitten meow purr whiskers", "dog": "dog dogs puppy bark woof fetch",
         "fish": "fish swim fins water gills tank"}
FILLER = "the a is and very small big".split()
LABELS = sorted(WORDS)
HIDDEN, LAYERS, R = 32, 2, 4  # --quick uses rank 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny BERT classifier folder (config, weights, tokenizer) and a 3-class CSV of 90 rows
    whose class is named by its keywords."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = tmp_path_factory.mktemp("train_cli")
    words = sorted({w for v in WORDS.values() for w in v.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + words
    model_dir = root / "tiny-bert"
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=48,
                     vocab_size=len(vocab), max_position_embeddings=64, num_labels=len(LABELS))
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(90):
        label = LABELS[i % 3]
        keys, fill = WORDS[label].split(), FILLER
        n = 2 + i % 7  # lengths 2..8 words: batches need padding
        words = [keys[int(torch.randint(len(keys), (1,), generator=g))] if j % 2 == 0 else
                 fill[int(torch.randint(len(fill), (1,), generator=g))] for j in range(n)]
        rows.append({"text": " ".join(words), "label": label})
    data = root / "animals.csv"
    with open(data, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return str(model_dir), str(data)


def train(assets, out, *extra):
    model_dir, data = assets
    # fp32 (no bf16 autocast on CPUs that have it) so the plain fp32 loop below is an exact check
    return main(["train", "--model", model_dir, "--data", data, "--quick", "--max-steps", "6", "--eval-every", "2",
                 "--checkpoint-every", "2", "--mixed-precision", "no", "--threads", "1", "--no-progress",
                 "-o", str(out), *extra])


def plain_loop_accuracy(model_dir, data, adapter_dir=None) -> float:
    """Test accuracy of the saved adapter on a fresh base model: one example at a time, no padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from asymlora.compare.data import load_text_dataset, subsample_stratified
    from asymlora.formats.native import load_adapter
    from asymlora.sweep.budget import QUICK

    test = subsample_stratified(load_text_dataset(data, 0).test, QUICK.max_test, 0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    right = 0
    with torch.no_grad():
        for text, label in zip(test.texts, test.labels):
            ids = tok(text, truncation=True, max_length=QUICK.max_length, return_tensors="pt")["input_ids"]
            right += int(model(input_ids=ids).logits.argmax(-1).item() == label)
    return right / len(test)


def test_train_writes_checkpoint_adapter_and_metrics(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(assets, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == metrics["steps"] == 6 and len(metrics["history"]) == 6
    assert [h["step"] for h in metrics["history"] if "val_accuracy" in h] == [2, 4, 6]  # --eval-every 2
    # b-only on query/value: B is d_out × r per layer; the classifier is trained too
    head = HIDDEN * len(LABELS) + len(LABELS)
    assert metrics["adapter_params"] == LAYERS * 2 * HIDDEN * R
    assert metrics["trainable_params"] == LAYERS * 2 * HIDDEN * R + head
    assert metrics["settings"]["threads"] == 1 and metrics["settings"]["label_names"] == LABELS
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["config"]["trainable"] == "B" and adapter["config"]["r"] == R
    # the adapter file reproduces the reported test accuracy on a fresh base model
    assert plain_loop_accuracy(*assets, out / "adapter") == pytest.approx(metrics["test_accuracy"], abs=1e-12)
    printed = capsys.readouterr().out
    assert f"test accuracy {100 * metrics['test_accuracy']:.2f}%" in printed and str(out) in printed


def test_train_resume_after_kill_matches_uninterrupted(assets, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from asymlora.compare import data as tc

    assert train(assets, tmp_path / "ref") == 0
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())

    # Kill the run inside step 5: collate calls are steps 1, 2, val, 3, 4, val, 5 (checkpoints at 2 and 4).
    real_call, calls = tc.PadCollator.__call__, {"n": 0}

    def collate(self, items):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated kill")
        return real_call(self, items)

    monkeypatch.setattr(tc.PadCollator, "__call__", collate)
    assert train(assets, tmp_path / "run") == 130  # the CLI reports an interrupt in one line, exit 128 + SIGINT
    monkeypatch.undo()
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "adapter").exists()

    calls["n"] = 0
    monkeypatch.setattr(tc.PadCollator, "__call__", lambda self, items: (calls.__setitem__("n", calls["n"] + 1),
                                                                          real_call(self, items))[1])
    assert train(assets, tmp_path / "run", "--resume") == 0
    # steps 5 and 6, validation at 6, test, the train sample (one batch each): not a fresh start (that makes 11)
    assert calls["n"] == 5
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test_accuracy", "test_macro_f1", "val_accuracy", "final_train_loss", "steps"):
        assert got[key] == ref[key], key
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in ref["history"]]
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("ref", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_head_only_trains_only_the_classifier(assets, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "head"
    assert train(assets, out, "--strategy", "head-only") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"] == "head-only" and metrics["adapter_params"] == 0
    assert metrics["trainable_params"] == HIDDEN * len(LABELS) + len(LABELS)
    assert set(load_file(str(out / "checkpoint" / "trainable.safetensors"))) == {"classifier.weight", "classifier.bias"}
    assert not (out / "adapter").exists()  # no adapter to save


# ----------------------------------------------------------------------------- bench


def test_bench_quick_writes_results_and_merges(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--only", "checkpoint", "--threads", "1", "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["quick"] is True and first["benchmarks"] == ["checkpoint"]
    for row in first["checkpoint"]:
        # seed-only A: the b-only file holds B only, about half of A and B (plus header bytes)
        assert 0.4 < row["weights_bytes"]["ratio"] < 0.6
    assert (out / "results.md").read_text() in capsys.readouterr().out
    assert main(["bench", "--quick", "--only", "layer_memory", "--threads", "1", "--out", str(out), "--merge"]) == 0
    merged = json.loads((out / "results.json").read_text())
    assert merged["benchmarks"] == ["checkpoint", "layer_memory"]
    assert merged["checkpoint"] == first["checkpoint"] and merged["layer_memory"]
    assert len(merged["runs"]) == 1


def _train_stderr(assets, out, on_terminal: bool) -> str:
    """stderr of a real `asymlora train` process, given a terminal (a pty) or a pipe (a log file, CI)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    model_dir, data = assets
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "asymlora.cli", "train", "--model", model_dir, "--data", data, "--quick",
           "--max-steps", "40", "--mixed-precision", "no", "--threads", "1", "-o", str(out)]
    if not on_terminal:
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=300)  # bytes: "\r" kept as it is
        assert done.returncode == 0, done.stderr
        return done.stderr.decode(errors="replace")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal 80 columns wide
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=300) == 0
    finally:
        os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal(assets, tmp_path):
    # in a log file or CI a bar's carriage returns made lines of thousands of characters: off there
    assert "\r" in _train_stderr(assets, tmp_path / "tty", on_terminal=True)  # the bar is drawn on a terminal
    logged = _train_stderr(assets, tmp_path / "log", on_terminal=False)
    assert "\r" not in logged and all(len(line) < 400 for line in logged.splitlines())
