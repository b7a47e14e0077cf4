"""Many named adapters on one base: names/switch/delete, frozen invariants across switches, shared
frozen factors (one buffer per seed), mixed-adapter batches against per-row runs, and PEFT
multi-adapter parity.

Truth for a mixed batch: each row run alone through the model with its adapter set active
(or with adapters disabled for "__base__"); truth for an adapter: a dense reference y = x·(W +
Σ s·B·A)ᵀ, or PEFT's own forward with the same factors.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import asymlora
from asymlora import AsymLoraConfig
from asymlora.core.adapters import (
    active_adapters,
    add_adapter,
    delete_adapter,
    list_adapters,
    set_adapter,
)
from asymlora.core.inject import (
    disable_adapters,
    lora_layers,
    mark_only_adapters_trainable,
    merge_adapters,
    unmerge_adapters,
)
from asymlora.core.layer import BASE_ONLY
from asymlora.core.multi import mixed_batch
from asymlora.errors import UserError
from asymlora.formats.peft import export_peft_adapters
from conftest import tiny_bert, tiny_llama

BUILDERS = {"llama": tiny_llama, "bert": tiny_bert}


def _perturb(model, seed=1):
    """Non-zero trained factors for every adapter (frozen buffers untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _four_adapters(arch: str, targets="all-linear"):
    """default, same-seed b-only "b2", other-seed b-only "b3", "full" (LoRA), "aonly" (random values).
    BERT's "all-linear" is every linear layer but the classifier (pooler included: 2-D input)."""
    if arch == "bert" and targets == "all-linear":
        targets = ["query", "key", "value", "dense"]
    model = asymlora.wrap(BUILDERS[arch](), AsymLoraConfig.preset("b-only", r=4, target_modules=targets))
    add_adapter(model, "b2", AsymLoraConfig.preset("b-only", r=4, target_modules=targets))
    add_adapter(model, "b3", AsymLoraConfig.preset("b-only", r=4, target_modules=targets, seed=7))
    add_adapter(model, "full", AsymLoraConfig.preset("lora", r=2, target_modules=targets, seed=3))
    add_adapter(model, "aonly", AsymLoraConfig.preset("a-only", r=4, target_modules=targets, seed=5))
    _perturb(model)
    return model


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _per_row_reference(model, ids, names):
    rows = []
    active = active_adapters(model)
    for i, name in enumerate(names):
        if name == BASE_ONLY:
            with disable_adapters(model):
                rows.append(_logits(model, ids[i:i + 1]))
        else:
            set_adapter(model, name)
            rows.append(_logits(model, ids[i:i + 1]))
    set_adapter(model, active)
    return torch.cat(rows)


# ------------------------------------------------------------------ names, switch, delete
def test_names_switch_delete(tokens):
    base = tiny_llama()
    model = asymlora.wrap(copy.deepcopy(base), AsymLoraConfig.preset("b-only", r=4))
    add_adapter(model, "other", AsymLoraConfig.preset("lora", r=2, seed=4))
    assert list_adapters(model) == ["default", "other"]
    assert active_adapters(model) == ["default"]
    _perturb(model)
    # "other" alone equals a model wrapped with only that adapter holding the same values
    alone = asymlora.wrap(copy.deepcopy(base), AsymLoraConfig.preset("lora", r=2, seed=4))
    with torch.no_grad():
        for name, layer in lora_layers(alone).items():
            a, b = lora_layers(model)[name].factors("other")
            layer.lora_A.copy_(a), layer.lora_B.copy_(b)
    set_adapter(model, "other")
    assert active_adapters(model) == ["other"]
    assert torch.equal(_logits(model, tokens), _logits(alone, tokens))
    assert torch.equal(next(iter(lora_layers(model).values())).lora_B,
                       next(iter(lora_layers(model).values())).factor("other", "B"))
    delete_adapter(model, "other")          # the active one: the remaining one becomes active
    assert list_adapters(model) == ["default"] and active_adapters(model) == ["default"]
    assert not any("other" in n for n, _ in model.named_parameters())
    with pytest.raises(UserError, match="only adapter"):
        delete_adapter(model, "default")
    with pytest.raises(UserError, match="no adapter named 'nope'"):
        delete_adapter(model, "nope")
    with pytest.raises(UserError, match="already exists"):
        add_adapter(model, "default", AsymLoraConfig.preset("b-only", r=4))
    with pytest.raises(UserError, match="reserved"):
        add_adapter(model, "__base__", AsymLoraConfig.preset("b-only", r=4))
    with pytest.raises(UserError, match="invalid"):
        add_adapter(model, "a.b", AsymLoraConfig.preset("b-only", r=4))
    with pytest.raises(UserError, match="cannot activate"):
        set_adapter(model, "nope")


def test_deleting_default_keeps_other_adapter_outputs(tokens):
    model = _four_adapters("llama")
    ref = _per_row_reference(model, tokens, ["b2", "full"])
    delete_adapter(model, "default")
    assert "default" not in list_adapters(model)
    assert torch.allclose(_per_row_reference(model, tokens, ["b2", "full"]), ref, atol=0, rtol=0)


def test_adapter_on_new_layers_wraps_them_and_leaves_others_base(tokens):
    base = tiny_llama()
    with torch.no_grad():
        ref = base(tokens).logits
    model = asymlora.wrap(base, AsymLoraConfig.preset("b-only", r=2, target_modules=["q_proj"]))
    add_adapter(model, "mlp", AsymLoraConfig.preset("b-only", r=2, target_modules=["down_proj"]))
    names = lora_layers(model)
    assert any(n.endswith("down_proj") for n in names) and any(n.endswith("q_proj") for n in names)
    assert torch.equal(_logits(model, tokens), ref)   # B = 0 everywhere: still the base function
    delete_adapter(model, "mlp")
    assert not any(n.endswith("down_proj") for n in lora_layers(model))


# ------------------------------------------------------------------ frozen invariants
def _check_invariants(model):
    active = set(active_adapters(model))
    param_ids = {id(p) for p in model.parameters()}
    for layer in lora_layers(model).values():
        for name in layer.slots:
            for factor in ("A", "B"):
                t = layer.factor(name, factor)
                if layer.trains(name, factor):
                    assert isinstance(t, nn.Parameter) and t.requires_grad == (name in active)
                else:
                    assert not isinstance(t, nn.Parameter) and id(t) not in param_ids and not t.requires_grad


def test_frozen_factors_stay_frozen_through_every_switch(tokens):
    model = _four_adapters("bert", targets=None)
    frozen_before = {(n, a, f): layer.factor(a, f).clone() for n, layer in lora_layers(model).items()
                     for a in layer.slots for f in "AB" if not layer.trains(a, f)}
    _check_invariants(model)
    for step in (["b2"], ["full", "aonly"], ["default", "b3"], ["aonly"]):
        set_adapter(model, step)
        _check_invariants(model)
        model.train()
        out = model(tokens, labels=torch.tensor([0, 1]))
        out.loss.backward()
        for layer in lora_layers(model).values():
            for name in layer.slots:
                for f in "AB":
                    t = layer.factor(name, f)
                    has_grad = t.grad is not None and bool(t.grad.abs().sum() > 0)
                    assert has_grad == (layer.trains(name, f) and name in step)
        model.zero_grad(set_to_none=True)
        model.eval()
    model.requires_grad_(True)                     # a careless caller unfreezes everything ...
    mark_only_adapters_trainable(model)   # ... and the freezing is re-applied
    _check_invariants(model)
    delete_adapter(model, "b2")
    _check_invariants(model)
    for (n, a, f), value in frozen_before.items():
        if a in lora_layers(model)[n].slots:
            assert torch.equal(lora_layers(model)[n].factor(a, f), value)


def test_several_active_adapters_add_up():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    asymlora.wrap(model, AsymLoraConfig.preset("b-only", r=2, target_modules=["0"]))
    add_adapter(model, "x", AsymLoraConfig.preset("lora", r=3, target_modules=["0"], seed=2))
    _perturb(model)
    set_adapter(model, ["default", "x"])
    layer = model[0]
    dense = layer.base.weight + sum(layer.slots[n].scaling * layer.factor(n, "B") @ layer.factor(n, "A")
                                    for n in ("default", "x"))
    x = torch.randn(4, 6)
    assert torch.allclose(model(x), x @ dense.T + layer.base.bias, atol=1e-6)
    with pytest.raises(AttributeError, match="2 active adapters"):
        _ = layer.lora_A


# ------------------------------------------------------------------ shared frozen factors
def test_one_shared_A_per_seed_buffer_identity_and_memory(tmp_path):
    k = 5
    model = asymlora.wrap(tiny_llama(), AsymLoraConfig.preset("b-only", r=4, target_modules="all-linear"))
    for i in range(1, k):
        add_adapter(model, f"t{i}", AsymLoraConfig.preset("b-only", r=4, target_modules="all-linear"))
    add_adapter(model, "s9", AsymLoraConfig.preset("b-only", r=4, target_modules="all-linear", seed=9))
    layers = lora_layers(model)
    d_in_sum = sum(layer.in_features for layer in layers.values())
    d_out_sum = sum(layer.out_features for layer in layers.values())
    for layer in layers.values():
        a0 = layer.factor("default", "A")
        assert all(layer.factor(f"t{i}", "A") is a0 for i in range(1, k))    # one buffer
        assert layer.factor("s9", "A") is not a0 and not torch.equal(layer.factor("s9", "A"), a0)
    rep = asymlora.parameter_report(model)
    assert rep.adapter_frozen == 2 * 4 * d_in_sum                  # one A per seed per layer
    assert rep.adapter_held == 2 * 4 * d_in_sum + (k + 1) * 4 * d_out_sum   # + one B per adapter
    assert rep.frozen_shared_saving == (k - 1) * 4 * d_in_sum
    assert "shared frozen factors save" in str(rep)
    held = sum(t.numel() for t in model.buffers()) + sum(p.numel() for p in model.parameters())
    plain = tiny_llama()
    plain = sum(t.numel() for t in plain.buffers()) + sum(p.numel() for p in plain.parameters())
    assert held - plain == rep.adapter_held                    # torch's own dedup agrees
    # loading a saved b-only adapter under a new name shares the A already held, without rebuilding
    asymlora.save_adapter(model, tmp_path / "t1", adapter_name="t1")
    asymlora.load_adapter(model, tmp_path / "t1", adapter_name="again")
    for layer in layers.values():
        assert layer.factor("again", "A") is layer.factor("default", "A")
        assert torch.equal(layer.factor("again", "B"), layer.factor("t1", "B"))


def test_sharing_is_verified_by_fingerprint_not_config(tmp_path, monkeypatch):
    """Same seed/init/rank but a different base layer value for svd init: not shared."""
    model = asymlora.wrap(tiny_llama(), AsymLoraConfig(r=2, trainable="B", init_A="svd", target_modules=["q_proj"]))
    other = tiny_llama(seed=5)
    asymlora.wrap(other, AsymLoraConfig(r=2, trainable="B", init_A="svd", target_modules=["q_proj"]))
    asymlora.save_adapter(other, tmp_path / "svd")        # svd A is stored; differs from model's
    asymlora.load_adapter(model, tmp_path / "svd", adapter_name="foreign")
    for name, layer in lora_layers(model).items():
        assert layer.factor("foreign", "A") is not layer.factor("default", "A")
        assert torch.equal(layer.factor("foreign", "A"), lora_layers(other)[name].lora_A)


def test_reloading_a_shared_adapter_with_another_seed_unshares(tmp_path, tokens):
    model = asymlora.wrap(tiny_llama(), AsymLoraConfig.preset("b-only", r=4))
    add_adapter(model, "b2", AsymLoraConfig.preset("b-only", r=4))
    a_default = {n: layer.factor("default", "A").clone() for n, layer in lora_layers(model).items()}
    src = asymlora.wrap(tiny_llama(), AsymLoraConfig.preset("b-only", r=4, seed=11))
    _perturb(src)
    asymlora.save_adapter(src, tmp_path / "s11")
    asymlora.load_adapter(model, tmp_path / "s11", adapter_name="b2")
    for n, layer in lora_layers(model).items():
        assert torch.equal(layer.factor("default", "A"), a_default[n])          # not changed under it
        assert torch.equal(layer.factor("b2", "A"), lora_layers(src)[n].lora_A)
    set_adapter(model, "b2")
    assert torch.allclose(_logits(model, tokens), _logits(src, tokens), atol=1e-6)


# ------------------------------------------------------------------ mixed batches
@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("order", ["interleaved", "grouped"])
def test_mixed_batch_equals_each_row_alone(arch, order):
    model = _four_adapters(arch, targets="all-linear")
    names = ["b2", "full", "default", "__base__", "aonly", "b3", "default", "b2"]
    if order == "grouped":
        names = sorted(names)
    ids = torch.randint(0, 64, (len(names), 7), generator=torch.Generator().manual_seed(5))
    out = _logits(model, ids, adapter_names=names)
    ref = _per_row_reference(model, ids, names)
    assert (out - ref).abs().max() <= 1e-5
    # the routing is gone after the call: a plain forward is the active adapter again
    assert all(layer.router.current is None for layer in lora_layers(model).values())
    assert torch.equal(_logits(model, ids[:1]), _per_row_reference(model, ids[:1], ["default"]))


def test_mixed_batch_half_precision_base_with_float32_trained_factors():
    model = tiny_llama().to(torch.bfloat16)
    asymlora.wrap(model, AsymLoraConfig.preset("b-only", r=4, target_modules="all-linear"))
    add_adapter(model, "b2", AsymLoraConfig.preset("b-only", r=4, target_modules="all-linear"))
    add_adapter(model, "full", AsymLoraConfig.preset("lora", r=2, target_modules="all-linear", seed=3))
    _perturb(model)
    layer = next(iter(lora_layers(model).values()))
    assert layer.factor("b2", "B").dtype == torch.float32 and layer.factor("b2", "A").dtype == torch.bfloat16
    names = ["b2", "full", "default", "b2"]                     # interleaved: gathered path, cast branches
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(4))
    out, ref = _logits(model, ids, adapter_names=names).float(), _per_row_reference(model, ids, names).float()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()  # bf16 rounding of two summation orders


