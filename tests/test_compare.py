"""`asymlora compare`: the protocol's pieces against hand computations, and the main job end
to end on the real bundled model (--quick, marked slow)."""
from __future__ import annotations

import copy
import csv
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch

from asymlora.cli.main import main
from asymlora.compare import (
    CompareConfig,
    format_table,
    parse_strategy,
    select_lr,
    summarize,
)
from asymlora.compare.config import StrategySpec
from asymlora.compare.report import paired_verdicts
from asymlora.errors import UserError
from asymlora.sweep.stats import curve_slope, mean_std, paired_difference, t_quantile, verdict
from conftest import require

# a missing asset fails the run under CI=true and skips (with a summary line) locally: tests/conftest.py
needs_real = pytest.mark.needs_assets("minilm", "fortunes")

# all-MiniLM-L6-v2: 6 layers, hidden 384; adapters on query and value (384 -> 384).
LAYERS, D = 6 * 2, 384


def head_params(k: int) -> int:
    return D * k + k


# ----------------------------------------------------------------------------- configuration


def test_parse_strategy():
    s = parse_strategy("b-only@2r", 8)
    assert (s.label, s.preset, s.rank, s.base_rank) == ("b-only r=16 (@2r)", "b-only", 16, 8)
    assert (parse_strategy("lora", 4).rank, parse_strategy("lora", 4).label) == (4, "lora r=4")
    h = parse_strategy("head-only", 4)
    assert h.preset is None and h.rank == 0 and not h.is_adapter
    for bad in ("loraa", "b-only@2", "head-only@2r", "B-ONLY"):
        with pytest.raises(UserError, match="strategy"):
            parse_strategy(bad, 8)
    cfg = CompareConfig(strategies=["lora", "head-only", "b-only@2r"], ranks=[4, 8])
    labels = [s.label for s in cfg.runs()]
    assert labels == ["lora r=4", "head-only", "b-only r=8 (@2r)", "lora r=8", "b-only r=16 (@2r)"]


def test_config_reports_every_bad_setting_at_once():
    cfg = CompareConfig(strategies=["qlora"], seeds=[1, 1], lrs=[1e-3, -1.0], patience=0, max_steps=0)
    problems = cfg.problems()
    joined = " | ".join(problems)
    for needle in ("'qlora'", "--seeds [1, 1]", "--lrs -1.0", "--patience 0", "--max-steps 0"):
        assert needle in joined
    with pytest.raises(UserError):
        cfg.validate()
    assert CompareConfig().problems() == []
    assert CompareConfig(lr=3e-3).lr_grid() == [3e-3] and not CompareConfig(lr=3e-3).selects_lr


def test_bad_cli_input_fails_before_work(tmp_path, capsys):
    for argv, needle in ((["--strategies", "qlora"], "strategy 'qlora'"), (["--seeds", "1,1"], "seeds"),
                         (["--lrs", "0.01,0"], "--lrs 0"),
                         (["--patience", "0", "--min-steps", "-1"], "--min-steps -1")):
        assert main(["compare", *argv, "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- statistics


def test_t_quantile_matches_tables():
    # two-sided 95 % critical values from any t table
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)
    scipy_stats = require("scipy.stats")
    for df in (1, 2, 5, 17, 120):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-7)


def test_paired_difference_by_hand():
    ref = {0: 0.80, 1: 0.82, 2: 0.78}
    new = {0: 0.83, 1: 0.83, 2: 0.80}
    pd = paired_difference("b-only r=8", "lora r=8", "test_accuracy", new, ref, margin=0.01)
    d = np.array([0.03, 0.01, 0.02])  # per-seed differences
    mean, sd = d.mean(), d.std(ddof=1)  # 0.02, 0.01
    half = 4.302652729749464 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert pd.differences == pytest.approx(d.tolist())
    assert (pd.mean, pd.std, pd.lo, pd.hi) == pytest.approx((mean, sd, mean - half, mean + half))
    assert pd.lo < 0 < pd.hi and pd.verdict == "no worse"  # [-0.48, +4.48] points
    assert pd.line() == "b-only r=8 vs lora r=8: +2.0 pts [-0.5, +4.5] over 3 seeds → no worse"
    # only the seeds both have are paired
    assert paired_difference("a", "b", "m", {0: 1.0, 5: 0.0}, {0: 0.5, 1: 0.0}).seeds == [0]


@pytest.mark.parametrize("lo,hi,expected", [(0.001, 0.02, "better"), (-0.02, -0.001, "worse"),
                                            (-0.005, 0.008, "equivalent"), (-0.005, 0.05, "no worse"),
                                            (-0.05, 0.005, "no better"), (-0.05, 0.05, "inconclusive"),
                                            (float("nan"), float("nan"), "one seed")])
