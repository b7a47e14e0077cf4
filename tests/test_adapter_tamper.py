"""A saved adapter whose adapter_config.json was edited is refused, naming the field and both
values, before the model is touched (issue 11)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymlora import AsymLoraConfig, load_adapter, save_adapter, wrap
from asymlora.core.inject import lora_layers
from asymlora.errors import UserError
from asymlora.formats.native import CONFIG_NAME, WEIGHTS_NAME, load_factors
from asymlora.formats.peft import convert_to_peft
from conftest import perturb_trained_factors, require, tiny_bert

# (field, new value, regex the message must match): the saved adapter has r=4, alpha=8, seed=3,
# targets query,value, and the preset's trainable/init.
EDITS = [
    ("r", 8, r"says r=8 but layer '.*' was saved with r=4"),
    ("alpha", 16.0, r"says alpha=16.0 but layer '.*' \(scaling 2\) was saved with alpha=8.0"),
    ("seed", 4, r"says seed=4 but .* was saved with seed=3"),
    ("trainable", "AB", r"says trainable='AB' but layer '.*' was saved with trainable='B'"),
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
    assert not lora_layers(model)  # not wrapped
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


# ----------------------------------------------------------------------------- the weights file itself
# Each tampering rewrites adapter_model.safetensors with its header kept, so only the check of
# the tensors can catch it. A refusal is one line naming the tensor and what was expected, and
# the model (plain or already wrapped) is exactly as it was.

LAYER = "bert.encoder.layer.0.attention.self.query"
B_KEY, A_KEY = f"{LAYER}.lora_B", f"{LAYER}.lora_A"


def _with_head(tmp_path, seed: int = 1):
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4, seed=3, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"]))
    perturb_trained_factors(model, seed)
    return save_adapter(model, tmp_path / f"ad{seed}")


def _rewrite(path, fn) -> None:
    """Change the tensors of a safetensors file, keeping its header metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata()
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata=header)


def _nan(t, key):
    t[key] = t[key].clone()
    t[key].view(-1)[5] = float("nan")


def _inf(t, key):
    t[key] = t[key].clone()
    t[key].view(-1)[0] = float("inf")


def _base_weight():
    return dict(tiny_bert().named_parameters())


WEIGHT_TAMPERS = [
    ("nan-in-trained-factor", lambda t: _nan(t, B_KEY),
     rf"tensor '{B_KEY}' holds 1 non-finite value\(s\) \(NaN or inf\) of 128, expected finite values"),
    ("inf-in-saved-head", lambda t: _inf(t, "saved.classifier.weight"),
     r"tensor 'saved.classifier.weight' holds 1 non-finite value"),
    ("wrong-shape", lambda t: t.__setitem__(B_KEY, t[B_KEY][:, :3].contiguous()),
     rf"tensor '{B_KEY}' has shape \(32, 3\), expected \(32, 4\)"),
    ("wrong-dtype", lambda t: t.__setitem__(B_KEY, t[B_KEY].half()),
     rf"tensor '{B_KEY}' has dtype float16, expected float32"),
    ("integer-head", lambda t: t.__setitem__("saved.classifier.bias", t["saved.classifier.bias"].long()),
     r"tensor 'saved.classifier.bias' has dtype int64, expected float32"),
    ("missing-factor", lambda t: t.pop(B_KEY), rf"lacks '{B_KEY}', which adapter_config.json says is stored"),
    ("copy-of-a-base-weight", lambda t: t.__setitem__(f"{LAYER}.weight", _base_weight()[f"{LAYER}.weight"] * 0),
     rf"holds tensor '{LAYER}.weight', which adapter_config.json does not explain"),
    ("base-weight-as-saved-module", lambda t: t.__setitem__(
        "saved.bert.embeddings.word_embeddings.weight", _base_weight()["bert.embeddings.word_embeddings.weight"] * 0),
     r"holds tensor 'saved.bert.embeddings.word_embeddings.weight', which adapter_config.json does not explain"),
    ("seed-only-factor-stored", lambda t: t.__setitem__(A_KEY, torch.zeros(4, 32)),
     rf"holds tensor '{A_KEY}', which adapter_config.json does not explain"),
    ("changed-values", lambda t: t.__setitem__(B_KEY, t[B_KEY] * 2),
     rf"tensor '{B_KEY}' does not match the fingerprint adapter_config.json recorded"),
]


def _refused_leaves_model_as_it_was(model, folder, message) -> None:
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wrapped = bool(lora_layers(model))
    with pytest.raises(UserError, match=message) as err:
        load_adapter(model, folder)
    assert "\n" not in str(err.value)  # one line
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert bool(lora_layers(model)) == wrapped


@pytest.mark.parametrize("tamper,message", [t[1:] for t in WEIGHT_TAMPERS], ids=[t[0] for t in WEIGHT_TAMPERS])
def test_tampered_weights_refused_model_untouched(tmp_path, tamper, message):
    folder = _with_head(tmp_path)
    load_adapter(tiny_bert(), folder)  # the untampered file loads
    _rewrite(f"{folder}/{WEIGHTS_NAME}", tamper)
    _refused_leaves_model_as_it_was(tiny_bert(), folder, message)
    # onto a model already wrapped with the same config: nothing of it is replaced either
    wrapped = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4, seed=3, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
    perturb_trained_factors(wrapped, 7)
    _refused_leaves_model_as_it_was(wrapped, folder, message)
    with pytest.raises(UserError, match=message):  # the readers without a model refuse it too
        load_factors(folder)


