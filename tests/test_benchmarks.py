"""The benchmark suite runs and reports well-formed results; its memory meter is right.

Timings are not asserted (the machine is shared and noisy); what is asserted is checked
against independent truth: byte counts of known tensors, and the per-token activation sizes
the algebra of y = W·x + s·B·(A·x) implies.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import SavedTensorMeter, model_storages, paired_ratio  # noqa: E402


# ------------------------------------------------------------------ the meter itself
def test_meter_counts_saved_result_of_exp():
    x = torch.randn(32, 16, requires_grad=True)
    with SavedTensorMeter() as m:
        y = x.exp()  # exp saves its result: 32·16 float32
    assert m.bytes == 32 * 16 * 4
    y.sum().backward()


def test_meter_dedupes_by_storage():
    x = torch.randn(10, 8, requires_grad=True)
    with SavedTensorMeter() as m:
        y = x.sin() + x.cos() + (x.view(80) * 2.0).view(10, 8).tanh()  # sin, cos save x; tanh saves its output
    assert m.bytes == 10 * 8 * 4 + 10 * 8 * 4
    assert len(m.storages) == 2
    y.sum().backward()


def test_meter_counts_full_storage_of_a_view():
    big = torch.randn(100, 4)
    x = big[:10].detach().requires_grad_(False)
    w = torch.randn(3, 4, requires_grad=True)
    with SavedTensorMeter() as m:
        F.linear(x, w)  # saves x (a view into a 100×4 storage) for w's gradient
    assert m.bytes == 100 * 4 * 4


def test_meter_excludes_weights_and_frozen_linear_saves_no_input():
    layer = nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    for p in layer.parameters():
        p.requires_grad_(False)
    with SavedTensorMeter(exclude=model_storages(layer)) as m:
        layer(x)  # input grad needs only W (excluded); no activation is kept
    assert m.bytes == 0 and m.excluded_hits >= 1
    layer.weight.requires_grad_(True)
    with SavedTensorMeter(exclude=model_storages(layer)) as m:
        layer(x)  # weight grad needs x
    assert m.bytes == 5 * 16 * 4


def test_paired_ratio_is_median_of_round_ratios():
    assert paired_ratio([2.0, 3.0, 10.0], [1.0, 3.0, 5.0]) == 2.0


# ------------------------------------------------------------------ frozen-factor memory
def test_b_only_layer_keeps_r_numbers_per_token():
    from benchmarks.layer_memory import _saved_per_token, build

    d_in, d_out, r, tokens = 96, 40, 4, 12
    torch.manual_seed(0)
    base, x = nn.Linear(d_in, d_out), torch.randn(tokens, d_in)
    per_token = {(k, p): _saved_per_token(build(k, base, r, p), x)[0]
                 for k, p in [("floor", 0.0), ("b-only", 0.0), ("b-only", 0.1), ("lora", 0.0),
                              ("peft-lora", 0.0), ("peft-lora-frozenA", 0.0)]}
    assert per_token[("floor", 0.0)] == 0
    assert per_token[("b-only", 0.0)] == 4 * r                 # A·x only: O(r)
    # + the dropout mask: float32 on CPU (input * noise saves noise), one byte on CUDA (native_dropout)
    assert per_token[("b-only", 0.1)] in (4 * r + d_in, 4 * r + 4 * d_in)
    assert per_token[("lora", 0.0)] == 4 * r + 4 * d_in        # x itself for A's gradient
    assert per_token[("peft-lora", 0.0)] == per_token[("lora", 0.0)]
    assert per_token[("peft-lora-frozenA", 0.0)] == 4 * r


# ------------------------------------------------------------------ the suite runs
# goals whose values do not depend on timing: they must pass on any machine, in quick mode too
DETERMINISTIC_GOALS = ("peak train memory < PEFT LoRA", "checkpoint ≤ ", "memory of K b-only adapters ≤ ")


# a safetensors header: 8 bytes of length, then JSON naming each tensor (name, dtype, shape, offsets)
# and the metadata; generous bounds, far below the r·d_in·4 bytes a stored A would add per layer
HEADER_BYTES_PER_TENSOR, HEADER_BYTES = 256, 4096

# float32 bytes a d_in -> d_out adapted layer saves for backward per token, on CPU (dropout saves
# its float32 noise there): benchmarks/layer_memory.py's docstring
LAYER_SAVED_PER_TOKEN = {
    ("floor", 0.0): lambda r, d_in: 0,
    ("b-only", 0.0): lambda r, d_in: 4 * r,                  # A·x for B's gradient
    ("b-only", 0.1): lambda r, d_in: 4 * r + 4 * d_in,       # + the dropout noise
    ("lora", 0.0): lambda r, d_in: 4 * r + 4 * d_in,         # + x for A's gradient
    ("peft-lora", 0.0): lambda r, d_in: 4 * r + 4 * d_in,
    ("peft-lora", 0.1): lambda r, d_in: 4 * r + 8 * d_in,    # dropout(x) for A's gradient and the noise
    ("peft-lora-frozenA", 0.0): lambda r, d_in: 4 * r,
}


def _layer_shapes(kind: str, targets: str) -> list[tuple[int, int]]:
    """(d_in, d_out) of each adapted layer of the benchmark's quick model."""
    from benchmarks.models import build_base, target_names

    base, _ = build_base(kind, True)
    modules = dict(base.named_modules())
    return [(modules[n].in_features, modules[n].out_features) for n in target_names(base, kind, targets)]