def test_verdict_reads_the_interval(lo, hi, expected):
    assert verdict(lo, hi, margin=0.01) == expected


def test_curve_slope_over_the_last_quarter():
    steps = list(range(0, 401, 20))
    rising = [0.5 + 0.001 * s for s in steps]  # +0.1 per 100 steps everywhere
    assert curve_slope(steps, rising) == pytest.approx(0.1)
    plateau = [min(0.9, 0.5 + 0.004 * s) for s in steps]  # flat from step 100
    assert curve_slope(steps, plateau) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(curve_slope([10], [0.5]))


def test_select_lr_takes_the_validation_argmax_and_the_smaller_rate_on_ties():
    pilots = {1e-3: {"val_accuracy": 0.80}, 3e-3: {"val_accuracy": 0.86}, 1e-2: {"val_accuracy": 0.84}}
    assert select_lr(pilots) == 3e-3
    pilots[1e-2]["val_accuracy"] = 0.86
    assert select_lr(pilots) == 3e-3
    pilots[1e-3]["val_accuracy"] = 0.86
    assert select_lr(pilots) == 1e-3


def fake_runs():
    acc = {"lora r=8": [0.80, 0.82, 0.78], "b-only r=8": [0.83, 0.83, 0.80], "b-only r=16 (@2r)": [0.79, 0.80, 0.77]}
    runs = []
    for label, vals in acc.items():
        preset = label.split()[0]
        for seed, a in enumerate(vals):
            runs.append({"strategy": label, "preset": preset, "rank": 8, "seed": seed, "lr": 1e-3,
                         "trainable_params": 10, "adapter_params": 8, "test_accuracy": a, "test_macro_f1": a / 2,
                         "val_accuracy": a, "val_macro_f1": a, "best_step": 100 + seed, "steps": 180,
                         "stopped_early": seed != 2, "val_slope_last_quarter": 0.0, "wall_time_s": 1.0,
                         "peak_memory_bytes": 2**20, "saved_activation_bytes": 2**21, "final_train_loss": 0.5})
    specs = [StrategySpec("lora r=8", "lora", 8, 8), StrategySpec("b-only r=8", "b-only", 8, 8),
             StrategySpec("b-only r=16 (@2r)", "b-only", 16, 8), StrategySpec("head-only", None, 0, 8)]
    return runs, specs


def test_mean_std_by_hand():
    # n = 2: mean (1 + 4)/2 = 2.5; deviations ±1.5, sample variance (2.25 + 2.25)/(2 - 1) = 4.5
    assert mean_std([1.0, 4.0]) == (2.5, pytest.approx(math.sqrt(4.5), rel=1e-15))
    # n = 1: the sample std is 0/0, undefined: NaN, not 0
    m, s = mean_std([3.0])
    assert m == 3.0 and math.isnan(s)
    assert all(math.isnan(x) for x in mean_std([]))


def test_summary_table_and_paired_verdicts():
    runs, specs = fake_runs()
    rows = summarize(runs, [s.label for s in specs])
    assert [r["strategy"] for r in rows] == ["lora r=8", "b-only r=8", "b-only r=16 (@2r)"]
    assert rows[0]["test_accuracy_mean"] == pytest.approx(0.8) and rows[0]["test_accuracy_std"] == pytest.approx(0.02)
    assert rows[0]["plateaued"] == 2 and rows[0]["best_step_mean"] == pytest.approx(101)
    text = format_table(rows)
    assert "80.00 ± 2.00" in text and "2/3" in text
    assert format_table(rows, markdown=True).startswith("| strategy |")
    v = {p.method: p for p in paired_verdicts(runs, specs, margin=0.01)}
    assert set(v) == {"b-only r=8", "b-only r=16 (@2r)"}  # both against lora at the base rank 8
    assert v["b-only r=8"].reference == "lora r=8" and v["b-only r=8"].mean == pytest.approx(0.02)
    assert v["b-only r=16 (@2r)"].mean == pytest.approx(-0.0133333, abs=1e-6)


# ----------------------------------------------------------------------------- head-only features


