"""Weighted sums of adapters (``asymlora.merging``): exact for adapters that share their frozen
factor, refused or measured for the others.

Truth: the dense Σ wᵢ·sᵢ·Bᵢ·Aᵢ computed here from the input factors in float64 (never through
``asymlora.merging``), a model whose base weights had that dense sum added (``_dense_reference``),
and PEFT's own loaded model.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import asymlora
from asymlora import AsymLoraConfig
from asymlora.core.adapters import add_adapter, list_adapters, set_adapter
from asymlora.core.inject import lora_layers
from asymlora.core.layer import is_conv1d
from asymlora.errors import UserError
from asymlora.formats.native import load_factors
from asymlora.merging import add_weighted_adapter, save_weighted_adapter
from conftest import require, tiny_bert, tiny_gpt2, tiny_llama

peft = require("peft")


def _perturb(model, seed=1, scale=0.2):
    """Non-zero trained factors for every adapter (frozen buffers untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _delta(layer, name):
    """s·B·A of adapter ``name`` in float64, from the layer's registries."""
    a, b = (t.detach().double() for t in layer.factors(name))
    return layer.slots[name].scaling * (b @ a)


def _wanted(model, names, weights):
    """layer -> Σ wᵢ·ΔWᵢ (float64)."""
    return {ln: sum(w * _delta(layer, n) for n, w in zip(names, weights))
            for ln, layer in lora_layers(model).items() if names[0] in layer.slots}


def _dense_reference(base_builder, deltas):
    """A plain model from ``base_builder`` whose layer weights had ``deltas`` added."""
    ref = base_builder()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for ln, d in deltas.items():
            m = modules[ln]
            m.weight.add_((d.T if is_conv1d(m) else d).to(m.weight.dtype))
    return ref


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def _b_only(arch_builder, names=("t1", "t2", "t3"), targets="all-linear", seed=0, r=4):
    model = asymlora.wrap(arch_builder(), AsymLoraConfig.preset("b-only", r=r, target_modules=targets, seed=seed),
                          adapter_name=names[0])
    for n in names[1:]:
        add_adapter(model, n, AsymLoraConfig.preset("b-only", r=r, target_modules=targets, seed=seed))
    _perturb(model)
    return model


# ------------------------------------------------------------------ exactness in a model
@pytest.mark.parametrize("arch,builder,targets", [("llama", tiny_llama, "all-linear"),
                                                  ("gpt2", tiny_gpt2, ["c_attn", "c_fc"])])
def test_exact_sum_equals_dense_sum_linear_and_conv1d(arch, builder, targets):
    model = _b_only(builder, targets=targets)
    names, weights = ["t1", "t2", "t3"], [0.7, -1.3, 2.0]      # negative: task vectors
    want = _wanted(model, names, weights)
    report = add_weighted_adapter(model, names, weights, "mix")
    layers = lora_layers(model)
    if arch == "gpt2":
        assert all(is_conv1d(layer.base) for layer in layers.values())
    for ln, d in want.items():
        layer = layers[ln]
        assert layer.factor("mix", "A") is layer.factor("t1", "A")            # the one shared buffer
        assert layer.slots["mix"].r == layer.slots["t1"].r                     # no rank growth
        assert (_delta(layer, "mix") - d).abs().max() <= 1e-6 * d.abs().max()
        x = torch.randn(3, layer.in_features)                                 # the layer's function
        set_adapter(model, "mix")
        with torch.no_grad():
            y = layer(x)
        base = layer.base(x)
        assert torch.allclose(y, base + (x.double() @ d.T).float(), atol=1e-5)
    assert report.exact and report.shared == "A" and report.error < 1e-6
    assert max(report.layer_errors.values()) < 1e-6 and set(report.layer_errors) == set(want)
    cfg = model.asymlora_configs["mix"]
    assert cfg.trainable == "B" and cfg.seed == 0 and cfg.r == 4


def test_whole_model_equals_base_plus_dense_sum(tokens):
    model = _b_only(tiny_llama)
    names, weights = ["t1", "t2", "t3"], [0.5, 0.25, -0.75]
    want = _wanted(model, names, weights)
    add_weighted_adapter(model, names, weights, "mix")
    set_adapter(model, "mix")
    ref = _dense_reference(tiny_llama, want)
    assert (_logits(model, tokens) - _logits(ref, tokens)).abs().max() <= 1e-5


def test_naive_factor_averaging_would_fail_this_check():
    """The guard: averaging A and B separately (what PEFT's 'linear' and naive FedAvg do) is not
    Σ wᵢΔWᵢ for LoRA adapters — the comparison above detects it."""
    model = asymlora.wrap(tiny_llama(), AsymLoraConfig.preset("lora", r=4, target_modules=["q_proj"]),
                          adapter_name="l1")
    add_adapter(model, "l2", AsymLoraConfig.preset("lora", r=4, target_modules=["q_proj"], seed=1))
    _perturb(model)
    want = _wanted(model, ["l1", "l2"], [0.5, 0.5])
    for ln, layer in lora_layers(model).items():
        (a1, b1), (a2, b2) = layer.factors("l1"), layer.factors("l2")
        naive = layer.slots["l1"].scaling * ((b1 + b2) / 2).double() @ ((a1 + a2) / 2).double()
        assert (naive - want[ln]).norm() > 0.1 * want[ln].norm()


def test_a_only_adapters_sharing_B_are_exact_too():
    model = asymlora.wrap(tiny_llama(), AsymLoraConfig.preset("a-only", r=4), adapter_name="a1")
    add_adapter(model, "a2", AsymLoraConfig.preset("a-only", r=4))
    _perturb(model)
    want = _wanted(model, ["a1", "a2"], [1.0, 2.0])
    report = add_weighted_adapter(model, ["a1", "a2"], [1.0, 2.0], "mix")
    assert report.shared == "B" and report.error < 1e-6
    for ln, layer in lora_layers(model).items():
        assert layer.factor("mix", "B") is layer.factor("a1", "B")
        assert (_delta(layer, "mix") - want[ln]).abs().max() <= 1e-6 * want[ln].abs().max()


def test_different_alpha_same_A_is_folded_exactly():
    model = asymlora.wrap(tiny_llama(), AsymLoraConfig.preset("b-only", r=4), adapter_name="t1")
    add_adapter(model, "t2", AsymLoraConfig.preset("b-only", r=4, alpha=3.0))
    _perturb(model)
    want = _wanted(model, ["t1", "t2"], [1.0, 1.0])
    report = add_weighted_adapter(model, ["t1", "t2"], [1.0, 1.0], "mix")
    assert report.error < 1e-6
    for ln, layer in lora_layers(model).items():
        assert (_delta(layer, "mix") - want[ln]).abs().max() <= 1e-6 * want[ln].abs().max()


def test_mixed_batch_rows_use_the_combined_adapter_on_the_shared_A():
    """asymlora.core.multi: the combined adapter joins its inputs' A-group, and its rows equal the
    dense reference while the other rows keep their own adapters."""
    model = _b_only(tiny_llama)
    add_adapter(model, "s7", AsymLoraConfig.preset("b-only", r=4, target_modules="all-linear", seed=7))
    _perturb(model, seed=3)
    names, weights = ["t1", "t2"], [1.0, -1.0]
    want = _wanted(model, names, weights)
    add_weighted_adapter(model, names, weights, "diff")
    rows = ["diff", "t1", "s7", "__base__", "diff", "t2"]
    ids = torch.randint(0, 64, (len(rows), 7), generator=torch.Generator().manual_seed(2))
    layer = next(iter(lora_layers(model).values()))
    from asymlora.core.multi import Routing

    groups = Routing(rows).plan(layer, len(rows), ids.device)
    assert sorted(sorted(g.members) for g in groups) == [["diff", "t1", "t2"], ["s7"]]
    out = _logits(model, ids, adapter_names=rows)
    ref = _dense_reference(tiny_llama, want)
    for i, name in enumerate(rows):
        if name == "diff":
            assert (out[i] - _logits(ref, ids[i:i + 1])[0]).abs().max() <= 1e-5
        elif name == "__base__":
            assert (out[i] - _logits(tiny_llama(), ids[i:i + 1])[0]).abs().max() <= 1e-5
        else:
            set_adapter(model, name)
            assert (out[i] - _logits(model, ids[i:i + 1])[0]).abs().max() <= 1e-5


def test_half_precision_model_keeps_shared_A_and_float32_B():
    model = tiny_llama().to(torch.bfloat16)
    asymlora.wrap(model, AsymLoraConfig.preset("b-only", r=4), adapter_name="t1")
    add_adapter(model, "t2", AsymLoraConfig.preset("b-only", r=4))
    _perturb(model)
    want = _wanted(model, ["t1", "t2"], [0.5, 0.5])
    report = add_weighted_adapter(model, ["t1", "t2"], [0.5, 0.5], "avg")
    assert report.error < 1e-6
    for ln, layer in lora_layers(model).items():
        assert layer.factor("avg", "A") is layer.factor("t1", "A") and layer.factor("avg", "A").dtype == torch.bfloat16
        assert layer.factor("avg", "B").dtype == torch.float32
        assert (_delta(layer, "avg") - want[ln]).abs().max() <= 1e-6 * want[ln].abs().max()


# ------------------------------------------------------------------ refusals
def test_refusals_name_the_adapters_that_differ():
    model = _b_only(tiny_llama, names=("t1", "t2"))
    add_adapter(model, "s7", AsymLoraConfig.preset("b-only", r=4, target_modules="all-linear", seed=7))
    add_adapter(model, "full", AsymLoraConfig.preset("lora", r=4, target_modules="all-linear", seed=3))
    add_adapter(model, "aonly", AsymLoraConfig.preset("a-only", r=4, target_modules="all-linear"))
    add_adapter(model, "r2", AsymLoraConfig.preset("b-only", r=2, target_modules="all-linear"))
    add_adapter(model, "q", AsymLoraConfig.preset("b-only", r=4, target_modules=["q_proj"]))
    _perturb(model)
    before = list_adapters(model)
    cases = [
        (["t1", "s7"], r"'s7' has another frozen A than 't1' in 14 of 14 layers"),
        (["t1", "t2", "full"], r"'full' trains A and B \(LoRA\)"),
        (["full", "t1"], r"'full' trains A and B"),
        (["t1", "aonly"], r"'aonly' freezes B but 't1' freezes A"),
        (["t1", "r2"], r"'r2' has another frozen A"),
        (["t1", "q"], r"adapt different layers"),
    ]
    for names, match in cases:
        with pytest.raises(UserError, match=match) as err:
            add_weighted_adapter(model, names, [1.0] * len(names), "new")
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"2 weights \[1.0, 2.0\] for 3 adapters"):
        add_weighted_adapter(model, ["t1", "t2", "t1"], [1.0, 2.0], "new")
    with pytest.raises(UserError, match="not a finite number"):
        add_weighted_adapter(model, ["t1", "t2"], [1.0, math.nan], "new")
    with pytest.raises(UserError, match="unknown adapter"):
        add_weighted_adapter(model, ["t1", "typo"], [1.0, 1.0], "new")
    with pytest.raises(UserError, match="already exists"):
        add_weighted_adapter(model, ["t1", "t2"], [1.0, 1.0], "t2")
    with pytest.raises(UserError, match="needs rank"):
        add_weighted_adapter(model, ["t1", "s7"], [1.0, 1.0], "new", method="svd")
    with pytest.raises(UserError, match="not one of exact, linear, cat, svd"):
        add_weighted_adapter(model, ["t1", "s7"], [1.0, 1.0], "new", method="ties")
    with pytest.raises(UserError, match="sum to 0"):
        add_weighted_adapter(model, ["t1", "t2"], [1.0, -1.0], "new", normalize=True)
    assert list_adapters(model) == before                   # nothing added by a refusal


