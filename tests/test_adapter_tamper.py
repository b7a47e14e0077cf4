"""A saved adapter whose adapter_config.json was edited is refused, naming the field and both
values, before the model is touched (issue 11)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import asymlora
from asymlora import AsymLoraConfig, load_adapter, save_adapter, wrap
from asymlora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, convert_to_peft, load_factors
from asymlora.errors import UserError
from conftest import perturb_trained_factors, tiny_bert

# (field, new value, regex the message must match): the saved adapter has r=4, alpha=8, seed=3,
# targets query,value, and the preset's train/init.
EDITS = [
    ("r", 8, r"says r=8 but layer '.*' was saved with r=4"),
    ("alpha", 16.0, r"says alpha=16.0 but layer '.*' \(scaling 2\) was saved with alpha=8.0"),
    ("seed", 4, r"says seed=4 but .* was saved with seed=3"),
    ("train", "AB", r"says train='AB' but layer '.*' was saved with train='B'"),
    ("init_A", "gaussian", r"says init_A='gaussian' but layer '.*' was saved with init_A='orthogonal'"),
    ("init_B", "orthogonal", r"says init_B='orthogonal' but layer '.*' was saved with init_B='zero'"),
    ("target_modules", ["query"], r"target_modules=\['query'\], which does not cover the saved layer '.*value'"),
    ("target_modules", ["query", "value", "key"], r"no saved layer matches \['key'\]"),
]


def _saved(tmp_path, preset: str = "b-only"):
    model = wrap(tiny_bert(), AsymLoraConfig.preset(preset, r=4, alpha=8.0, seed=3, target_modules=["query", "value"]))
    perturb_trained_factors(model)
    return save_adapter(model, tmp_path / "ad")


def _edit(folder, field, value) -> None:
    path = f"{folder}/{CONFIG_NAME}"
    meta = json.loads(open(path).read())
    assert meta["config"][field] != value  # the edit really changes something
    meta["config"][field] = value
    open(path, "w").write(json.dumps(meta))


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("field,value,message", EDITS, ids=[f"{e[0]}-{i}" for i, e in enumerate(EDITS)])
def test_edited_config_field_refused_model_untouched(tmp_path, field, value, message):
    folder = _saved(tmp_path)
    load_adapter(tiny_bert(), folder)  # the unedited file loads
    _edit(folder, field, value)
    model = tiny_bert()
    before = _plain_state(model)
    with pytest.raises(UserError, match=message):
        load_adapter(model, folder)
    assert not asymlora.lora_layers(model)  # not wrapped
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(UserError, match=message):  # the other readers refuse it too
        load_factors(folder)
    with pytest.raises(UserError, match=message):
        convert_to_peft(folder, tmp_path / "peft")


def test_seed_of_a_fully_stored_adapter_refused(tmp_path):
    """lora stores both factors, so no factor is rebuilt from the seed: the header copy of the
    config is what catches the edit."""
    folder = _saved(tmp_path, "lora")
    _edit(folder, "seed", 7)
    with pytest.raises(UserError, match=r"says seed=7 but .* was saved with seed=3"):
        load_adapter(tiny_bert(), folder)


def _strip_header(folder) -> None:
    """Rewrite the weights the way asymlora wrote them before the config went into the header."""
    path = f"{folder}/{WEIGHTS_NAME}"
    save_file(load_file(path), path, metadata={"format": "asymlora-adapter"})


@pytest.mark.parametrize("field,value,message", [e for e in EDITS if e[0] != "seed"])
def test_older_files_without_header_checked_per_layer(tmp_path, field, value, message):
    folder = _saved(tmp_path)
    _strip_header(folder)
    load_adapter(tiny_bert(), folder)
    _edit(folder, field, value)
    with pytest.raises(UserError, match=message):
        load_adapter(tiny_bert(), folder)


def test_older_file_seed_edit_caught_by_fingerprint(tmp_path):
    folder = _saved(tmp_path)  # b-only: A is rebuilt from the seed and checked
    _strip_header(folder)
    _edit(folder, "seed", 4)
    with pytest.raises(UserError, match="does not match the fingerprint recorded at save time"):
        load_adapter(tiny_bert(), folder)


@pytest.mark.parametrize("value", ["4", -1, None])
def test_invalid_config_value_is_a_user_error(tmp_path, value):
    folder = _saved(tmp_path)
    _edit(folder, "r", value)
    with pytest.raises(UserError, match="invalid adapter config"):
        load_adapter(tiny_bert(), folder)


def test_damaged_files_are_user_errors(tmp_path):
    folder = _saved(tmp_path)
    open(f"{folder}/{WEIGHTS_NAME}", "wb").write(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_adapter(tiny_bert(), folder)
    open(f"{folder}/{CONFIG_NAME}", "w").write("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(tiny_bert(), folder)
