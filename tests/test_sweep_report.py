"""The text a finished sweep prints (``asymlora.sweep.report``), shared by compare and sft:
checked line by line on a hand-made results dict, no training."""
from __future__ import annotations

import os

from asymlora.compare import CompareConfig, format_report
from asymlora.sft.config import SFTConfig
from asymlora.sft.protocol import format_report as format_sft_report
from asymlora.sweep.report import SelectionMetric, format_sweep_report


def _results(grid_key: str, values: list[float]) -> dict:
    return {
        "summary": [],
        "lr_selection": [
            {"strategy": "b-only r=8", "chosen_lr": 3e-3, "at_edge": None,
             "grid": [{"lr": 1e-3, grid_key: values[0]}, {"lr": 3e-3, grid_key: values[1], "pruned_at_step": None},
                      {"lr": 1e-2, grid_key: values[2], "pruned_at_step": 60}]},
            {"strategy": "lora r=8", "chosen_lr": 1e-2, "at_edge": "upper",
             "grid": [{"lr": 3e-3, grid_key: values[0]}, {"lr": 1e-2, grid_key: values[1]}]},
        ],
        "verdict_lines": ["b-only r=8 vs lora r=8: -0.40 points [-1.2, 0.4]: equivalent"],
        "phases_s": {"lr search": 61.4, "seeds": 120.0},
        "total_time_s": 181.4,
        "benchmarks": [],
        "settings": {},
    }


def test_the_report_reads_in_order():
    res = _results("val_accuracy", [0.5, 0.625, 0.4])
    text = format_sweep_report(
        res, tables=["TABLE"],
        metric=SelectionMetric("validation accuracy", "val_accuracy", lambda v: f"{100 * v:.1f}"),
        first_seed=7, margin=0.01, verdicts_on="test-accuracy", output_dir="out", files=["a.json", "b.md"],
        sections=["EXTRA", ""])
    assert text.split("\n") == [
        "",
        "TABLE",
        "",
        "lr for b-only r=8: 0.003   (validation accuracy by lr, seed 7: 0.001: 50.0  0.003: 62.5  0.01: 40.0 "
        "(pruned at step 60))",
        "lr for lora r=8: 0.01   (validation accuracy by lr, seed 7: 0.003: 50.0  0.01: 62.5)  — on the upper edge "
        "of the grid: the best rate may lie beyond it (widen --lrs or raise --max-lr-extensions)",
        "",
        "EXTRA",
        "",
        "paired test-accuracy differences against LoRA at the same r, 95 % t-interval over seeds (margin ±1 point):",
        "  b-only r=8 vs lora r=8: -0.40 points [-1.2, 0.4]: equivalent",
        "",
        f"total 181 s (lr search 61 s, seeds 120 s); wrote {os.path.abspath('out')}/a.json, b.md",
    ]


def test_no_verdicts_no_verdict_block():
    res = dict(_results("val_loss", [1.0, 0.9, 1.1]), verdict_lines=[])
    text = format_sweep_report(res, tables=[], metric=SelectionMetric("validation loss", "val_loss", str),
                               first_seed=0, margin=0.01, verdicts_on="", output_dir="o", files=["x"])
    assert "paired" not in text and "lr for lora r=8" in text


def test_compare_and_sft_print_through_the_shared_report(tmp_path):
    compare = format_report(_results("val_accuracy", [0.5, 0.625, 0.4]),
                            CompareConfig(seeds=[3], output_dir=str(tmp_path), plots=False))
    assert "(validation accuracy by lr, seed 3: 0.001: 50.0  0.003: 62.5" in compare
    assert "paired test-accuracy differences against LoRA" in compare
    assert compare.endswith(f"wrote {tmp_path}/results.json, results.csv, results.md")
    with_plots = format_report(_results("val_accuracy", [0.5, 0.6, 0.4]), CompareConfig(output_dir=str(tmp_path)))
    assert with_plots.endswith(
        "results.md, metric_by_strategy.png, training_curves.png, lr_selection.png, verdicts.png, cost.png")

    sft = format_sft_report(_results("val_loss", [1.25, 1.0, 2.0]), SFTConfig(seeds=[1], output_dir=str(tmp_path)))
    assert "(validation loss by lr, seed 1: 0.001: 1.2500  0.003: 1.0000  0.01: 2.0000" in sft
    assert "\npaired differences against LoRA at the same r" in sft
    assert sft.endswith(f"wrote {tmp_path}/results.json, results.md, verdicts.png, adapters/")
