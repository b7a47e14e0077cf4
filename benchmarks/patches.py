"""The proposed ``LoraLinear.forward`` (not applied to the library; measured here).

Current forward (src/asymlora/layer.py)::

    out = self.base(x)
    h = F.linear(self.dropout(x).to(a.dtype), a)
    delta = F.linear(h * self.scaling, b)          # (..., d_out) temporary
    return out + delta.to(out.dtype)               # second (..., d_out) tensor + a full pass

Proposed: when ``out`` and ``B`` share a dtype, compute ``out + s·h·Bᵀ`` with one
``torch.addmm`` (the scaling is the BLAS ``alpha``; the sum is the BLAS ``beta·C`` term), so the
(..., d_out) delta is never materialised and the elementwise add and scalar multiply disappear.
Autograd of ``addmm`` saves ``h`` (r numbers per token) for B's gradient and B for h's
gradient — the same O(r)-per-token memory as before. Mixed dtypes keep the old path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asymlora.core.layer import LoraLinear


def fused_forward(self: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    out = self.base(x)
    if self.merged or self.disabled:
        return out
    a, b = self.lora_A, self.lora_B
    x = self.dropout(x)
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    h = F.linear(x, a)  # (..., r): the only activation B's gradient needs
    if out.dtype != b.dtype or out.dim() == 0:
        return out + F.linear(h * self.scaling, b).to(out.dtype)
    d_out = out.shape[-1]
    fused = torch.addmm(out.reshape(-1, d_out), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling)
    return fused.view(out.shape)


class FusedLoraLinear(LoraLinear):
    forward = fused_forward


def use_fused_forward(model: nn.Module) -> int:
    """Switch every ``LoraLinear`` of ``model`` to the proposed forward (class swap, in place)."""
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            n += 1
    return n
