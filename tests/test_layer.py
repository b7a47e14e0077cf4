"""LoraLinear and injection: exact identity at step 0, frozen factors stay frozen, gradients
against a dense reference, merge/unmerge, unload, Conv1D, activation memory."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import asymlora
from asymlora import AsymLoraConfig, wrap
from asymlora.core.inject import (
    disable_adapters,
    find_target_modules,
    lora_layers,
    mark_only_adapters_trainable,
    merge_adapters,
    unmerge_adapters,
)
from asymlora.core.layer import LoraLinear
from conftest import MODEL_BUILDERS, perturb_trained_factors, tiny_bert, tiny_gpt2


@pytest.mark.parametrize("arch", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("preset", ["b-only", "a-only", "lora"])
def test_step0_equals_base_exactly(arch, preset, tokens):
    model = MODEL_BUILDERS[arch]()
    with torch.no_grad():
        ref = model(tokens).logits
        wrap(model, AsymLoraConfig.preset(preset, r=4))
        out = model(tokens).logits
    assert torch.equal(out, ref)


def test_default_targets_per_architecture():
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(wrap(tiny_bert(), AsymLoraConfig(r=2)))} == {"query", "value"}
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(wrap(tiny_gpt2(), AsymLoraConfig(r=2)))} == {"c_attn"}
    llama = MODEL_BUILDERS["llama"]()
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(wrap(llama, AsymLoraConfig(r=2)))} == {"q_proj", "v_proj"}


def test_all_linear_and_regex_targets():
    llama = wrap(MODEL_BUILDERS["llama"](), AsymLoraConfig(r=2, target_modules="all-linear"))
    names = set(lora_layers(llama))
    assert "lm_head" not in names and len(names) == 2 * 7
    bert = wrap(tiny_bert(), AsymLoraConfig(r=2, target_modules=r".*layer\.1\..*(query|key)"))
    assert sorted(lora_layers(bert)) == ["bert.encoder.layer.1.attention.self.key",
                                                   "bert.encoder.layer.1.attention.self.query"]


def test_b_only_gradients_only_for_B_and_head():
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("lora_B") or n.startswith("classifier") for n in trainable)
    assert not any("lora_A" in n for n, _ in model.named_parameters())   # A is a buffer
    out = model(torch.randint(0, 64, (2, 5)), labels=torch.tensor([0, 1]))
    out.loss.backward()
    for layer in lora_layers(model).values():
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
        assert layer.lora_A.grad is None and not layer.lora_A.requires_grad
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_frozen_factor_stays_frozen_through_toggles():
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4))
    model.train()
    model.eval()
    with disable_adapters(model):
        pass
    model.requires_grad_(True)                   # a careless caller unfreezes everything
    model.to(torch.float64).to(torch.float32)
    mark_only_adapters_trainable(model)
    for layer in lora_layers(model).values():
        assert "lora_A" in dict(layer.named_buffers()) and not layer.lora_A.requires_grad
        assert isinstance(layer.lora_B, nn.Parameter) and layer.lora_B.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("conv1d", [False, True])
def test_one_blas_call_forward_matches_the_two_step_delta(conv1d):
    """LoraLinear's forward computes out + s·h·Bᵀ in one addmm; outputs and gradients equal the
    two-step out + linear(s·h, B) it replaced (for nn.Linear and transformers' Conv1D)."""
    import torch.nn.functional as F
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(12, 10) if conv1d else nn.Linear(10, 12))
    model = wrap(base, AsymLoraConfig.preset("b-only", r=3, alpha=6, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 10)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1 = model(x1)
    y2 = layer.base(x2) + F.linear(F.linear(x2, layer.lora_A) * layer.scaling, layer.lora_B)
    torch.testing.assert_close(y1, y2)
    (y1 ** 2).sum().backward()
    g1 = layer.lora_B.grad.clone()
    layer.lora_B.grad = None
    (y2 ** 2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(g1, layer.lora_B.grad)


def _naive_forward(x, w, bias, a, b, s):
    """Dense reference: y = x·(W + s·B·A)ᵀ + bias."""
    return x @ (w + s * b @ a).T + bias


@pytest.mark.parametrize("trainable", ["B", "A", "AB"])
def test_gradients_match_dense_reference_float64(trainable):
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double()
    inits = {"B": ("orthogonal", "zero"), "A": ("zero", "orthogonal"), "AB": ("kaiming", "gaussian")}[trainable]
    model = nn.Sequential()
    model.add_module("proj", base)
    wrap(model, AsymLoraConfig(r=3, alpha=6, trainable=trainable, init_A=inits[0], init_B=inits[1],
                               target_modules=["proj"]))
    layer = model.proj
    perturb_trained_factors(model)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    trained = [p for p in layer.parameters(recurse=False)]
    assert len(trained) == len(trainable)

    def fn(x, *factors):
        return torch.func.functional_call(layer, {n: f for n, f in zip(
            [n for n, _ in layer.named_parameters(recurse=False)], factors)}, (x,))

    assert torch.autograd.gradcheck(fn, (x, *trained))
    # and the analytic gradients equal those of the naive dense formula
    y = layer(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *trained], g)
    a = layer.lora_A.detach().clone().requires_grad_(layer.train_A)
    b = layer.lora_B.detach().clone().requires_grad_(layer.train_B)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = _naive_forward(x2, base.weight, base.bias, a, b, layer.scaling)
    ref = torch.autograd.grad(y2, [x2] + [t for t in (a, b) if t.requires_grad], g)
    assert torch.allclose(y, y2)
    for got, want in zip(grads, ref):
        assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_unmerge_round_trip(arch, tokens):
    model = MODEL_BUILDERS[arch]()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrap(model, AsymLoraConfig.preset("lora", r=4))
    perturb_trained_factors(model)
    with torch.no_grad():
        unmerged = model(tokens).logits
        with disable_adapters(model):
            assert not torch.allclose(model(tokens).logits, unmerged)
        merge_adapters(model)
        merged = model(tokens).logits
        assert torch.allclose(merged, unmerged, atol=1e-5)
        unmerge_adapters(model)
        assert torch.allclose(model(tokens).logits, unmerged, atol=1e-6)
    for name, layer in lora_layers(model).items():
        w = base_weights[name + ".weight"]
        assert torch.allclose(layer.base.weight, w, atol=1e-6, rtol=0)
        layer.merge(keep_original=True)
        layer.unmerge()
        assert torch.allclose(layer.base.weight, w, atol=1e-6, rtol=0)
    # exact restoration when the original is kept
    layer = next(iter(lora_layers(model).values()))
    before = layer.base.weight.detach().clone()
    layer.merge(keep_original=True)
    layer.unmerge()
    assert torch.equal(layer.base.weight, before)


def test_conv1d_delta_orientation():
    model = tiny_gpt2()
    wrap(model, AsymLoraConfig.preset("lora", r=2))
    perturb_trained_factors(model)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 32)
    w_dense = layer.base.weight.T + layer.delta_weight()   # (d_out, d_in)
    assert torch.allclose(layer(x), x @ w_dense.T + layer.base.bias, atol=1e-5)


