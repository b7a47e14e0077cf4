"""Every impossible configuration is rejected up front with a message that names it."""
from __future__ import annotations

import pytest

from asymlora import AsymLoraConfig, wrap
from conftest import tiny_bert


def test_presets_match_design_table():
    assert (AsymLoraConfig.preset("lora").train, AsymLoraConfig.preset("lora").init_A) == ("AB", "kaiming")
    b = AsymLoraConfig.preset("b-only", r=4)
    assert (b.train, b.init_A, b.init_B, b.alpha) == ("B", "orthogonal", "zero", 8.0)
    a = AsymLoraConfig.preset("a-only")
    assert (a.train, a.init_A, a.init_B) == ("A", "zero", "orthogonal")


def test_json_round_trip(tmp_path):
    cfg = AsymLoraConfig.preset("b-only", r=4, target_modules=["query"], modules_to_save=["classifier"],
                                rank_pattern={r"layer\.0": 2}, alpha_pattern={"value": 3.0}, scaling="rslora")
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    assert AsymLoraConfig.from_json(path) == cfg
    assert AsymLoraConfig.from_json(cfg.to_json()) == cfg


def test_scaling_modes_and_overrides():
    cfg = AsymLoraConfig(r=4, alpha=8, rank_pattern={r"layer\.0": 2}, alpha_pattern={"value": 3.0})
    assert cfg.scaling_for("encoder.layer.1.query") == 2.0
    assert cfg.scaling_for("encoder.layer.0.query") == 4.0       # r overridden to 2
    assert cfg.scaling_for("encoder.layer.1.value") == 0.75      # alpha overridden to 3
    assert cfg.rank_for("encoder.layer.10.query") == 4           # boundary: layer.10 is not layer.0
    rs = AsymLoraConfig(r=16, alpha=8, scaling="rslora")
    assert rs.scaling_for("x") == 2.0


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"r": 0}, ValueError, "r must be >= 1"),
        ({"r": -3}, ValueError, "r must be >= 1"),
        ({"r": 2.5}, TypeError, "r must be an integer"),
        ({"r": True}, TypeError, "r must be an integer"),
        ({"alpha": 0}, ValueError, "alpha must be > 0"),
        ({"alpha": float("nan")}, ValueError, "alpha must be finite"),
        ({"scaling": "sqrt"}, ValueError, "scaling must be one of"),
        ({"dropout": 1.0}, ValueError, "dropout must be in [0, 1)"),
        ({"dropout": -0.1}, ValueError, "dropout must be in [0, 1)"),
        ({"train": "C"}, ValueError, "train must be one of"),
        ({"init_A": "xavier"}, ValueError, "init_A='xavier' is not a known initialiser"),
        ({"init_B": "ones"}, ValueError, "init_B='ones' is not a known initialiser"),
        ({"init_A": "zero", "init_B": "zero", "train": "AB"}, ValueError, "both factors start at zero"),
        ({"init_A": "zero", "init_B": "zero", "train": "B"}, ValueError, "both factors start at zero"),
        ({"train": "B", "init_A": "zero", "init_B": "orthogonal"}, ValueError, "freezes A but init_A='zero'"),
        ({"train": "A", "init_A": "orthogonal", "init_B": "zero"}, ValueError, "freezes B but init_B='zero'"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"target_modules": []}, ValueError, "empty list"),
        ({"target_modules": ""}, ValueError, "empty string"),
        ({"target_modules": "(unclosed"}, ValueError, "does not compile"),
        ({"target_modules": 5}, TypeError, "target_modules must be"),
        ({"modules_to_save": "classifier"}, TypeError, "modules_to_save must be a list"),
        ({"rank_pattern": {"q": 0}}, ValueError, "rank_pattern['q'] must be >= 1"),
        ({"rank_pattern": {"(": 2}}, ValueError, "not a valid regular expression"),
        ({"alpha_pattern": {"q": -1.0}}, ValueError, "alpha_pattern['q'] must be > 0"),
    ],
)
def test_bad_config_rejected(kwargs, exc, words):
    with pytest.raises(exc) as info:
        AsymLoraConfig(**kwargs)
    assert words in str(info.value)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'c-only'"):
        AsymLoraConfig.preset("c-only")
    with pytest.raises(ValueError, match=r"unknown AsymLoraConfig field\(s\) \['rank'\]"):
        AsymLoraConfig.from_dict({"rank": 4})


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"r": 33}, "rank r=33 for layer"),                                # > min(d_in, d_out) = 32
        ({"target_modules": ["nonexistent"]}, "matches no module"),
        ({"target_modules": ["query", "kwery"]}, "'kwery' matches no module"),  # one typo among good names
        ({"target_modules": ["attention"]}, "only nn.Linear and transformers Conv1D"),
        ({"target_modules": r".*\.nothing_here"}, "matched no linear layer"),
        ({"modules_to_save": ["classifierr"]}, "modules_to_save entry 'classifierr'"),
        ({"rank_pattern": {"layer\\.7": 2}}, "rank_pattern key 'layer\\\\.7' matches none"),
    ],
)
def test_bad_config_for_model_rejected_before_any_change(kwargs, words):
    model = tiny_bert()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError) as info:
        wrap(model, AsymLoraConfig.preset("b-only", **kwargs))
    assert words in str(info.value)
    assert [n for n, _ in model.named_modules()] == before          # untouched
    assert all(p.requires_grad for p in model.parameters())


def test_wrap_twice_rejected():
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=2))
    with pytest.raises(ValueError, match="already has asymlora adapters"):
        wrap(model, AsymLoraConfig.preset("b-only", r=2))


def test_default_targets_unknown_architecture():
    import torch.nn as nn

    with pytest.raises(ValueError, match="no default target modules"):
        wrap(nn.Sequential(nn.Linear(4, 4)), AsymLoraConfig(r=2))