def _check_results(results: dict) -> None:
    from benchmarks import report

    text = json.dumps(results)  # serialisable
    assert json.loads(text)["quick"] is True
    assert results["goals"], "no goal rows"
    for row in results["goals"]:
        assert set(row) >= {"goal", "config", "value", "pass"}
        assert row["value"] == row["value"]  # not NaN
        if row["goal"].startswith(DETERMINISTIC_GOALS):
            assert row["pass"] is True, row
    # each weights file holds what the algebra says (B alone: r·d_out numbers per layer; PEFT: A and B,
    # r·(d_in + d_out)) in float32, plus a safetensors header of bounded size
    for c in results.get("checkpoint", []):
        shapes = _layer_shapes(c["model"], c["targets"])
        assert len(shapes) == c["layers"] > 0
        ours, peft = (4 * c["r"] * sum(d_out for _, d_out in shapes),
                      4 * c["r"] * sum(d_in + d_out for d_in, d_out in shapes))
        for got, numbers, tensors in ((c["weights_bytes"]["asym_b_only"], ours, len(shapes)),
                                      (c["weights_bytes"]["peft_lora"], peft, 2 * len(shapes))):
            assert 0 < got - numbers <= HEADER_BYTES_PER_TENSOR * tensors + HEADER_BYTES, (c, got, numbers)
    # each checkpoint verdict is the ratio of the two files' bytes, against the report's threshold
    ckpt = {f"{c['model']} r={c['r']} {c['targets']}": c["weights_bytes"] for c in results.get("checkpoint", [])}
    for row in results["goals"]:
        if row["goal"].startswith("checkpoint ≤ "):
            sizes = ckpt[row["config"]]
            assert row["value"] == sizes["asym_b_only"] / sizes["peft_lora"]
            assert row["pass"] is (row["value"] <= report.CKPT_RATIO)
    # what one adapted layer keeps for backward, per token, against benchmarks/layer_memory.py's closed forms
    for row in results.get("layer_memory", []):
        r, d_in = row["r"], row["d_in"]
        want = LAYER_SAVED_PER_TOKEN[(row["variant"], row["dropout"])](r, d_in)
        assert row["saved_bytes_per_token"] == want, row
    # peak memory: b-only's tracked peak against PEFT LoRA's, from the train rows themselves
    for g in results.get("train", []):
        ours = g["variants"]["asym-b-only"]["memory"]["tracked_peak_bytes"]
        peft = g["variants"]["peft-lora"]["memory"]["tracked_peak_bytes"]
        assert ours < peft, (g["model"], ours, peft)


def test_quick_suite_subset_produces_wellformed_results():
    from benchmarks.report import render
    from benchmarks.run import run_suite

    results = run_suite(quick=True, only=["layer_memory", "checkpoint"], log=lambda *a: None)
    _check_results(results)
    assert sum(row["goal"].startswith("checkpoint ≤ ") for row in results["goals"]) == len(results["checkpoint"]) == 3
    for c in results["checkpoint"]:
        assert c["weights_bytes"]["ratio"] < 0.6          # B only vs A and B
        assert c["zero_init_fix_gives_identical_factors"]
    assert "### Goals" in render(results)


def test_multi_adapter_benchmark_memory_is_one_A_plus_K_Bs_and_matches_peft():
    from benchmarks.multi_adapter import run

    res = run(quick=True, repeats=1, log=lambda *a: None)
    r, shapes = res["r"], res["layer_shapes"]
    for row in res["sweep"]:
        k = row["K"]
        assert row["memory"]["asym_numbers"] == sum(r * d_in + k * r * d_out for d_in, d_out in shapes)
        assert row["memory"]["peft_numbers"] == k * r * sum(d_in + d_out for d_in, d_out in shapes)
        assert row["max_abs_diff_vs_peft"] <= 1e-5      # the same function as PEFT's mixed batch


def test_run_rejects_unknown_benchmark():
    from benchmarks.run import run_suite

    with pytest.raises(ValueError, match="unknown benchmark"):
        run_suite(quick=True, only=["nope"])


@pytest.mark.slow
def test_quick_suite_command_writes_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--output-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    _check_results(results)
    assert set(results) >= {"train", "layer_memory", "init", "checkpoint", "inference", "machine"}
    names = set(results["train"][0]["variants"])
    assert names == {"floor", "asym-b-only", "asym-lora", "peft-lora", "peft-lora-frozenA"}
    assert (tmp_path / "results.md").read_text().startswith("Machine:")