def test_mixed_batch_with_attention_mask_bert():
    model = _four_adapters("bert", targets=None)
    names = ["full", "b3", "default", "aonly"]
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, adapter_names=names).logits
        ref = []
        for i, n in enumerate(names):
            set_adapter(model, n)
            ref.append(model(ids[i:i + 1], attention_mask=mask[i:i + 1]).logits)
    assert (out - torch.cat(ref)).abs().max() <= 1e-5


def test_mixed_batch_generate_matches_per_row_generate():
    model = _four_adapters("llama")
    names = ["aonly", "b2", "__base__", "full"]
    ids = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(3))
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, adapter_names=names, pad_token_id=0)
    for i, name in enumerate(names):
        if name == "__base__":
            with disable_adapters(model):
                alone = model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        else:
            set_adapter(model, name)
            alone = model.generate(ids[i:i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        n = alone.shape[1]                          # a row that hit EOS early is padded in the batch
        assert torch.equal(gen[i, :n], alone[0]) and bool((gen[i, n:] == 0).all())
    # beam search expands each row: names follow their rows
    set_adapter(model, "default")
    beams = model.generate(ids[:2], max_new_tokens=3, num_beams=2, do_sample=False, adapter_names=names[:2],
                           pad_token_id=0)
    set_adapter(model, "b2")
    alone = model.generate(ids[1:2], max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(beams[1:2], alone)


def test_mixed_batch_context_manager_and_errors(tokens):
    model = _four_adapters("llama")
    with mixed_batch(model, ["full", "b2"]):
        out = _logits(model, tokens)
    assert torch.allclose(out, _per_row_reference(model, tokens, ["full", "b2"]), atol=1e-5)
    with pytest.raises(UserError, match="unknown adapter"):
        _logits(model, tokens, adapter_names=["full", "typo"])
    with pytest.raises(UserError, match="one name per row"):
        _logits(model, tokens, adapter_names=["full", "b2", "b3"])
    with pytest.raises(UserError, match="list of adapter names"):
        _logits(model, tokens, adapter_names="full")
    model.train()
    with pytest.raises(UserError, match="inference"):
        model(tokens, adapter_names=["full", "b2"])
    model.eval()
    merge_adapters(model)
    with pytest.raises(UserError, match="merged"):
        _logits(model, tokens, adapter_names=["full", "b2"])
    unmerge_adapters(model)
    # a failed call leaves no routing behind
    assert all(layer.router.current is None for layer in lora_layers(model).values())


def test_merge_a_chosen_adapter(tokens):
    model = _four_adapters("llama")
    want_lora = _per_row_reference(model, tokens, ["full", "full"])
    want_aonly = _per_row_reference(model, tokens, ["aonly", "aonly"])
    merged = asymlora.merge_and_unload(copy.deepcopy(model), adapter_names=["full"])
    assert not lora_layers(merged)
    assert torch.allclose(_logits(merged, tokens), want_lora, atol=1e-5)
    merge_adapters(model, adapter_names=["aonly"])   # "default" stays the active one
    assert torch.allclose(_logits(model, tokens), want_aonly, atol=1e-5)
    unmerge_adapters(model)
    assert torch.allclose(_logits(model, tokens), _per_row_reference(model, tokens, ["default"] * 2), atol=1e-5)


# ------------------------------------------------------------------ files
def test_save_and_load_named_adapters_round_trip(tmp_path):
    model = _four_adapters("llama")
    for name in list_adapters(model):
        asymlora.save_adapter(model, tmp_path / name, adapter_name=name)
    fresh = tiny_llama()
    for name in list_adapters(model):
        asymlora.load_adapter(fresh, tmp_path / name, adapter_name=name)
    assert list_adapters(fresh) == list_adapters(model)
    names = ["b3", "aonly", "default", "full", "b2", "__base__"]
    ids = torch.randint(0, 64, (len(names), 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(fresh, ids, adapter_names=names), _logits(model, ids, adapter_names=names))
    fresh_layer = next(iter(lora_layers(fresh).values()))
    assert fresh_layer.factor("b2", "A") is fresh_layer.factor("default", "A")


def test_peft_multi_adapter_parity(tmp_path):
    from peft import PeftModel

    model = _four_adapters("llama")
    folders = export_peft_adapters(model, tmp_path / "peft")
    assert folders["default"] == str(tmp_path / "peft") and folders["b2"] == str(tmp_path / "peft" / "b2")
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft"))
    for name in list_adapters(model):
        if name != "default":
            peft_model.load_adapter(folders[name], adapter_name=name)
    peft_model.eval()
    names = ["full", "b2", "__base__", "default", "aonly", "b3", "b2", "full"]
    ids = torch.randint(0, 64, (len(names), 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, adapter_names=names).logits
    assert (_logits(model, ids, adapter_names=names) - theirs).abs().max() <= 1e-5
