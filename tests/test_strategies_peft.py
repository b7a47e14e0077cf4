"""PEFT's own methods as strategies (``asymlora.strategies.peft_methods``): the model PEFT builds
is the one our ``lora`` builds (same layers, scaling, head), and our trainer steps it exactly as
a plain loop with PEFT's own optimizer does (same step → same weights within 1e-6), for PEFT's
LoRA under AdamW and for PEFT's LoRA-FA optimizer; a run paused at a rung and resumed from its
checkpoint equals the uninterrupted one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import asymlora
from asymlora.core.inject import lora_layers
from asymlora.strategies import AdaptRequest, get_strategy
from asymlora.training.loop import TrainArgs, fit, linear_warmup_decay, stream_indices
from conftest import require, tiny_bert

peft = require("peft")

TARGETS = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value",
           "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
R, LR, STEPS, BATCH = 4, 5e-3, 6, 8


def _data(n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 64, (n, 10), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([it["input_ids"] for it in items])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.stack([it["labels"] for it in items])}


def _adapt(preset: str, model: torch.nn.Module, seed: int = 0):
    return get_strategy(preset).adapt(model, AdaptRequest(rank=R, seed=seed, targets=TARGETS, head="classifier"))


def _peft_model(preset: str, seed: int = 0) -> torch.nn.Module:
    return _adapt(preset, tiny_bert(seed=1).train(), seed).model


def lorafa_optimizer_factory(model: torch.nn.Module, lr: float, weight_decay: float):
    """What the registry's LoRA-FA entry gives fit for ``model`` (a fresh adaptation's factory,
    bound to this model)."""
    from asymlora.strategies.peft_methods import lorafa_optimizer

    return lorafa_optimizer(model)(lr, weight_decay)


def _args(**kw) -> TrainArgs:
    base = dict(lr=LR, max_steps=STEPS, batch_size=BATCH, seed=3, lr_schedule="linear", warmup_steps=2,
                max_grad_norm=None, mixed_precision="no", progress=False)
    return TrainArgs(**{**base, **kw})


def _own_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list, seed: int) -> None:
    """PEFT's way: forward, backward, optimizer step, schedule step — on the batches fit draws."""
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(STEPS, 2))
    torch.manual_seed(seed)
    model.train()
    for step in range(STEPS):
        idx = stream_indices(len(data), seed, step * BATCH, BATCH)
        loss = model(**_collate([data[int(i)] for i in idx])).loss
        loss.backward()
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_peft_lora_is_our_lora_layout():
    ours = asymlora.wrap(tiny_bert(seed=1), asymlora.AsymLoraConfig.preset("lora", r=R, seed=0,
                                                                           target_modules=["query", "value"],
                                                                           modules_to_save=["classifier"]))
    theirs = _peft_model("peft-lora")
    assert sorted(lora_layers(ours)) == TARGETS
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert sorted(peft_layers) == TARGETS
    for layer in peft_layers.values():
        assert layer.r["default"] == R and layer.scaling["default"] == pytest.approx(2.0)  # alpha = 2r
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B starts at zero, as ours
    # the same number of trained adapter parameters: r·(d_in + d_out) per layer
    assert get_strategy("peft:lora").adapter_params(theirs, "classifier") == sum(R * (32 + 32) for _ in TARGETS)
    head = dict(theirs.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]
    assert head.requires_grad and torch.equal(head, tiny_bert(seed=1).classifier.weight)


def test_peft_lora_draws_a_per_seed_and_leaves_the_global_rng_alone():
    base = tiny_bert(seed=1)
    state = torch.random.get_rng_state()
    a0 = _adapt("peft-lora", base, 0).model
    assert torch.equal(torch.random.get_rng_state(), state)
    a0b, a1 = _peft_model("peft-lora", seed=0), _peft_model("peft-lora", seed=1)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    p0, p0b, p1 = (dict(m.named_parameters())[key] for m in (a0, a0b, a1))
    assert torch.equal(p0, p0b) and not torch.equal(p0, p1)