def test_weights_of_one_save_under_the_config_of_another_are_refused(tmp_path):
    """The config records a fingerprint of every stored factor: the weights file of another save
    with the same config (a half-replaced folder, a copied file) does not load under it."""
    one, two = _with_head(tmp_path, 1), _with_head(tmp_path, 2)
    open(f"{one}/{WEIGHTS_NAME}", "wb").write(open(f"{two}/{WEIGHTS_NAME}", "rb").read())
    _refused_leaves_model_as_it_was(tiny_bert(), one, r"does not match the fingerprint adapter_config.json recorded "
                                                       r"when it was saved: the weights file was changed, or comes "
                                                       r"from another save")


@pytest.mark.parametrize("keep", [0.5, 0.995, 12])
def test_weights_file_cut_short_is_a_one_line_refusal(tmp_path, keep):
    folder = _with_head(tmp_path)
    path = f"{folder}/{WEIGHTS_NAME}"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    _refused_leaves_model_as_it_was(tiny_bert(), folder, r"is not a readable safetensors file \(damaged or cut short\)")


# ----------------------------------------------------------------------------- import_peft, the same checks

PEFT_LAYER = f"base_model.model.{LAYER}"


def _peft_saved(tmp_path) -> str:
    peft = require("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                             modules_to_save=["classifier"]))
    path = tmp_path / "peft"
    model.save_pretrained(path)
    return str(path)


PEFT_TAMPERS = [
    ("nan", lambda t: _nan(t, f"{PEFT_LAYER}.lora_A.weight"),
     rf"tensor '{PEFT_LAYER}.lora_A.weight' holds 1 non-finite"),
    ("wrong-shape", lambda t: t.__setitem__(f"{PEFT_LAYER}.lora_B.weight", torch.zeros(31, 4)),
     rf"PEFT factors of '{LAYER}' are A\(4, 32\) B\(31, 4\), expected A\(4, 32\) B\(32, 4\)"),
    ("integer", lambda t: t.__setitem__(f"{PEFT_LAYER}.lora_B.weight", torch.zeros(32, 4, dtype=torch.int32)),
     rf"tensor '{PEFT_LAYER}.lora_B.weight' has dtype int32, expected a floating-point dtype"),
    ("missing-layer", lambda t: [t.pop(f"{PEFT_LAYER}.lora_{f}.weight") for f in "AB"],
     rf"lacks lora_A/lora_B for layer '{LAYER}' \(1 layer\(s\)\), which adapter_config.json's target_modules"),
    ("missing-A", lambda t: t.pop(f"{PEFT_LAYER}.lora_A.weight"), rf"has lora_B but no lora_A for layer '{LAYER}'"),
    ("copy-of-a-base-weight", lambda t: t.__setitem__("base_model.model.bert.embeddings.word_embeddings.weight",
                                                      torch.zeros(64, 32)),
     r"holds tensor 'base_model.model.bert.embeddings.word_embeddings.weight', which adapter_config.json does not "
     r"explain"),
    ("untargeted-layer", lambda t: [t.__setitem__(f"base_model.model.bert.encoder.layer.0.attention.self.key.lora_{f}"
                                                  ".weight", torch.zeros(*s))
                                    for f, s in (("A", (4, 32)), ("B", (32, 4)))],
     r"holds tensor 'base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight', which "
     r"adapter_config.json does not explain"),
    ("missing-head", lambda t: t.pop(next(k for k in list(t) if k.endswith("classifier.bias"))),
     r"lacks 'classifier.bias' \(1 parameter\(s\) of modules_to_save=\['classifier'\]\)"),
]


@pytest.mark.parametrize("tamper,message", [t[1:] for t in PEFT_TAMPERS], ids=[t[0] for t in PEFT_TAMPERS])
def test_import_peft_refuses_tampered_weights_model_untouched(tmp_path, tamper, message):
    from asymlora.formats.peft import import_peft

    folder = _peft_saved(tmp_path)
    import_peft(tiny_bert(), folder)  # the untampered folder imports
    _rewrite(f"{folder}/{WEIGHTS_NAME}", tamper)
    model = tiny_bert()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=message) as err:
        import_peft(model, folder)
    assert "\n" not in str(err.value)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not lora_layers(model)


def test_import_peft_file_cut_short_is_a_one_line_refusal(tmp_path):
    from asymlora.formats.peft import import_peft

    folder = _peft_saved(tmp_path)
    path = f"{folder}/{WEIGHTS_NAME}"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    model = tiny_bert()
    with pytest.raises(UserError, match=r"is not a readable safetensors file \(damaged or cut short\)"):
        import_peft(model, folder)
    assert not lora_layers(model)


def test_import_peft_accepts_layers_left_out_by_exclude_modules(tmp_path):
    """A layer target_modules matches but exclude_modules removes has no factors: not missing."""
    from asymlora.formats.peft import import_peft

    peft = require("peft")
    skip = "bert.encoder.layer.1.attention.self.value"
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], exclude_modules=[skip])  # peft>=0.14: pinned
    peft.get_peft_model(tiny_bert(), config).save_pretrained(tmp_path / "p")
    model = import_peft(tiny_bert(), str(tmp_path / "p"))
    assert skip not in lora_layers(model) and len(lora_layers(model)) == 3