def test_sharing_is_decided_by_tensors_not_configs():
    """Same config (seed 0), but one A replaced: refused. Different seeds in the configs but the
    same A (svd init ignores the seed): exact."""
    model = _b_only(tiny_llama, names=("t1", "t2"), targets=["q_proj"])
    layer = next(iter(lora_layers(model).values()))
    layer.register_buffer("lora_A_t2", layer.factor("t1", "A").clone() * -1, persistent=True)
    with pytest.raises(UserError, match="'t2' has another frozen A than 't1' in 1 of 2 layers"):
        add_weighted_adapter(model, ["t1", "t2"], [1.0, 1.0], "new")
    svd = asymlora.wrap(tiny_llama(),
                        AsymLoraConfig(r=2, trainable="B", init_A="svd", target_modules=["q_proj"], seed=1),
                        adapter_name="s1")
    add_adapter(svd, "s2", AsymLoraConfig(r=2, trainable="B", init_A="svd", target_modules=["q_proj"], seed=2))
    _perturb(svd)
    report = add_weighted_adapter(svd, ["s1", "s2"], [1.0, 1.0], "sum")
    assert report.shared == "A" and report.error < 1e-6


# ------------------------------------------------------------------ approximate methods
def test_approximate_methods_report_their_error_against_the_dense_sum():
    model = _b_only(tiny_llama, names=("t1",))
    add_adapter(model, "s7", AsymLoraConfig.preset("b-only", r=4, target_modules="all-linear", seed=7))
    add_adapter(model, "full", AsymLoraConfig.preset("lora", r=4, target_modules="all-linear", seed=3))
    _perturb(model)
    names, weights = ["t1", "s7", "full"], [1.0, 0.5, -1.0]
    want = _wanted(model, names, weights)
    for method, rank in (("cat", None), ("svd", 4), ("svd", 12), ("linear", None)):
        name = f"m_{method}{rank or ''}"
        with pytest.warns(UserWarning) if method == "linear" or rank == 4 else _no_warning():
            report = add_weighted_adapter(model, names, weights, name, method=method, rank=rank)
        err2 = ref2 = 0.0
        for ln, layer in lora_layers(model).items():
            e = (_delta(layer, name) - want[ln]).norm() ** 2
            assert math.isclose(report.layer_errors[ln], math.sqrt(e / want[ln].norm() ** 2),
                                rel_tol=1e-6, abs_tol=1e-9)
            err2, ref2 = err2 + e, ref2 + want[ln].norm() ** 2
            assert layer.slots[name].r == {"cat": 12, "svd": rank, "linear": 4}[method]
        assert math.isclose(report.error, math.sqrt(err2 / ref2), rel_tol=1e-6, abs_tol=1e-9)
        if method == "cat" or rank == 12:        # rank 12 holds the whole sum: exact up to rounding
            assert report.error < 1e-6
        else:
            assert report.error > 0.05
    # svd to rank k is the best rank-k approximation: its error is the tail of the singular values
    for ln, layer in lora_layers(model).items():
        s = torch.linalg.svdvals(want[ln])
        assert math.isclose(_rel(layer, "m_svd4", want[ln]), float(s[4:].norm() / s.norm()), rel_tol=1e-5)


