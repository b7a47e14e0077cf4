"""Adapter files: round trip through a fresh process, seed-only frozen factors, tamper checks,
PEFT export that PEFT itself loads with the same outputs, and PEFT import."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from asymlora import AsymLoraConfig, load_adapter, save_adapter, wrap
from asymlora.core.init import single_thread
from asymlora.core.inject import lora_layers
from asymlora.errors import UserError
from asymlora.formats.native import CONFIG_NAME, WEIGHTS_NAME, load_factors
from asymlora.formats.peft import export_peft, import_peft
from conftest import MODEL_BUILDERS, perturb_trained_factors, require, tiny_bert

_CHILD = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import asymlora
from conftest import MODEL_BUILDERS
model = MODEL_BUILDERS[{arch!r}](seed=0)
asymlora.load_adapter(model, {path!r})
tokens = torch.load({tokens!r})
torch.set_num_threads(1)  # as the parent: a BLAS that picks its thread count by load rounds differently
with torch.no_grad():
    torch.save(model(tokens).logits, {out!r})
"""


@pytest.mark.parametrize("arch,preset", [("bert", "b-only"), ("gpt2", "a-only"), ("llama", "lora")])
def test_save_fresh_process_load_identical(tmp_path, tokens, arch, preset):
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    model = wrap(MODEL_BUILDERS[arch](seed=0), AsymLoraConfig.preset(preset, r=4, seed=5, **extra))
    perturb_trained_factors(model)
    if arch == "bert":
        with torch.no_grad():
            model.classifier.weight.mul_(3.0)
    with torch.no_grad(), single_thread():
        want = model(tokens).logits
    save_adapter(model, tmp_path / "ad")
    torch.save(tokens, tmp_path / "tokens.pt")
    code = _CHILD.format(tests=os.path.dirname(__file__), arch=arch, path=str(tmp_path / "ad"),
                         tokens=str(tmp_path / "tokens.pt"), out=str(tmp_path / "out.pt"))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)


def test_format_version_1_folder_loads_identically(tmp_path, tokens):
    """A folder as asymlora 0.1.0 wrote it (format_version 1, the config's factor choice under the
    key "train") loads into the same model as the version-2 folder saved from the same weights."""
    model = wrap(tiny_bert(), AsymLoraConfig.preset("a-only", r=4, seed=5, modules_to_save=["classifier"]))
    perturb_trained_factors(model)
    save_adapter(model, tmp_path / "v2")
    meta = json.loads((tmp_path / "v2" / CONFIG_NAME).read_text())
    assert meta["format_version"] == 2 and meta["config"]["trainable"] == "A" and "train" not in meta["config"]
    old = tmp_path / "v1"
    old.mkdir()
    (old / WEIGHTS_NAME).write_bytes((tmp_path / "v2" / WEIGHTS_NAME).read_bytes())
    meta["format_version"] = 1
    meta["config"] = {("train" if k == "trainable" else k): v for k, v in meta["config"].items()}
    (old / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    new_model, old_model = load_adapter(tiny_bert(), tmp_path / "v2"), load_adapter(tiny_bert(), old)
    with torch.no_grad():
        assert torch.equal(old_model(tokens).logits, new_model(tokens).logits)
    assert {k: v for k, v in old_model.state_dict().items()}.keys() == new_model.state_dict().keys()
    for k, v in new_model.state_dict().items():
        assert torch.equal(old_model.state_dict()[k], v), k
    assert [p.requires_grad for p in old_model.parameters()] == [p.requires_grad for p in new_model.parameters()]


def test_seed_only_A_not_stored_and_file_half_size(tmp_path):
    torch.manual_seed(0)
    model = wrap(MODEL_BUILDERS["llama"](), AsymLoraConfig.preset("b-only", r=8, target_modules="all-linear"))
    perturb_trained_factors(model)
    save_adapter(model, tmp_path / "seed")
    save_adapter(model, tmp_path / "full", store_frozen=True)
    meta = json.loads((tmp_path / "seed" / CONFIG_NAME).read_text())
    assert all(not e["A"]["stored"] and e["B"]["stored"] for e in meta["layers"].values())
    small = os.path.getsize(tmp_path / "seed" / WEIGHTS_NAME)
    big = os.path.getsize(tmp_path / "full" / WEIGHTS_NAME)
    # the llama's linear layers have d_in ≈ d_out on average here, so A and B are about the same size
    assert 0.40 < small / big < 0.60
    a_seed = load_factors(tmp_path / "seed")
    a_full = load_factors(tmp_path / "full")
    for name in a_seed:
        assert torch.equal(a_seed[name][0], a_full[name][0]) and torch.equal(a_seed[name][1], a_full[name][1])


def _tamper(path, fn):
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def test_tampered_seed_refused(tmp_path):
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4, seed=1))
    save_adapter(model, tmp_path / "ad")
    _tamper(tmp_path / "ad" / CONFIG_NAME, lambda m: m["config"].__setitem__("seed", 2))
    with pytest.raises(ValueError, match="says seed=2 but .* was saved with seed=1"):
        load_adapter(tiny_bert(), tmp_path / "ad")


