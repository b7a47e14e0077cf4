"""PEFT's own methods as rows of ``asymlora compare``, built with PEFT itself (no copy of it).

- ``peft-lora``: ``peft.get_peft_model`` with a ``LoraConfig`` on the same target modules,
  rank r, alpha = 2r and dropout as our ``lora``, the classification head in
  ``modules_to_save`` (PEFT trains a copy of it, initialised from the same seeded head). A is
  PEFT's Kaiming-uniform draw from the global RNG, seeded here per run; B starts at zero.
  Same distribution as our ``lora``, another draw: ``peft-lora`` vs ``lora`` checks that our
  LoRA baseline is PEFT's.
- ``peft-lora-fa``: the same model trained by PEFT's LoRA-FA optimizer
  (``peft.optimizers.create_lorafa_optimizer``): A frozen at its Kaiming init, B updated by
  AdamW on the preconditioned gradient (1/s²)·g_B·(A·Aᵀ + δI)⁻¹. Our ``b-only`` freezes an
  orthonormal A instead (A·Aᵀ = I, so the preconditioner would be the identity) and uses plain
  AdamW; with each method at its own learning rate the two rows show what that difference costs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from asymlora.errors import UserError

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["build_peft_model", "lorafa_optimizer_factory", "peft_adapter_params"]


def _require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UserError("strategies peft-lora and peft-lora-fa need PEFT: pip install peft") from None
    return peft


def build_peft_model(model: nn.Module, preset: str, rank: int, seed: int, targets: Sequence[str], head: str,
                     dropout: float = 0.0) -> nn.Module:
    """``model`` (its head already drawn for this seed) wrapped by PEFT for ``preset``
    (``peft-lora`` or ``peft-lora-fa``) on the module names ``targets``. LoRA-FA's A is frozen
    here already, so the trainer sees exactly the parameters the optimizer will update."""
    peft = _require_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=list(targets),
                             modules_to_save=[head], bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # PEFT draws A from the global RNG: one draw per seed, reproducible
        wrapped = peft.get_peft_model(model, config)
    if preset == "peft-lora-fa":
        for name, p in wrapped.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return wrapped


def lorafa_optimizer_factory(model: nn.Module, rank: int, lr: float, weight_decay: float
                             ) -> Callable[[Sequence[tuple[str, nn.Parameter]]], torch.optim.Optimizer]:
    """What ``asymlora.training.loop.fit(make_optimizer=…)`` takes: PEFT's LoRA-FA optimizer on ``model``
    (alpha = 2r, as every strategy here)."""
    _require_peft()
    from peft.optimizers import create_lorafa_optimizer

    def make(_named: Sequence[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        # model: the PeftModel of build_peft_model (peft is optional, so not named in the signature)
        return create_lorafa_optimizer(cast("PeftModel", model), r=rank, lora_alpha=2 * rank, lr=lr,
                                       weight_decay=weight_decay)

    return make


def peft_adapter_params(model: nn.Module) -> int:
    """Trained parameters of the LoRA factors (the head's copy not counted)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n)