def _rel(layer, name, want):
    return float((_delta(layer, name) - want).norm() / want.norm())


class _no_warning:
    """A block in which a UserWarning is an error."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


# ------------------------------------------------------------------ folders, FedAvg, PEFT
def _save_clients(tmp_path, preset, k=3, seeds=None, targets=None, **extra):
    """K client adapters of ``preset`` on tiny BERT, each trained (perturbed) differently."""
    folders = []
    for i in range(k):
        cfg = AsymLoraConfig.preset(preset, r=4, seed=(seeds or [0] * k)[i], target_modules=targets, **extra)
        model = asymlora.wrap(tiny_bert(), cfg)
        _perturb(model, seed=10 + i)
        folders.append(asymlora.save_adapter(model, tmp_path / f"{preset}-{i}"))
    return folders


def _folder_deltas(folder):
    meta = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    return {ln: meta["layers"][ln]["scaling"] * (b.double() @ a.double())
            for ln, (a, b) in load_factors(folder).items()}


def test_federated_average_of_b_only_clients_is_the_mean_delta(tmp_path, capsys):
    folders = _save_clients(tmp_path, "b-only")
    counts = [120, 50, 30]
    report = save_weighted_adapter(folders, counts, tmp_path / "avg", normalize=True)
    print(report)
    assert "overall" in capsys.readouterr().out
    assert report.weights == pytest.approx([0.6, 0.25, 0.15])
    got = _folder_deltas(tmp_path / "avg")
    clients = [_folder_deltas(f) for f in folders]
    for ln, d in got.items():
        mean = sum(n * c[ln] for n, c in zip(counts, clients)) / sum(counts)
        assert (d - mean).abs().max() <= 1e-6
    meta = json.loads((tmp_path / "avg" / "adapter_config.json").read_text())
    assert meta["config"]["trainable"] == "B" and not any(e["A"]["stored"] for e in meta["layers"].values())
    assert meta["weighted_sum"]["exact"] and meta["weighted_sum"]["method"] == "exact"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_naive_fedavg_of_lora_clients_reports_its_error(tmp_path, capsys):
    folders = _save_clients(tmp_path, "lora", seeds=[0, 1, 2])
    counts = [120, 50, 30]
    with pytest.raises(UserError, match="trains A and B"):
        save_weighted_adapter(folders, counts, tmp_path / "exact", normalize=True)
    assert not (tmp_path / "exact").exists()
    with pytest.warns(UserWarning, match="relative dW error"):
        report = save_weighted_adapter(folders, counts, tmp_path / "naive", normalize=True, method="linear")
    print(report)
    out = capsys.readouterr().out
    clients = [_folder_deltas(f) for f in folders]
    got = _folder_deltas(tmp_path / "naive")
    err2 = ref2 = 0.0
    for ln, d in got.items():
        mean = sum(n * c[ln] for n, c in zip(counts, clients)) / sum(counts)
        a = sum(n * load_factors(f)[ln][0].double() for n, f in zip(counts, folders)) / sum(counts)
        b = sum(n * load_factors(f)[ln][1].double() for n, f in zip(counts, folders)) / sum(counts)
        s = json.loads(open(os.path.join(folders[0], "adapter_config.json")).read())["layers"][ln]["scaling"]
        assert (d - s * b @ a).abs().max() <= 1e-6                  # it is the naive FedAvg ...
        err2, ref2 = err2 + float((d - mean).norm() ** 2), ref2 + float(mean.norm() ** 2)
    assert math.isclose(report.error, math.sqrt(err2 / ref2), rel_tol=1e-5)  # ... and its error is measured
    assert report.error > 0.1 and f"overall {report.error:.3g}" in out


def test_folder_refusals_before_any_work(tmp_path):
    b_only = _save_clients(tmp_path, "b-only", k=2)
    other_seed = _save_clients(tmp_path / "s", "b-only", k=1, seeds=[5])
    with pytest.raises(UserError, match="has another frozen A than"):
        save_weighted_adapter(b_only + other_seed, [1, 1, 1], tmp_path / "o1")
    with pytest.raises(UserError, match="already exists and is not empty"):
        save_weighted_adapter(b_only, [1, 1], b_only[0])
    with pytest.raises(UserError, match="name one folder twice"):
        save_weighted_adapter([b_only[0], b_only[0]], [1, 1], tmp_path / "o2")
    with pytest.raises(UserError, match="not an adapter folder"):
        save_weighted_adapter([b_only[0], str(tmp_path)], [1, 1], tmp_path / "o3")
    heads = _save_clients(tmp_path / "h", "b-only", k=2, modules_to_save=["classifier"])
    with pytest.raises(UserError, match="carry modules_to_save"):
        save_weighted_adapter(heads, [1, 1], tmp_path / "o4")
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()


def test_modules_to_save_weighted_or_dropped(tmp_path):
    heads = _save_clients(tmp_path, "b-only", k=2, modules_to_save=["classifier"])
    save_weighted_adapter(heads, [3, 1], tmp_path / "w", normalize=True, modules_to_save="weighted")
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "w" / "adapter_model.safetensors"))
    ins = [load_file(os.path.join(h, "adapter_model.safetensors")) for h in heads]
    for key in ("saved.classifier.weight", "saved.classifier.bias"):
        assert torch.allclose(got[key], 0.75 * ins[0][key] + 0.25 * ins[1][key], atol=1e-7)
    model = asymlora.load_adapter(tiny_bert(seed=3), tmp_path / "w")       # loads, head included
    assert torch.allclose(model.classifier.weight, got["saved.classifier.weight"])
    save_weighted_adapter(heads, [3, 1], tmp_path / "d", normalize=True, modules_to_save="drop")
    meta = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    assert meta["config"]["modules_to_save"] == []
    assert not any(k.startswith("saved.") for k in load_file(str(tmp_path / "d" / "adapter_model.safetensors")))


@pytest.mark.parametrize("method", ["exact", "svd"])
def test_saved_result_loads_and_exports_to_peft_with_the_same_outputs(tmp_path, tokens, method):
    seeds = [0, 0, 0] if method == "exact" else [0, 4, 8]
    folders = _save_clients(tmp_path, "b-only", seeds=seeds)
    weights = [1.0, -0.5, 0.25]
    kw = {"rank": 12} if method == "svd" else {}                # rank 12 = 3 x 4 holds the whole sum
    save_weighted_adapter(folders, weights, tmp_path / "out", method=method, **kw)
    clients = [_folder_deltas(f) for f in folders]
    want = {ln: sum(w * c[ln] for w, c in zip(weights, clients)) for ln in clients[0]}
    ref = _dense_reference(tiny_bert, want)
    ours = asymlora.load_adapter(tiny_bert(), tmp_path / "out")
    assert (_logits(ours, tokens) - _logits(ref, tokens)).abs().max() <= 1e-5
    # export with the existing converter; PEFT's own model computes the same function
    from asymlora.cli.main import main

    assert main(["export", str(tmp_path / "out"), "-o", str(tmp_path / "peft")]) == 0
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "peft")).eval()
    assert (_logits(theirs, tokens) - _logits(ref, tokens)).abs().max() <= 1e-5
    # and loading the result next to its inputs: the exact one shares their A buffer
    model = asymlora.load_adapter(tiny_bert(), folders[0], adapter_name="c0")
    asymlora.load_adapter(model, tmp_path / "out", adapter_name="sum")
    layer = next(iter(lora_layers(model).values()))
    assert (layer.factor("sum", "A") is layer.factor("c0", "A")) == (method == "exact")


def test_in_model_result_saves_and_reloads(tmp_path, tokens):
    model = _b_only(tiny_gpt2, targets=["c_attn"])
    add_weighted_adapter(model, ["t1", "t2", "t3"], [1, 1, 1], "sum", normalize=True)
    set_adapter(model, "sum")
    want = _logits(model, tokens)
    asymlora.save_adapter(model, tmp_path / "sum", adapter_name="sum")
    again = asymlora.load_adapter(tiny_gpt2(), tmp_path / "sum")
    assert torch.equal(_logits(again, tokens), want)
    asymlora.export_peft(model, tmp_path / "peft", adapter_name="sum")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "peft")).eval()
    assert (_logits(theirs, tokens) - want).abs().max() <= 1e-5


# ------------------------------------------------------------------ CLI
def test_cli_merge(tmp_path, capsys):
    from asymlora.cli.main import main

    folders = _save_clients(tmp_path, "b-only", k=2)
    assert main(["merge", *folders, "--weights", "3,1", "--normalize", "-o", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "exact (shared frozen A)" in out and "overall" in out
    got, clients = _folder_deltas(tmp_path / "m"), [_folder_deltas(f) for f in folders]
    for ln, d in got.items():
        assert (d - (0.75 * clients[0][ln] + 0.25 * clients[1][ln])).abs().max() <= 1e-6
    # default weights: the mean; spaces as well as commas
    assert main(["merge", *folders, "--weights", "0.5", "0.5", "-o", str(tmp_path / "m2")]) == 0
    assert main(["merge", *folders, "-o", str(tmp_path / "m3")]) == 0
    for m in ("m2", "m3"):
        for ln, d in _folder_deltas(tmp_path / m).items():
            assert (d - (0.5 * clients[0][ln] + 0.5 * clients[1][ln])).abs().max() <= 1e-6
    # a negative weight (a task vector difference), given as its own token
    assert main(["merge", *folders, "--weights", "1", "-1", "-o", str(tmp_path / "diff")]) == 0
    for ln, d in _folder_deltas(tmp_path / "diff").items():
        assert (d - (clients[0][ln] - clients[1][ln])).abs().max() <= 1e-6


@pytest.mark.parametrize("args,match", [
    (["--weights", "1"], r"--weights has 1 value \[1.0\] for 2 adapters"),
    (["--weights", "1,x"], r"--weights/-w: '1,x': expected numbers"),
    (["--weights", "1,inf"], r"--weights inf is not a finite number"),
    (["--method", "ties"], r"--method: invalid choice: 'ties'"),
    (["--method", "svd"], r"--method svd needs --rank K"),
    (["--rank", "4"], r"--rank is only used by --method svd"),
    (["--modules-to-save", "keep"], r"--modules-to-save: invalid choice"),
    ([], r"--output-dir/-o DIR is required"),
])
def test_cli_merge_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, match):
    import re

    from asymlora.cli.main import main

    folders = _save_clients(tmp_path, "b-only", k=2)
    out = [] if args == [] else ["-o", str(tmp_path / "out")]
    assert main(["merge", *folders, *args, *out]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_merge_refusal_and_missing_folder(tmp_path, capsys):
    from asymlora.cli.main import main

    folders = _save_clients(tmp_path, "lora", k=2, seeds=[0, 1])
    assert main(["merge", *folders, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "trains A and B" in err and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert main(["merge", folders[0], str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not an adapter folder" in err and not (tmp_path / "out").exists()
    assert main(["merge", *folders, "--method", "svd", "--rank", "8", "-o", str(tmp_path / "out")]) == 0
    assert "approximate" in capsys.readouterr().out
