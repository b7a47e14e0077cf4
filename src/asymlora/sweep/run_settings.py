"""The settings every run of the protocol trains with, whatever its task: the stopping rule's
``TrainArgs`` fields and the precision the runs compute at (docs/design.md)."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["stopping_args", "resolve_precision", "autocast"]


def stopping_args(cfg: Any, pilot: bool, metric: str, higher_is_better: bool = True) -> dict[str, Any]:
    """The ``TrainArgs`` fields of the protocol's stopping rule (shared by compare and sft).

    ``budget``: ``max_steps`` steps, warm-up then a decay of the rate to 0 (``cfg.schedule``: linear, or wsd), the final
    weights kept; pilots validate every ``eval_every`` steps (the lr search and its pruning read
    their curves), the other runs once at the end. ``plateau``: a constant rate, validation
    every ``eval_every`` steps, patience counted from ``min_steps``, best weights restored."""
    warmup = min(cfg.warmup_steps, cfg.max_steps - 1)
    if cfg.stopping == "budget":
        return dict(lr_schedule=cfg.schedule, warmup_steps=warmup,
                    eval_every=cfg.eval_every if pilot else None,
                    restore_best=False, early_stopping_patience=None, early_stopping_metric=None)
    return dict(lr_schedule="constant", warmup_steps=warmup, eval_every=cfg.eval_every, restore_best=True,
                early_stopping_patience=cfg.patience, early_stopping_min_steps=min(cfg.min_steps, cfg.max_steps),
                early_stopping_metric=metric, greater_is_better=higher_is_better,
                early_stopping_min_delta=getattr(cfg, "min_delta", 0.0))


def resolve_precision(mode: str) -> str:
    """compare's "auto": bf16 autocast on a GPU that has it (else fp16) and on CPUs with native
    bf16 matrix instructions (``asymlora.training.loop.cpu_has_native_bf16``), else full fp32. The
    trained factors and the optimizer stay fp32 either way."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "auto"  # fit() picks bf16 or fp16 on the GPU
    from asymlora.training.loop import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "no"


def autocast(precision: str) -> Any:
    """bf16 autocast on the CPU when ``precision`` is bf16 (fit() handles the GPU)."""
    if precision == "bf16" and not torch.cuda.is_available():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