@pytest.mark.parametrize("preset", ["peft-lora", "peft-lora-fa"])
def test_fit_steps_peft_models_as_peft_own_loop_does(preset):
    data = _data()
    ours, ref = _peft_model(preset), _peft_model(preset)
    before = _trainable(ours)
    if preset == "peft-lora-fa":
        make = lorafa_optimizer_factory(ours, LR, 0.0)
        from peft.optimizers import create_lorafa_optimizer

        opt_ref = create_lorafa_optimizer(ref, lr=LR, weight_decay=0.0)
    else:
        make = None  # fit's own AdamW (betas 0.9/0.999, eps 1e-8), as PEFT's examples use torch's AdamW
        opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.999),
                                    eps=1e-8, weight_decay=0.0)
    fit(ours, data, _collate, _args(), make_optimizer=make)
    _own_loop(ref, opt_ref, data, seed=3)
    got, want = _trainable(ours), _trainable(ref)
    assert got.keys() == want.keys()
    for k in got:
        assert torch.allclose(got[k], want[k], atol=1e-6, rtol=0), k
        assert not torch.equal(got[k], before[k]), f"{k} did not train"
    a_weights = {k: v for k, v in ours.named_parameters() if "lora_A" in k}
    if preset == "peft-lora-fa":  # LoRA-FA keeps A at its init: not trained, not changed
        assert all(not p.requires_grad for p in a_weights.values())
        fresh = dict(_peft_model(preset).named_parameters())
        assert all(torch.equal(p, fresh[k]) for k, p in a_weights.items())
    else:
        assert all(p.requires_grad for p in a_weights.values())


@pytest.mark.parametrize("preset", ["peft-lora-fa", "b-only"])
def test_a_paused_and_resumed_run_equals_the_uninterrupted_one(tmp_path, preset):
    """The lr search trains pilots in segments (pause at a rung, resume from the checkpoint):
    bit for bit the run it would have been — also with LoRA-FA's name-keyed optimizer state."""
    data = _data()

    def build():
        if preset == "b-only":
            return asymlora.wrap(tiny_bert(seed=1).train(), asymlora.AsymLoraConfig.preset(
                "b-only", r=R, seed=0, target_modules=["query", "value"], modules_to_save=["classifier"]))
        return _peft_model(preset)

    def make(model):
        return lorafa_optimizer_factory(model, LR, 0.0) if preset == "peft-lora-fa" else None

    whole = build()
    whole_history = fit(whole, data, _collate, _args(), make_optimizer=make(whole)).history
    first = build()
    res = fit(first, data, _collate, _args(output_dir=str(tmp_path), pause_at=2), make_optimizer=make(first))
    assert res.paused and res.steps == 2
    second = build()  # a fresh process would rebuild the model the same way
    res = fit(second, data, _collate, _args(output_dir=str(tmp_path), resume=True, pause_at=4),
              make_optimizer=make(second))
    assert res.paused and res.steps == 4
    third = build()
    res = fit(third, data, _collate, _args(output_dir=str(tmp_path), resume=True), make_optimizer=make(third))
    assert not res.paused and res.steps == STEPS and [h["step"] for h in res.history] == list(range(1, STEPS + 1))
    got, want = _trainable(third), _trainable(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    np.testing.assert_array_equal([h["loss"] for h in res.history], [h["loss"] for h in whole_history])


def test_pause_at_needs_an_output_dir():
    with pytest.raises(ValueError, match="pause_at"):
        _args(pause_at=2).validate()


def test_peft_lora_trains_exactly_as_our_lora_given_the_same_a():
    """Our ``lora`` and PEFT's differ only in the draw of A (ours is seeded per layer, PEFT's
    comes from the global RNG). Given the same A, fit trains them to the same weights and the
    same outputs: a gap between the two rows of a compare is the draw, not the implementation."""
    data = _data()
    ours = asymlora.wrap(tiny_bert(seed=1).train(), asymlora.AsymLoraConfig.preset(
        "lora", r=R, seed=0, target_modules=["query", "value"], modules_to_save=["classifier"]))
    theirs = _peft_model("peft-lora")
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            a, b = layer.factors(layer.primary)
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(a)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(b)
    fit(ours, data, _collate, _args())
    fit(theirs, data, _collate, _args())
    peft_params = dict(theirs.named_parameters())
    for name, layer in lora_layers(ours).items():
        a, b = layer.factors(layer.primary)
        assert torch.allclose(a, peft_params[f"base_model.model.{name}.lora_A.default.weight"], atol=1e-6)
        assert torch.allclose(b, peft_params[f"base_model.model.{name}.lora_B.default.weight"], atol=1e-6)
        assert torch.count_nonzero(b) > 0
    ours.eval(), theirs.eval()
    batch = _collate(data[:8])
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, theirs(**batch).logits, atol=1e-5)