def test_safe_merge_refuses_non_finite():
    model = wrap(tiny_bert(), AsymLoraConfig.preset("lora", r=2))
    layer = next(iter(lora_layers(model).values()))
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    before = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.merge(safe=True)
    assert torch.equal(layer.base.weight, before) and not layer.merged
    with pytest.raises(ValueError, match="NaN/Inf delta"):
        asymlora.merge_and_unload(model)


def test_merge_and_unload_and_unload(tokens):
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4))
    perturb_trained_factors(model)
    with torch.no_grad():
        adapted = model(tokens).logits
    merged = asymlora.merge_and_unload(model)
    assert not lora_layers(merged)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(tokens).logits, adapted, atol=1e-5)

    fresh = tiny_bert()
    with torch.no_grad():
        ref = fresh(tokens).logits
    wrap(fresh, AsymLoraConfig.preset("b-only", r=4))
    perturb_trained_factors(fresh)
    merge_adapters(fresh)
    asymlora.unload(fresh)
    with torch.no_grad():
        assert torch.allclose(fresh(tokens).logits, ref, atol=1e-5)


def test_parameter_report_counts():
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4, modules_to_save=["classifier"]))
    rep = asymlora.parameter_report(model)
    n_layers = 2 * 2                      # two layers × (query, value), each 32 -> 32
    assert rep.adapter_trainable == n_layers * 32 * 4
    assert rep.adapter_frozen == n_layers * 4 * 32
    assert rep.other_trainable == 32 * 3 + 3
    assert rep.trainable == rep.adapter_trainable + rep.other_trainable
    assert "trainable parameters" in str(rep)
    lora = asymlora.parameter_report(wrap(tiny_bert(), AsymLoraConfig.preset("lora", r=4)))
    assert lora.adapter_trainable == 2 * rep.adapter_trainable


def _saved_bytes_of_forward(layer: LoraLinear, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in ``LoraLinear.forward`` itself, the layer's own
    parameters and buffers (W, A, B, bias) excluded: the activations a training step keeps."""
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    y.sum().backward()  # the saved tensors are the ones backward really uses
    return sum(v for k, v in saved.items() if k not in own)


def test_frozen_A_saves_rank_sized_activations_only():
    d_in, r, tokens_ = 256, 4, 64
    x = torch.randn(tokens_, d_in, requires_grad=True)
    b_only = wrap(nn.Sequential(nn.Linear(d_in, d_in)), AsymLoraConfig.preset("b-only", r=r, target_modules=["0"]))[0]
    assert _saved_bytes_of_forward(b_only, x) == tokens_ * r * 4            # A·x only: r floats per token
    lora = wrap(nn.Sequential(nn.Linear(d_in, d_in)), AsymLoraConfig.preset("lora", r=r, target_modules=["0"]))[0]
    assert _saved_bytes_of_forward(lora, x) == tokens_ * (d_in + r) * 4     # + x itself, for A's gradient
    dropped = wrap(nn.Sequential(nn.Linear(d_in, d_in)),
                   AsymLoraConfig.preset("b-only", r=r, dropout=0.1, target_modules=["0"]))[0].train()
    # dropout on the adapter input brings back an x-sized mask (float32 on CPU)
    assert _saved_bytes_of_forward(dropped, x) >= tokens_ * r * 4 + tokens_ * d_in


def test_vit_default_targets_follow_transformers_naming():
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=37, image_size=32, patch_size=8))
    names = {n.rsplit(".", 1)[-1] for n in find_target_modules(vit)}
    assert names in ({"query", "value"}, {"q_proj", "v_proj"})


def test_half_precision_base_keeps_trained_factor_float32(tokens):
    model = MODEL_BUILDERS["llama"]().to(torch.bfloat16)
    with torch.no_grad():
        ref = model(tokens).logits
    wrap(model, AsymLoraConfig.preset("b-only", r=4))
    layer = next(iter(lora_layers(model).values()))
    assert layer.lora_B.dtype == torch.float32 and layer.lora_A.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, ref)
    perturb_trained_factors(model)
    model(tokens).logits.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32
