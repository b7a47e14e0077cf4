"""The weights of the best validation step, kept aside and copied back into the model at the end."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BestWeights:
    """The trainable weights at the best evaluation so far (a CPU copy), for ``restore_best``."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def capture(self, named: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        self.step = step
        self.tensors = {k: p.detach().to("cpu", copy=True).contiguous() for k, p in named}

    def restore(self, model: nn.Module) -> None:
        copy_into(model, self.tensors)


def storage_ptrs(model: nn.Module) -> set[int]:
    """Storage addresses of the parameters and buffers (a sharded parameter: its local shard)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return {storage_ptr(t.to_local() if hasattr(t, "to_local") else t) for t in tensors}


def storage_ptr(t: torch.Tensor) -> int:
    """The data pointer of ``t``'s storage; 0 for a wrapper without one (a torchao quantized weight)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def copy_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (by parameter name) into ``model``'s parameters, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].device, params[k].dtype))
