"""Adapters on quantized bases (bitsandbytes nf4/fp4/LLM.int8, torchao int8 weight-only), on CPU
with tiny Llama models built from a config (no downloads).

Truth used: the naive formula ``y = base(x) + s·B·(A·x)`` with ``base(x)`` checked against
``Ŵ·x`` (``Ŵ`` the dequantized weight) and the closed-form gradient ``∂L/∂B = s·Gᵀ·(X·Aᵀ)``;
PEFT's own outputs on the same quantized base; save/load and float-export round trips.
Models run in train mode (Llama has no dropout): on CPUs with AVX512-BF16, bitsandbytes
switches a 4-bit layer to a bf16 kernel for no-grad eval calls, which is a different function.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import asymlora
from asymlora import AsymLoraConfig, wrap
from asymlora.core import quant
from asymlora.core.inject import lora_layers, merge_adapters
from asymlora.errors import UserError
from asymlora.formats.native import CONFIG_NAME
from conftest import perturb_trained_factors, require, tiny_llama

SCHEMES = ["nf4", "fp4", "int8", "torchao-int8"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _quiet_backends():
    with warnings.catch_warnings():  # bitsandbytes warns on every int8 call that it casts to fp16
        warnings.filterwarnings("ignore", message=".*cast from torch.float32 to float16.*")
        warnings.filterwarnings("ignore", message=".*TorchaoLoraLinear.*")
        yield


def quantized_llama(scheme: str, seed: int = 0):
    return quant.quantize_model(tiny_llama(seed=seed), scheme).train()


def adapted(scheme: str, preset: str = "b-only", r: int = 4, targets=None):
    model = quantized_llama(scheme)
    wrap(model, AsymLoraConfig.preset(preset, r=r, target_modules=targets or ALL_LINEAR))
    perturb_trained_factors(model)
    return model


# ----------------------------------------------------------------------------- forward and gradients
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_model_converts_linears_but_not_the_head(scheme):
    model = quantized_llama(scheme)
    layers = quant.quantized_layers(model)
    assert len(layers) == 2 * 7 and set(layers.values()) == {scheme}
    assert quant.scheme_of(model.lm_head) is None and model.lm_head.weight.dtype == torch.float32
    for name in layers:
        base = model.get_submodule(name)
        w = quant.float_weight(base)
        assert w.shape == (base.out_features, base.in_features) and w.dtype == torch.float32
    if scheme in ("nf4", "fp4"):  # the 4-bit weight is packed: shapes must come from in/out_features
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    kept = quant.quantize_model(tiny_llama(), scheme, skip=["v_proj"])
    assert quant.scheme_of(kept.model.layers[1].self_attn.v_proj) is None


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("preset", ["b-only", "a-only", "lora"])
def test_forward_equals_naive_reference(scheme, preset):
    model = adapted(scheme, preset)
    g = torch.Generator().manual_seed(5)
    for name, layer in lora_layers(model).items():
        x = torch.randn(3, 5, layer.in_features, generator=g)
        a, b = layer.factors("default")
        assert a.dtype == b.dtype == torch.float32  # factors in the compute dtype, never packed
        with torch.no_grad():
            y, base_y = layer(x), layer.base(x)
            w = quant.float_weight(layer.base)
            naive_delta = layer.scaling * (x @ a.T) @ b.T
        # the adapter adds exactly s·B·A·x to whatever the quantized kernel computes ...
        assert torch.allclose(y - base_y, naive_delta, atol=1e-6, rtol=1e-5), name
        # ... and that kernel computes Ŵ·x (LLM.int8 rounds its fp16 inputs: fp16 tolerance)
        tol = 2e-3 if scheme == "int8" else 1e-5
        assert torch.allclose(base_y, F.linear(x, w), atol=tol, rtol=tol), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_step0_equals_quantized_base_exactly(scheme, tokens):
    model = quantized_llama(scheme)
    with torch.no_grad():
        ref = model(tokens).logits
        wrap(model, AsymLoraConfig.preset("b-only", r=4, target_modules=ALL_LINEAR))
        assert torch.equal(model(tokens).logits, ref)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("preset,trained", [("b-only", {"lora_B"}), ("a-only", {"lora_A"}),
                                            ("lora", {"lora_A", "lora_B"})])
def test_gradient_only_to_the_trained_factor(scheme, preset, trained, tokens):
    model = adapted(scheme, preset)
    model(tokens).logits.pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert {n.rsplit(".", 1)[-1] for n in with_grad} == trained
    assert {n for n, p in model.named_parameters() if p.requires_grad} == with_grad
    assert len(with_grad) == 14 * len(trained)
    for layer in lora_layers(model).values():  # the frozen factor is a buffer
        for factor in {"A", "B"} - {t[-1] for t in trained}:
            assert not isinstance(layer.factor("default", factor), torch.nn.Parameter)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_b_gradient_equals_closed_form(scheme):
    """L = Σ G∘y  ⇒  ∂L/∂B = s·Gᵀ·(X·Aᵀ) whatever the base computes."""
    layer = lora_layers(adapted(scheme))["model.layers.0.self_attn.q_proj"]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, layer.in_features, generator=g)
    grad_out = torch.randn(6, layer.out_features, generator=g)
    (layer(x) * grad_out).sum().backward()
    want = layer.scaling * grad_out.T @ (x @ layer.lora_A.T)
    assert torch.allclose(layer.lora_B.grad, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_parameter_report_counts_every_base_weight(scheme):
    want = asymlora.parameter_report(wrap(tiny_llama(), AsymLoraConfig.preset("b-only", r=4)))
    got = asymlora.parameter_report(wrap(quantized_llama(scheme), AsymLoraConfig.preset("b-only", r=4)))
    assert (got.total, got.trainable, got.adapter_frozen) == (want.total, want.trainable, want.adapter_frozen)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fit_trains_B_and_leaves_the_quantized_base_alone(scheme):
    """The training engine on a quantized base: loss goes down, only B moves, Ŵ stays bit-identical."""
    from asymlora.training.loop import TrainArgs, fit

    model = quantized_llama(scheme)
    wrap(model, AsymLoraConfig.preset("b-only", r=4, target_modules=ALL_LINEAR))
    layers = lora_layers(model)
    before = {n: (quant.float_weight(layer.base), layer.lora_A.clone()) for n, layer in layers.items()}
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 9), generator=g)]
    collate = lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]}  # noqa: E731
    res = fit(model, data, collate, TrainArgs(lr=1e-2, max_steps=6, batch_size=8, progress=False,
                                              mixed_precision="no"))
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert res.steps == 6 and losses[-1] < losses[0]
    for n, layer in layers.items():
        assert layer.lora_B.abs().sum() > 0
        assert torch.equal(quant.float_weight(layer.base), before[n][0]) and torch.equal(layer.lora_A, before[n][1])


def test_svd_init_reads_the_dequantized_weight():
    model = quantized_llama("nf4")
    w = quant.float_weight(model.model.layers[0].self_attn.q_proj)
    wrap(model, AsymLoraConfig(r=3, init_A="svd", target_modules=["q_proj"]))
    a = model.model.layers[0].self_attn.q_proj.lora_A
    v = torch.linalg.svd(w.double(), full_matrices=False).Vh[:3]
    assert torch.allclose((a.double() @ v.T).abs(), torch.eye(3, dtype=torch.float64), atol=1e-4)  # same subspace


# ----------------------------------------------------------------------------- files and PEFT
@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_load_round_trip_rebuilds_frozen_A(scheme, tmp_path, tokens):
    model = adapted(scheme)
    with torch.no_grad():
        want = model(tokens).logits
    asymlora.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert all(not e["A"]["stored"] and e["B"]["stored"] for e in meta["layers"].values())  # seed-only A
    loaded = asymlora.load_adapter(quantized_llama(scheme), tmp_path / "adapter")  # fingerprints verified
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, want)
    meta["config"]["seed"] = 1  # a wrong seed rebuilds another A: its fingerprint is refused
    (tmp_path / "adapter" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="seed"):
        asymlora.load_adapter(quantized_llama(scheme), tmp_path / "adapter")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return folder


def from_pretrained_quantized(folder, scheme: str):
    """The way users load a quantized base: transformers' own quantization configs."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

    if scheme == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        qc = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    elif scheme == "int8":
        qc = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, device_map="cpu",
                                                dtype=torch.float32).train()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_peft_export_loads_in_peft_on_the_same_quantized_base(scheme, llama_folder, tmp_path, tokens):
    peft = require("peft")
    model = from_pretrained_quantized(llama_folder, scheme)
    assert set(quant.quantized_layers(model).values()) == {scheme}
    wrap(model, AsymLoraConfig.preset("b-only", r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb_trained_factors(model)
    with torch.no_grad():
        want = model(tokens).logits
    asymlora.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(from_pretrained_quantized(llama_folder, scheme), str(tmp_path / "peft"))
    q_proj = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__.split(".")[-1] in ("bnb", "torchao")  # PEFT's own quantized LoRA layer
    with torch.no_grad():
        got = theirs.train()(tokens).logits
    assert (got - want).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- merging
@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_into_quantized_base_is_refused_before_any_change(scheme, tokens):
    model = adapted(scheme)
    with torch.no_grad():
        want = model(tokens).logits
    for merge in (merge_adapters, asymlora.merge_and_unload,
                  lambda m: lora_layers(m)["model.layers.0.self_attn.q_proj"].merge()):
        with pytest.raises(UserError, match=rf"{quant.describe(scheme).split()[0]}.*dequantize=True"):
            merge(model)
    assert len(lora_layers(model)) == 14 and len(quant.quantized_layers(model)) == 14
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, want)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_float_export_computes_the_adapted_function_and_reloads(scheme, llama_folder, tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    model = from_pretrained_quantized(llama_folder, scheme)
    wrap(model, AsymLoraConfig.preset("lora", r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trained_factors(model)
    with torch.no_grad():
        want = model(tokens).logits
    asymlora.merge_and_unload(model, dequantize=True)
    assert not lora_layers(model) and not quant.quantized_layers(model)  # MLP layers too
    with torch.no_grad():
        assert (model(tokens).logits - want).abs().max().item() <= 1e-5
    model.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "float").train()
    assert not quant.quantized_layers(reloaded)
    with torch.no_grad():
        assert (reloaded(tokens).logits - want).abs().max().item() <= 1e-5


def test_float_weight_undoes_the_bf16_cpu_repacking():
    """bitsandbytes repacks a 4-bit weight (bf16 scales) on the first no-grad eval call on CPUs
    with AVX512-BF16; float_weight must still return Ŵ (up to the bf16 rounding of the scales)."""
    bnb = require("bitsandbytes")

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    w = linear.weight.detach().clone()
    layer = quant.quantize_model(torch.nn.Sequential(linear), "nf4")[0]  # K >= 2 blocks
    # Ŵ by bitsandbytes' own dequantization, before any repacking
    want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    # nf4: 16 levels in [-1, 1] times each block's absmax; half the widest gap (0.72 to 1) is 0.14
    # of the absmax, plus the rounding of the stored scales
    assert 0 < (want - w).abs().max() <= 0.2 * w.abs().max()
    assert torch.equal(quant.float_weight(layer), want)
    # repack the way the first no-grad eval call does on CPUs with AVX512-BF16 (a layout change,
    # done here whatever this CPU has, so the unpacking path always runs)
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    assert torch.allclose(quant.float_weight(layer), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())

    # and where this CPU has the bf16 kernel, the repacking the forward call itself does
    again = torch.nn.Linear(128, 64)
    with torch.no_grad():
        again.weight.copy_(w)
    fresh = quant.quantize_model(torch.nn.Sequential(again), "nf4")[0]
    if bnb.nn.modules.has_avx512bf16():
        fresh.support_avx512bf16_for_cpu = True
        with torch.no_grad():
            fresh.eval()(torch.randn(2, fresh.in_features))
        assert fresh.weight.quant_state.packing_format_for_cpu
        assert torch.allclose(quant.float_weight(fresh), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


# ----------------------------------------------------------------------------- scheme names
def test_scheme_names_checked():
    assert quant.check_scheme(None) is None and quant.check_scheme("none") is None
    for name in SCHEMES:
        assert quant.check_scheme(name) == name
    with pytest.raises(UserError, match=r"--quantize 'int4'.*nf4, fp4, int8, torchao-int8"):
        quant.check_scheme("int4")
