"""The runs the README and docs/compare-protocol.md quote are runs of the code's own default.

A figure in the README is only as good as the settings it came from: when the default budget
changes, the documented runs must be remade, not relabelled. These tests read each documented
run's ``results.json`` and check its protocol settings against ``asymlora.sweep.budget.DEFAULT``
(and, for a twin, that only the number of steps differs, doubled)."""
from __future__ import annotations

import json
import os

import pytest

from asymlora.strategies import DEFAULT_STRATEGIES
from asymlora.sweep.budget import DEFAULT

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results")


def _settings(folder: str) -> dict:
    with open(os.path.join(RESULTS, folder, "results.json"), encoding="utf-8") as fh:
        results = json.load(fh)
    assert results["complete"], f"{folder}: the documented sweep did not finish"
    return results["settings"]


def _check_protocol(settings: dict, max_steps: int, strategies: tuple[str, ...] = DEFAULT_STRATEGIES) -> None:
    assert settings["max_steps"] == max_steps
    assert settings["stopping"] == "budget"
    assert settings["lr_grid"] == list(DEFAULT.lrs)
    assert settings["max_lr_extensions"] == DEFAULT.max_lr_extensions
    assert settings["eval_every"] == DEFAULT.eval_every
    assert settings["warmup_steps"] == DEFAULT.warmup_steps
    assert settings["batch_size"] == DEFAULT.batch_size
    assert settings["max_length"] == DEFAULT.max_length
    assert settings["seeds"] == list(DEFAULT.seeds)
    assert settings["ranks"] == [DEFAULT.r]
    assert [s.split(" ")[0] for s in settings["strategies"]] == list(strategies)
    assert settings["quick"] is False
    # the scored splits: whole unless the default caps them (a capped test split made the tweets
    # verdict's word depend on the sampled texts, docs/compare-protocol.md)
    for split, cap in (("val", DEFAULT.max_val), ("test", DEFAULT.max_test)):
        available = settings["dataset"]["sizes"][split]
        assert settings["used_sizes"][split] == (available if cap is None else min(cap, available)), split


@pytest.mark.parametrize("folder,data,precision", [
    ("compare-default", "fortunes", "bf16"),
    ("compare-default-fp32", "fortunes", "no"),
    ("compare-tweets", "tweets", "bf16"),
])
def test_documented_default_runs_use_the_default_protocol(folder, data, precision):
    settings = _settings(folder)
    _check_protocol(settings, DEFAULT.max_steps)
    assert settings["data"] == data
    assert settings["precision_used"] == precision  # "no": fp32, what an AVX2-only CPU runs


@pytest.mark.parametrize("folder,data", [("compare-default-twin", "fortunes"), ("compare-tweets-twin", "tweets")])
def test_documented_twins_train_twice_as_long_and_change_nothing_else(folder, data):
    settings = _settings(folder)
    _check_protocol(settings, 2 * DEFAULT.max_steps)
    assert settings["data"] == data


def test_documented_five_strategy_run_uses_the_default_protocol():
    settings = _settings("compare-five-strategies")
    _check_protocol(settings, DEFAULT.max_steps,
                    strategies=("head-only", "lora", "b-only", "a-only", "peft-lora", "peft-lora-fa"))
    assert settings["data"] == "fortunes" and settings["precision_used"] == "bf16"
