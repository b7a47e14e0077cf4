"""What a strategy is: one object that says how it adapts a model, what it trains, where its
learning rates live, how its cost is counted and what "the same r" means for it.

Every task (compare, sft, train) and every report reads strategies through this interface
only (``asymlora.strategies.registry``); nothing else chooses behaviour by a strategy's name.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["AdaptRequest", "Adapted", "Strategy", "head_parameter_names", "trainable_outside_head", "folder_bytes"]


@dataclass(frozen=True)
class AdaptRequest:
    """What a run asks of a strategy: the rank, the run's seed (every random factor of the
    adapter is drawn from it, so strategies are paired by seed), the target modules as the user
    gave them (None: the architecture's default; a list of names; one regex string) and the
    task's head (a module trained in full beside the adapter, None for a causal LM)."""

    rank: int
    seed: int
    targets: list[str] | str | None = None
    head: str | None = None
    dropout: float = 0.0


@dataclass
class Adapted:
    """A model as a strategy left it: ``model`` (may be a new wrapper around the one given) and
    ``make_optimizer`` (what ``asymlora.training.loop.fit(make_optimizer=…)`` takes; None: AdamW
    on every parameter that requires grad)."""

    model: nn.Module
    make_optimizer: Callable[[float, float], Callable[[Sequence[tuple[str, nn.Parameter]]], torch.optim.Optimizer]] \
        | None = None


def head_parameter_names(model: nn.Module, head: str | None) -> set[str]:
    """Names of the parameters under the head module (also inside a wrapper such as PEFT's
    ``modules_to_save`` copy): a name one of whose dotted components is ``head``'s last one."""
    if not head:
        return set()
    last = head.rsplit(".", 1)[-1]
    return {n for n, _ in model.named_parameters() if last in n.split(".")}


def trainable_outside_head(model: nn.Module, head: str | None) -> int:
    """Trained parameters of the adapter itself: every parameter that requires grad, less the
    head's (which every strategy of a task trains alike)."""
    skip = head_parameter_names(model, head)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in skip)


def folder_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@dataclass(frozen=True)
class Strategy:
    """One strategy of the registry.

    - ``name``: what ``--strategies`` takes (``b-only``, ``peft:dora``, ``mypkg.mod:mine``);
    - ``family``: ``ours`` (asymlora's core), ``peft`` (PEFT's own code), ``user`` or ``baseline``;
    - ``trains``: one line, what it trains (``--help`` and the docs print it);
    - ``same_r``: what rank r means for it, so that rows "at the same r" are read right;
    - ``adapt(model, request) -> Adapted``: adapts a model whose head is already drawn for the
      seed; None for the head-only baseline (no adapter);
    - ``save(model, folder)`` / ``load(base, folder)``: its adapter file as a user keeps it
      (the file size column is the size of that folder);
    - ``lr_scale``: its rates are the protocol's grid times this (VeRA's live ~10× higher);
    - ``train_lr``: ``asymlora train``'s rate for it when ``--lr`` is not given;
    - ``mutates_base``: its init rewrites the frozen weights it adapts (PiSSA, OLoRA): a run
      must own a copy of them;
    - ``reference``: the row the verdicts are against (LoRA)."""

    name: str
    family: str
    trains: str
    same_r: str
    adapt: Callable[[nn.Module, AdaptRequest], Adapted] | None
    save: Callable[[nn.Module, str], Any] | None = None
    load: Callable[[nn.Module, str], nn.Module] | None = None
    lr_scale: float = 1.0
    train_lr: float | None = None
    mutates_base: bool = False
    reference: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def is_adapter(self) -> bool:
        return self.adapt is not None

    def adapter_params(self, model: nn.Module, head: str | None) -> int:
        """Trained parameters of the adapter (the head not counted): counted on the adapted
        model, so each family is counted the same way."""
        return trainable_outside_head(model, head) if self.is_adapter else 0

    def file_bytes(self, model: nn.Module) -> int | None:
        """Size of the adapter folder ``save`` writes for ``model`` (None: no adapter file)."""
        if self.save is None:
            return None
        with tempfile.TemporaryDirectory(prefix="asymlora-size-") as tmp:
            out = os.path.join(tmp, "adapter")
            self.save(model, out)
            return folder_bytes(out)

    def problem(self, scratch: nn.Module, request: AdaptRequest) -> str | None:
        """Why this strategy cannot adapt the model (one line), or None. ``scratch`` is a
        throw-away copy of the model (it is adapted here): a refusal comes before any run, in the
        library's own words."""
        if self.adapt is None:
            return None
        try:
            self.adapt(scratch, request)
        except (ValueError, TypeError, NotImplementedError, KeyError, RuntimeError, ImportError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            return f"strategy {self.name!r} cannot adapt this model: {first}"
        return None
