"""The settings every run of the protocol trains with, whatever its task: the stopping rule's
``TrainArgs`` fields and the precision the runs compute at (docs/design.md)."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from asymlora.precision import cpu_precision

__all__ = ["stopping_args", "resolve_precision", "precision_settings", "describe_precision", "autocast", "run_copy"]


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
    """compare's "auto": bf16 autocast on a GPU that has it (else fp16), and on a CPU where a
    short probe measures bf16 clearly faster than fp32 (``asymlora.precision.cpu_precision``), else
    full fp32. The trained factors and the optimizer stay fp32 either way."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "auto"  # fit() picks bf16 or fp16 on the GPU
    return cpu_precision().precision


def precision_settings(mode: str) -> dict[str, Any]:
    """What a sweep's results.json records of its precision: the mode asked for, the one used, and,
    when "auto" decided on a CPU, the measured bf16 speed-up and the reason for the choice."""
    used = resolve_precision(mode)
    probe = cpu_precision().as_record() if mode == "auto" and not torch.cuda.is_available() else None
    return {"mixed_precision": mode, "precision_used": used, "precision_probe": probe}


def describe_precision(mode: str) -> str:
    """The precision runs compute at, for a sweep's first line."""
    if mode == "auto" and not torch.cuda.is_available():
        return cpu_precision().describe()
    used = resolve_precision(mode)
    return {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(used, "bf16/fp16 autocast on the GPU")


def autocast(precision: str) -> Any:
    """bf16 autocast on the CPU when ``precision`` is bf16 (fit() handles the GPU)."""
    if precision == "bf16" and not torch.cuda.is_available():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


_Model = TypeVar("_Model", bound=nn.Module)


def run_copy(base: _Model, private: Sequence[str] = ()) -> _Model:
    """The model one run trains: a deep copy of ``base`` whose plain float parameters share their
    storage with ``base``'s, except those under the submodules named in ``private`` (copied
    for real: e.g. a classification head that the run re-initialises in place).

    A sweep worker keeps the base model for all its runs; a full deep copy per run held every
    frozen weight twice (SmolLM2-135M: 0.5 GB). Shared parameters are new ``Parameter`` objects
    (so ``requires_grad`` and ``.to(device)`` stay the run's own) over the base's storage, and are
    frozen: no run writes to a frozen base weight (the adapters hold everything trained, and
    ``asymlora.training.loop.fit`` only updates parameters that require grad). Quantized or otherwise
    wrapped parameters are copied for real. Tied weights stay tied (one ``Parameter`` per base one)."""
    private_ids = {id(p) for name in private for p in base.get_submodule(name).parameters()}
    memo: dict[int, Any] = {}
    for p in base.parameters():
        if id(p) in memo or id(p) in private_ids:
            continue
        if type(p) is nn.Parameter and type(p.data) is torch.Tensor and p.dtype.is_floating_point:
            memo[id(p)] = nn.Parameter(p.data, requires_grad=False)
    return copy.deepcopy(base, memo)