class _Toks:
    """20 tokenised examples of 3 to 11 tokens, labels 0,1,2,0,..."""

    def __init__(self, vocab: int = 64):
        g = torch.Generator().manual_seed(1)
        self.items = [{"input_ids": torch.randint(3, vocab, (int(n),), generator=g).tolist(), "labels": i % 3}
                      for i, n in enumerate(torch.randint(3, 12, (20,), generator=g))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def lengths(self):
        return [len(it["input_ids"]) for it in self.items]


def _tiny_classifier(family: str):
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=64,
                 num_labels=3)
    if family == "bert":  # the head (a Linear) is fed the pooled vector, after the model's dropout
        return BertForSequenceClassification(BertConfig(**sizes)).eval()
    # the head is fed the whole sequence and reads token 0 (dropout inside the head)
    return RobertaForSequenceClassification(RobertaConfig(**sizes, pad_token_id=1)).eval()


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_head_features_and_feature_head_reproduce_the_full_model(family):
    """The head-only baseline on cached features computes the same logits and loss as the
    full model with the same head (eval mode), whether the head is fed one vector per example
    (BERT) or the sequence of which it reads the first token (RoBERTa, MPNet)."""
    from asymlora.compare.data import PadCollator
    from asymlora.compare.run import FeatureHead
    from asymlora.compare.task import head_features

    model = _tiny_classifier(family)
    data, coll = _Toks(), PadCollator(1 if family == "roberta" else 0)
    feats = head_features(model, "classifier", data, coll, batch_size=7)
    assert feats is not None and feats.first_token == (family == "roberta")
    assert feats.features.shape == ((20, 1, 32) if family == "roberta" else (20, 32))
    fh = FeatureHead(copy.deepcopy(model.classifier), dropout=0.0 if feats.first_token else 0.1).eval()
    for i in range(len(data)):
        batch = coll([data[i]])
        with torch.no_grad():
            full = model(**batch)
            mine = fh(feats.features[i:i + 1], batch["labels"])
        assert torch.allclose(full.logits, mine.logits, atol=1e-6)
        assert torch.allclose(full.loss, mine.loss, atol=1e-6)
    assert feats.labels == [i % 3 for i in range(20)]


