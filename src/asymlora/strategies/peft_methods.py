"""PEFT's own methods as strategies ``peft:NAME``, built by PEFT itself (no copy of its code;
the version is pinned in pyproject.toml). Every one goes on the same target modules as ours,
at rank r with alpha = 2r and the task's head in ``modules_to_save`` (PEFT trains a copy of
it, initialised from the same seeded head); PEFT's random draws come from the global RNG,
seeded here per run, so a seed is one draw.

- ``peft:lora``: ``LoraConfig`` (A Kaiming, B zero, both trained) — checks that our ``lora`` is PEFT's;
- ``peft:lora-fa``: the same model, A frozen, trained by PEFT's LoRA-FA optimizer: AdamW on the
  preconditioned gradient (1/s²)·g_B·(A·Aᵀ + δI)⁻¹. Our ``b-only`` freezes an orthonormal A
  instead (A·Aᵀ = I, so the preconditioner would be the identity) and uses plain AdamW;
- ``peft:dora``: weight-decomposed LoRA (a trained magnitude vector per output besides A and B);
- ``peft:rslora``: LoRA scaled by alpha/√r instead of alpha/r;
- ``peft:pissa``: A and B from the principal singular vectors of W0, which is replaced by its residual;
- ``peft:olora``: A and B from a QR decomposition of W0, which is replaced by its residual;
- ``peft:mica``: B frozen at the r *minor* left singular vectors of W0, A zero and trained (the
  asymmetry of b-only reversed: the frozen factor is chosen, not random);
- ``peft:vera``: one pair of frozen random matrices shared by all layers, two trained scaling
  vectors per layer (d_out + r numbers); its rates live about 10× higher (lr_scale 10).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from asymlora.errors import UserError
from asymlora.strategies.base import Adapted, AdaptRequest, Strategy

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["PEFT_STRATEGIES", "apply_peft_config", "peft_strategy", "lorafa_optimizer"]


def _require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UserError("the peft: strategies need PEFT: pip install 'asymlora[peft]'") from None
    return peft


def _targets(model: nn.Module, req: AdaptRequest) -> list[str]:
    """The module names our core would adapt (same layers for every row)."""
    from asymlora.core.inject import find_target_modules

    return list(find_target_modules(model, req.targets, exclude=[req.head] if req.head else []))


def apply_peft_config(model: nn.Module, config: Any, req: AdaptRequest) -> nn.Module:
    """``peft.get_peft_model`` under the run's seed, the head added to ``modules_to_save``."""
    peft = _require_peft()
    if req.head:
        config.modules_to_save = sorted(set(config.modules_to_save or []) | {req.head})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(req.seed)  # PEFT draws from the global RNG: one draw per seed, reproducible
        return peft.get_peft_model(model, config)


def _save(model: nn.Module, folder: str) -> None:
    cast("PeftModel", model).save_pretrained(folder)


def _load(base: nn.Module, folder: str) -> nn.Module:
    peft = _require_peft()
    return peft.PeftModel.from_pretrained(base, folder)


def _lora_config(**extra: Any) -> Callable[[nn.Module, AdaptRequest], Any]:
    def config(model: nn.Module, req: AdaptRequest) -> Any:
        peft = _require_peft()
        return peft.LoraConfig(r=req.rank, lora_alpha=2 * req.rank, lora_dropout=req.dropout,
                               target_modules=_targets(model, req), bias="none", **extra)

    return config


def _vera_config(model: nn.Module, req: AdaptRequest) -> Any:
    """VeRA's shared frozen matrices are rebuilt from the seed on load (``save_projection``
    off: the file holds what it trains, which is VeRA's point); PEFT warns that another
    platform's generator might rebuild them otherwise — the round trip is tested here."""
    import warnings

    peft = _require_peft()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Specified to not save vera_A and vera_B")
        return peft.VeraConfig(r=req.rank, vera_dropout=req.dropout, target_modules=_targets(model, req),
                               projection_prng_key=req.seed, save_projection=False)


def _freeze_lora_a(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)


def lorafa_optimizer(model: nn.Module):
    """``(lr, weight_decay) -> make``, where ``make`` is what ``fit(make_optimizer=…)`` takes:
    PEFT's LoRA-FA optimizer on ``model`` (its r and alpha = 2r read from the model's LoraConfig)."""
    def factory(lr: float, weight_decay: float):
        from peft.optimizers import create_lorafa_optimizer

        def make(_named: Sequence[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
            # model: the PeftModel of this strategy's adapt (peft is optional, so not named in a signature)
            return create_lorafa_optimizer(cast("PeftModel", model), lr=lr, weight_decay=weight_decay)

        return make

    return factory


def peft_strategy(method: str, make_config: Callable[[nn.Module, AdaptRequest], Any], trains: str, same_r: str, *,
                  lr_scale: float = 1.0, mutates_base: bool = False, lora_fa: bool = False) -> Strategy:
    """The strategy ``peft:<method>``: PEFT's model for ``make_config``'s config."""

    def adapt(model: nn.Module, req: AdaptRequest) -> Adapted:
        wrapped = apply_peft_config(model, make_config(model, req), req)
        if not lora_fa:
            return Adapted(wrapped)
        _freeze_lora_a(wrapped)  # frozen before the trainer counts what it trains
        return Adapted(wrapped, lorafa_optimizer(wrapped))

    return Strategy(name=f"peft:{method}", family="peft", trains=trains, same_r=same_r, adapt=adapt, save=_save,
                    load=_load, lr_scale=lr_scale, mutates_base=mutates_base,
                    aliases=(f"peft-{method}",) if method in ("lora", "lora-fa") else ())


_LORA_R = "rank of B·A; r·(d_in + d_out) trained per layer"
PEFT_STRATEGIES = (
    peft_strategy("lora", _lora_config(), "PEFT's LoRA: A (Kaiming) and B (zero), both trained", _LORA_R),
    peft_strategy("lora-fa", _lora_config(), "PEFT's LoRA-FA: A frozen at its Kaiming init, B by the LoRA-FA "
                  "optimizer", "rank of B·A; r·d_out trained per layer", lora_fa=True),
    peft_strategy("dora", _lora_config(use_dora=True), "PEFT's DoRA: A, B and a magnitude per output",
                  "rank of B·A; r·(d_in + d_out) + d_out trained per layer"),
    peft_strategy("rslora", _lora_config(use_rslora=True), "PEFT's rsLoRA: LoRA scaled by alpha/√r", _LORA_R),
    peft_strategy("pissa", _lora_config(init_lora_weights="pissa"), "PEFT's PiSSA: A, B from W0's principal "
                  "singular vectors, W0 its residual", _LORA_R, mutates_base=True),
    peft_strategy("olora", _lora_config(init_lora_weights="olora"), "PEFT's OLoRA: A, B from a QR of W0, W0 its "
                  "residual", _LORA_R, mutates_base=True),
    peft_strategy("mica", _lora_config(init_lora_weights="mica"), "PEFT's MiCA: B frozen at W0's minor singular "
                  "vectors, A (zero) trained", "rank of B·A; r·d_in trained per layer"),
    peft_strategy("vera", _vera_config, "PEFT's VeRA: shared frozen random A, B; two scaling vectors trained",
                  "rank of the shared random matrices; d_out + r trained per layer", lr_scale=10.0),
)
