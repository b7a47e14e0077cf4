"""asymlora's own strategies, built by the adapter core (``asymlora.core``; docs/design.md §1):
an adapted linear map is ``y = W0·x + s·B·A·x`` with s = alpha/r and alpha = 2r (the paper's
choice, so s = 2 for every rank).

- ``lora``: A Kaiming-uniform, B zero, both trained: r·(d_in + d_out) per layer;
- ``b-only``: A random orthonormal and frozen, B zero and trained: r·d_out per layer (the
  paper's recommendation, Zhu et al. 2024, Lemma 4.1: a random orthonormal A keeps the update's
  generalisation bound at r·d_out trained numbers);
- ``a-only``: A zero and trained, B random orthonormal and frozen: r·d_in per layer.
"""
from __future__ import annotations

from torch import nn

from asymlora.strategies.base import Adapted, AdaptRequest, Strategy

__all__ = ["OURS", "core_strategy"]


def _adapt(preset: str):
    def adapt(model: nn.Module, req: AdaptRequest) -> Adapted:
        from asymlora.core.config import AsymLoraConfig
        from asymlora.core.inject import wrap

        cfg = AsymLoraConfig.preset(preset, r=req.rank, seed=req.seed, target_modules=req.targets,
                                    dropout=req.dropout, modules_to_save=[req.head] if req.head else None)
        wrap(model, cfg)
        return Adapted(model)

    return adapt


def _save(model: nn.Module, folder: str) -> None:
    from asymlora.formats.native import save_adapter

    save_adapter(model, folder)


def _load(base: nn.Module, folder: str) -> nn.Module:
    from asymlora.formats.native import load_adapter

    return load_adapter(base, folder)


def core_strategy(preset: str, trains: str, same_r: str, train_lr: float, reference: bool = False) -> Strategy:
    """A strategy of ``asymlora.core.config.PRESETS``: saved in our format (a frozen factor is
    rebuilt from its seed, so only the trained one is stored)."""
    return Strategy(name=preset, family="ours", trains=trains, same_r=same_r, adapt=_adapt(preset), save=_save,
                    load=_load, train_lr=train_lr, reference=reference)


# train_lr: the rates `asymlora compare` chose on validation for the bundled model and fortunes
# under the plateau rule that `asymlora train` uses (constant rate). One rate for all would not
# do: 1e-2 is a-only's best and makes LoRA diverge (45.7 % validation).
OURS = (
    core_strategy("lora", "A (Kaiming) and B (zero), both trained", "rank of B·A; r·(d_in + d_out) trained per layer",
                  train_lr=1e-3, reference=True),
    core_strategy("b-only", "B (zero) trained; A random orthonormal, frozen (the paper's choice)",
                  "rank of B·A; r·d_out trained per layer (b-only@2r matches lora's count when d_in = d_out)",
                  train_lr=3e-3),
    core_strategy("a-only", "A (zero) trained; B random orthonormal, frozen",
                  "rank of B·A; r·d_in trained per layer", train_lr=1e-2),
)