def test_head_features_refuse_a_head_that_reads_more_than_the_first_token():
    """A sequence head that pools over tokens cannot be fed cached first tokens: no features,
    so the head-only run goes through the full model."""
    from asymlora.compare.data import PadCollator
    from asymlora.compare.task import head_features

    class MeanPoolHead(torch.nn.Module):
        def __init__(self, dense):
            super().__init__()
            self.dense = dense

        def forward(self, features):
            return self.dense(features.mean(dim=1))

    model = _tiny_classifier("roberta")
    model.classifier = MeanPoolHead(torch.nn.Linear(32, 3))
    assert head_features(model, "classifier", _Toks(), PadCollator(1), batch_size=7) is None


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@needs_real
def test_compare_quick_end_to_end_learns(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--quick", "--no-progress", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lr for b-only r=4:" in printed and " vs lora r=4: " in printed
    names = sorted(os.listdir(out))
    assert names == ["cost.png", "lr_selection.png", "metric_by_strategy.png", "results.csv", "results.json",
                     "results.md", "training_curves.png", "verdicts.png"]  # the pilots' checkpoints (runs/) are gone
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True
    s = res["settings"]
    k, r = len(s["dataset"]["label_names"]), s["ranks"][0]
    assert k == 5 and s["quick"] is True and s["selects_lr"] is True
    # "auto" decided by measuring bf16 against fp32, and the header line says what it measured
    probe = s["precision_probe"]
    assert s["mixed_precision"] == "auto" and probe["precision"] == s["precision_used"] in ("bf16", "no")
    assert f"bf16 measured at {probe['bf16_speedup']:.2f}× fp32's speed" in printed.splitlines()[0]
    expected = {"head-only": head_params(k), f"lora r={r}": LAYERS * r * 2 * D + head_params(k),
                f"a-only r={r}": LAYERS * r * D + head_params(k), f"b-only r={r}": LAYERS * r * D + head_params(k),
                f"b-only r={2 * r} (@2r)": LAYERS * 2 * r * D + head_params(k)}
    assert [row["strategy"] for row in res["summary"]] == [lab for lab in expected if lab in
                                                          {row["strategy"] for row in res["summary"]}]
    maj = s["majority_class_test_accuracy"]
    for row in res["summary"]:
        assert row["trainable_params"] == expected[row["strategy"]]
        assert row["n"] == len(s["seeds"]) == 2
        if row["preset"] != "head-only":
            assert row["test_accuracy_mean"] > maj + 0.05, row  # every adapter strategy learns
    # the lr of each strategy is the validation argmax of its pilot runs on the first seed
    for sel in res["lr_selection"]:
        finished = [g for g in sel["grid"] if g["pruned_at_step"] is None]
        best = max(finished, key=lambda g: (g["val_accuracy"], -g["lr"]))
        assert sel["chosen_lr"] == best["lr"]
        first = [run for run in res["runs"] if run["strategy"] == sel["strategy"] and run["seed"] == s["seeds"][0]]
        assert len(first) == 1 and first[0]["lr"] == best["lr"] and first[0]["val_accuracy"] == best["val_accuracy"]
    assert s["stopping"] == "budget" and s["rungs"] == [40]
    for run in res["runs"]:
        evals = {h["step"]: h["val_accuracy"] for h in run["history"] if "val_accuracy" in h}
        # the fixed budget: every run trains every step and is scored with its final weights
        assert run["steps"] == run["best_step"] == s["max_steps"]
        assert run["val_accuracy"] == evals[s["max_steps"]]
        lrs = [h["lr"] for h in run["history"]]
        decay_steps = s["max_steps"] - s["warmup_steps"]
        assert max(lrs) == pytest.approx(run["lr"]) and lrs[-1] < run["lr"] / decay_steps * 1.01
    assert set(res["phases_s"]) == {"load", "tokenise", "features", "pilot", "train", "eval", "report"}
    # a frozen A keeps only A·x for backward; LoRA also keeps x for A's gradient; the head alone keeps least
    act = {row["strategy"]: row["saved_activation_bytes_mean"] for row in res["summary"]}
    assert act["head-only"] < act[f"b-only r={r}"] < act[f"lora r={r}"]
    assert all(0 < run["wall_time_s"] <= res["total_time_s"] for run in res["runs"])
    ph = res["phases_s"]
    assert ph["load"] + ph["tokenise"] + ph["features"] + ph["report"] <= res["total_time_s"]
    # the run phases add up every run's time: the workers' and this process's (head-only) side by side
    assert 0 < ph["pilot"] + ph["train"] + ph["eval"] <= (s["workers"] + 1) * s["runs_wall_s"] + 1
    ran = [row["strategy"] for row in res["summary"]]
    assert {"head-only", f"lora r={r}", f"b-only r={r}"} <= set(ran)
    assert [v["method"] for v in res["verdicts"]] == [lab for lab in ran if lab not in ("head-only", f"lora r={r}")]
    # the train side of the train - test gap: a stratified train sample as large as validation
    assert s["used_sizes"]["train_sample"] <= s["used_sizes"]["val"] < s["used_sizes"]["train"]
    gap = {}
    for run in res["runs"]:
        assert 0.0 <= run["train_accuracy"] <= 1.0
        assert run["generalization_gap"] == pytest.approx(run["train_accuracy"] - run["test_accuracy"])
        gap[run["strategy"], run["seed"]] = run["generalization_gap"]
    paired = res["generalization_gap"]["paired"]
    assert [d["method"] for d in paired] == [v["method"] for v in res["verdicts"]]
    for d in paired:  # b-only's gap less LoRA's, seed by seed
        assert d["differences"] == pytest.approx([gap[d["method"], seed] - gap[d["reference"], seed]
                                                  for seed in d["seeds"]])
        assert d["mean"] == pytest.approx(sum(d["differences"]) / len(d["differences"]))
    assert res["generalization_gap"]["lines"][0] in printed
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(res["runs"]) and float(rows[0]["test_accuracy"]) == res["runs"][0]["test_accuracy"]
    assert float(rows[0]["generalization_gap"]) == pytest.approx(res["runs"][0]["generalization_gap"])
    md = (out / "results.md").read_text()
    assert "| strategy |" in md and " vs lora r=4: " in md
    for png in ("metric_by_strategy.png", "training_curves.png", "lr_selection.png", "verdicts.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temp files left behind


@pytest.mark.slow
@needs_real
def test_compare_on_a_local_csv_single_rate(tmp_path):
    p = tmp_path / "reviews.csv"
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "stars"])
        for i in range(60):
            w.writerow([("great product, loved it" if i % 2 else "terrible, broke in a day") + f" #{i}",
                        "5" if i % 2 else "1"])
    out = tmp_path / "o"
    assert main(["compare", "--quick", "--no-progress", "--no-plots", "--data", str(p), "--text-column", "review",
                 "--label-column", "stars", "--strategies", "b-only", "--seeds", "0", "--lr", "0.01",
                 "-o", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["dataset"]["label_names"] == ["1", "5"] and res["settings"]["selects_lr"] is False
    assert res["summary"][0]["trainable_params"] == LAYERS * 4 * D + head_params(2)
    assert [r["lr"] for r in res["runs"]] == [0.01]
    # and it learnt: the two kinds of review are told apart by their words, far above the majority class
    (run,) = res["runs"]
    assert run["test_accuracy"] >= 0.9 > res["settings"]["majority_class_test_accuracy"] + 0.2, run["test_accuracy"]
    assert run["final_train_loss"] < 0.5 * run["history"][0]["loss"]


def test_grid_extension_steps_beyond_an_edge_only():
    from asymlora.sweep.schedule import grid_extension

    grid = [1e-3, 3e-3, 1e-2]
    assert grid_extension(grid, 3e-3) is None
    assert grid_extension(grid, 1e-3) == pytest.approx(1e-3 / 3)
    assert grid_extension(grid, 1e-2) == pytest.approx(1e-2 * 10 / 3)
    assert grid_extension([1e-3], 1e-3) is None
