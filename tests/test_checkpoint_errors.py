"""Adapter files that cannot be loaded: each refusal names the problem, and leaves the model
exactly as it was (every check runs before the first weight is written).

PEFT folders with options asymlora cannot represent are written by PEFT itself, not by hand.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymlora import AsymLoraConfig, load_adapter, save_adapter, wrap
from asymlora.core.inject import lora_layers
from asymlora.formats.native import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from asymlora.formats.peft import import_peft
from conftest import perturb_trained_factors, require, tiny_bert

peft = require("peft")

QV = ["query", "value"]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k in before:
        assert torch.equal(now[k], before[k]), f"{k} was written before the refusal"


@pytest.fixture
def adapter(tmp_path):
    """A b-only r=4 adapter on query/value with the classifier saved."""
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4, modules_to_save=["classifier"]))
    perturb_trained_factors(model)
    return save_adapter(model, tmp_path / "ad")


def _rewrite_weights(folder, fn) -> None:
    path = f"{folder}/{WEIGHTS_NAME}"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


# ----------------------------------------------------------------------------- load_adapter


@pytest.mark.parametrize("wrapped_as,message", [
    (AsymLoraConfig.preset("b-only", r=4, target_modules=["query"]), "model is wrapped with layers"),
    (AsymLoraConfig.preset("lora", r=4), "model trains 'AB', adapter was saved with train='B'"),
    (AsymLoraConfig.preset("b-only", r=8), "is wrapped at rank 8, the adapter's is r=4"),
])
def test_load_onto_a_model_wrapped_differently(adapter, wrapped_as, message):
    model = wrap(tiny_bert(seed=1), wrapped_as)
    before = state(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_adapter(model, adapter)
    assert_unchanged(model, before)


def test_missing_factor_in_the_weights_file(adapter):
    name = "bert.encoder.layer.1.attention.self.value.lora_B"
    _rewrite_weights(adapter, lambda t: t.pop(name))
    model = tiny_bert()
    before = state(model)
    with pytest.raises(ValueError, match=re.escape(f"lacks {name!r}, which {CONFIG_NAME} says is stored")):
        load_adapter(model, adapter)
    assert_unchanged(model, before)
    assert lora_layers(model) == {}  # not wrapped either


def test_missing_saved_module_parameter_in_the_weights_file(adapter):
    """The classifier (modules_to_save) is part of the adapter: without it the loaded model would
    silently keep a fresh random head."""
    _rewrite_weights(adapter, lambda t: t.pop("saved.classifier.weight"))
    model = tiny_bert(seed=2)
    before = state(model)
    with pytest.raises(ValueError, match=re.escape("lacks saved.'classifier.weight' (1 parameter(s) of "
                                                   "modules_to_save=['classifier'] missing)")):
        load_adapter(model, adapter)
    assert_unchanged(model, before)


def test_newer_format_version_is_refused(adapter):
    path = f"{adapter}/{CONFIG_NAME}"
    meta = json.loads(open(path).read())
    meta["format_version"] = FORMAT_VERSION + 1
    open(path, "w").write(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"has format_version {FORMAT_VERSION + 1}, this asymlora reads "
                                                   f"<= {FORMAT_VERSION}; upgrade asymlora")):
        load_adapter(tiny_bert(), adapter)


def test_peft_folder_given_to_load_adapter_points_to_import_peft(tmp_path):
    peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=QV)).save_pretrained(tmp_path / "p")
    model = tiny_bert()
    before = state(model)
    with pytest.raises(ValueError, match=re.escape("is not an asymlora adapter (format=None) (a PEFT adapter: "
                                                   "use asymlora.import_peft)")):
        load_adapter(model, tmp_path / "p")
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- import_peft


def _peft_folder(tmp_path, config) -> str:
    path = tmp_path / "peft"
    peft.get_peft_model(tiny_bert(), config).save_pretrained(path)
    return str(path)


def test_import_refuses_a_non_lora_peft_type(tmp_path):
    folder = _peft_folder(tmp_path, peft.IA3Config(target_modules=QV, feedforward_modules=[]))
    with pytest.raises(ValueError, match=re.escape("has peft_type='IA3'; only 'LORA' adapters can be imported")):
        import_peft(tiny_bert(), folder)


@pytest.mark.parametrize("option,value", [
    ("use_dora", True),
    ("lora_bias", True),
    ("layers_to_transform", [0]),
])
def test_import_refuses_peft_options_asymlora_cannot_represent(tmp_path, option, value):
    folder = _peft_folder(tmp_path, peft.LoraConfig(r=4, target_modules=QV, **{option: value}))
    assert json.loads(open(f"{folder}/{CONFIG_NAME}").read())[option] == value  # PEFT wrote it
    model = tiny_bert()
    before = state(model)
    with pytest.raises(ValueError, match=re.escape(f"PEFT adapter uses {option}={value!r}, which asymlora "
                                                   "cannot represent")):
        import_peft(model, folder)
    assert_unchanged(model, before)


def test_import_refuses_trained_base_biases(tmp_path):
    """bias='all' makes PEFT train and save the base layers' biases, which an asymlora adapter
    does not hold."""
    folder = _peft_folder(tmp_path, peft.LoraConfig(r=4, target_modules=QV, bias="all"))
    with pytest.raises(ValueError, match=re.escape("PEFT adapter uses bias='all', which asymlora cannot represent")):
        import_peft(tiny_bert(), folder)


def test_import_missing_lora_B(tmp_path):
    folder = _peft_folder(tmp_path, peft.LoraConfig(r=4, target_modules=QV))
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
    _rewrite_weights(folder, lambda t: t.pop(key))
    with pytest.raises(ValueError, match=re.escape("has lora_A but no lora_B for layer "
                                                   "'bert.encoder.layer.0.attention.self.query'")):
        import_peft(tiny_bert(), folder)


def test_import_onto_an_already_wrapped_model(tmp_path):
    folder = _peft_folder(tmp_path, peft.LoraConfig(r=4, target_modules=QV))
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4))
    before = state(model)
    with pytest.raises(ValueError, match=re.escape("model already has asymlora adapters; call asymlora.unload(model) "
                                                   "first")):
        import_peft(model, folder)
    assert_unchanged(model, before)


def test_asymlora_folder_given_to_import_peft(adapter):
    with pytest.raises(ValueError, match=re.escape("has peft_type=None; only 'LORA' adapters can be imported")):
        import_peft(tiny_bert(), adapter)


def test_import_refuses_a_head_of_another_shape_before_wrapping(tmp_path):
    folder = _peft_folder(tmp_path, peft.LoraConfig(r=4, target_modules=QV, modules_to_save=["classifier"]))
    model = tiny_bert(num_labels=2)  # the adapter's classifier has 3 labels
    before = state(model)
    with pytest.raises(ValueError, match=r"PEFT tensor 'base_model\.model\.classifier\.(weight|bias)' has shape "
                                         r"\(3(, 32)?,?\), the model's 'classifier\.(weight|bias)' \(2(, 32)?,?\): "
                                         r"wrong base model\?"):
        import_peft(model, folder)
    assert_unchanged(model, before)
    assert lora_layers(model) == {}


def test_convert_to_peft_refuses_to_overwrite_its_input(tmp_path):
    """The adapter folder is left byte-for-byte as it was, also through a second path to it."""
    from asymlora.core.config import AsymLoraConfig
    from asymlora.core.inject import wrap
    from asymlora.errors import UserError
    from asymlora.formats.native import save_adapter
    from asymlora.formats.peft import convert_to_peft
    from conftest import tiny_bert

    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4))
    save_adapter(model, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()}
    (tmp_path / "link").symlink_to(tmp_path / "ad")
    for out in (tmp_path / "ad", tmp_path / "link"):
        with pytest.raises(UserError, match="is the adapter folder itself"):
            convert_to_peft(tmp_path / "ad", out)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir()} == before
