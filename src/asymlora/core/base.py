"""The frozen base layers an adapter attaches to: ``nn.Linear`` and transformers' ``Conv1D``
(GPT-2 style, weight stored d_in × d_out). The lowest module of the core: the adapted layer and
the quantized-base support both read a base weight through it."""
from __future__ import annotations

from typing import cast

import torch
from torch import nn

try:  # transformers is a dependency, but the core works on any nn.Module without it.
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = ["is_conv1d", "dense_weight", "weight_of"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (a linear layer with its weight transposed)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as stored (torch types an attribute it does not know as ``Tensor | Module``)."""
    return cast(torch.Tensor, module.weight)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as the (d_out × d_in) matrix of y = W·x, whatever the storage layout."""
    w = weight_of(module)
    return w.T if is_conv1d(module) else w