def test_tampered_shape_refused(tmp_path):
    model = wrap(tiny_bert(), AsymLoraConfig.preset("lora", r=4))
    save_adapter(model, tmp_path / "ad")
    name = next(iter(lora_layers(model)))
    _tamper(tmp_path / "ad" / CONFIG_NAME, lambda m: m["layers"][name].__setitem__("r", 3))
    with pytest.raises(ValueError, match=r"says r=4 but layer .* was saved with r=3"):
        load_adapter(tiny_bert(), tmp_path / "ad")
    save_adapter(model, tmp_path / "ad2")
    _tamper(tmp_path / "ad2" / CONFIG_NAME, lambda m: m["layers"][name].__setitem__("in_features", 16))
    # the stored A of that layer is r x in_features = 4 x 32 (the tiny BERT's hidden size)
    with pytest.raises(UserError, match=rf"tensor '{re.escape(name)}\.lora_A' has shape \(4, 32\), expected "
                                        rf"\(4, 16\) \(adapter_config\.json: layer '{re.escape(name)}' at r=4\)"):
        load_adapter(tiny_bert(), tmp_path / "ad2")


def test_wrong_base_model_refused(tmp_path):
    save_adapter(wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4)), tmp_path / "ad")
    with pytest.raises(ValueError, match="does not exist in LlamaForCausalLM"):
        load_adapter(MODEL_BUILDERS["llama"](), tmp_path / "ad")


def test_never_unpickles(tmp_path):
    save_adapter(wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4)), tmp_path / "ad")
    os.remove(tmp_path / "ad" / WEIGHTS_NAME)
    torch.save({}, tmp_path / "ad" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        load_adapter(tiny_bert(), tmp_path / "ad")


def test_svd_factor_is_stored(tmp_path, tokens):
    model = wrap(tiny_bert(), AsymLoraConfig(r=4, trainable="B", init_A="svd", init_B="zero"))
    perturb_trained_factors(model)
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert all(e["A"]["stored"] for e in meta["layers"].values())
    fresh = load_adapter(tiny_bert(), tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, model(tokens).logits)


def test_load_onto_already_wrapped_model(tmp_path, tokens):
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4))
    perturb_trained_factors(model)
    save_adapter(model, tmp_path / "ad")
    other = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4))
    load_adapter(other, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(other(tokens).logits, model(tokens).logits)


def test_rank_pattern_round_trip(tmp_path, tokens):
    cfg = AsymLoraConfig.preset("b-only", r=4, rank_pattern={r"layer\.0": 2})
    model = wrap(tiny_bert(), cfg)
    perturb_trained_factors(model)
    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(tiny_bert(), tmp_path / "ad")
    assert {layer.r for layer in lora_layers(fresh).values()} == {2, 4}
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, model(tokens).logits)


# ------------------------------------------------------------------------------------ PEFT
@pytest.fixture
def peft():
    """PEFT, for the tests below only: without it the adapter-file tests above still run."""
    return require("peft")


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("preset,scaling", [("b-only", "standard"), ("lora", "rslora")])
def test_export_loads_in_peft_with_same_outputs(tmp_path, tokens, arch, preset, scaling, peft):
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    cfg = AsymLoraConfig.preset(preset, r=4, scaling=scaling, rank_pattern={r"(layers?|h)\.1": 2}, **extra)
    model = wrap(MODEL_BUILDERS[arch](seed=0), cfg)
    perturb_trained_factors(model)
    if arch == "bert":
        with torch.no_grad():
            model.classifier.bias.add_(1.0)
    with torch.no_grad():
        want = model(tokens).logits
    export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(MODEL_BUILDERS[arch](seed=0), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = loaded(tokens).logits
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_import_peft_adapter(tmp_path, tokens, arch, peft):
    targets = ["query", "value"] if arch == "bert" else ["c_attn"]
    extra = {"modules_to_save": ["classifier"]} if arch == "bert" else {}
    lcfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                           rank_pattern={targets[-1]: 2} if arch == "bert" else {},
                           fan_in_fan_out=arch == "gpt2", **extra)
    pm = peft.get_peft_model(MODEL_BUILDERS[arch](seed=0), lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.eval()
    with torch.no_grad():
        want = pm(tokens).logits
    pm.save_pretrained(tmp_path / "peft")
    model = import_peft(MODEL_BUILDERS[arch](seed=0), tmp_path / "peft", trainable="B")
    with torch.no_grad():
        got = model(tokens).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert all(not layer.train_A and layer.train_B for layer in lora_layers(model).values())


def test_cli_export_converts_without_base_model(tmp_path, tokens, peft):
    from asymlora.cli.main import main

    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4, modules_to_save=["classifier"]))
    perturb_trained_factors(model)
    with torch.no_grad():
        want = model(tokens).logits
    save_adapter(model, tmp_path / "ad")
    assert main(["export", str(tmp_path / "ad"), "--out", str(tmp_path / "peft")]) == 0
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert (loaded(tokens).logits - want).abs().max().item() <= 1e-5
