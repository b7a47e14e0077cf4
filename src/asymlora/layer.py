"""``LoraLinear``: a linear layer plus a low-rank update of which one factor may be frozen.

    y = base(x) + s · B·(A·dropout(x)),   A: r×d_in,  B: d_out×r

The base module (``nn.Linear`` or transformers' ``Conv1D``, whose weight is stored transposed,
d_in×d_out) is kept as ``self.base``, never copied. A trained factor is an ``nn.Parameter``; a
frozen factor is a *buffer*: it never appears in ``parameters()``, so no optimizer, no
``requires_grad_(True)`` call, no ``train()``/``eval()`` switch and no adapter toggling can
unfreeze it, while ``.to()`` / ``.half()`` still move and cast it with the model.

Memory: with A frozen, autograd keeps only ``A·x`` (r numbers per token) for B's gradient and
A itself for the input gradient — not x (d_in numbers per token). A dropout > 0 on the adapter
input keeps an x-sized mask instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers is a dependency, but the core works on any nn.Module without it.
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_TYPES) and not isinstance(module, LoraLinear)


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or transformers ``Conv1D`` (weight stored d_in×d_out)."""
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    raise TypeError(f"{type(module).__name__} is not a supported linear layer (nn.Linear or transformers Conv1D)")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as the (d_out × d_in) matrix of y = W·x, whatever the storage layout."""
    w = module.weight
    return w.T if is_conv1d(module) else w


class LoraLinear(nn.Module):
    """A supported linear layer with a rank-r update ``s·B·A`` (see module docstring)."""

    def __init__(
        self,
        base: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        train_A: bool,
        train_B: bool,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        d_in, d_out = linear_shape(base)
        r = lora_A.shape[0]
        if tuple(lora_A.shape) != (r, d_in) or tuple(lora_B.shape) != (d_out, r):
            raise ValueError(
                f"factor shapes A{tuple(lora_A.shape)} B{tuple(lora_B.shape)} do not fit a "
                f"{d_in}->{d_out} layer at rank {r}: need A ({r}, {d_in}) and B ({d_out}, {r})"
            )
        self.base = base
        self.in_features, self.out_features, self.r = d_in, d_out, r
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self._original_weight: Optional[torch.Tensor] = None
        self._set_factor("lora_A", lora_A, train_A)
        self._set_factor("lora_B", lora_B, train_B)

    def _set_factor(self, name: str, value: torch.Tensor, trainable: bool) -> None:
        if trainable:
            setattr(self, name, nn.Parameter(value, requires_grad=True))
        else:
            self.register_buffer(name, value, persistent=True)

    @property
    def train_A(self) -> bool:
        return isinstance(self.lora_A, nn.Parameter)

    @property
    def train_B(self) -> bool:
        return isinstance(self.lora_B, nn.Parameter)

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `layer.weight` keeps working
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.base, "bias", None)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        a, b = self.lora_A, self.lora_B
        x = self.dropout(x)
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        h = F.linear(x, a)  # (..., r): the only activation B's gradient needs
        if out.dtype != b.dtype or h.dtype != b.dtype or out.dim() < 2:
            # half-precision base with a float32 trained factor: compute the delta, then cast
            return out + F.linear((h * self.scaling).to(b.dtype), b).to(out.dtype)
        # out + s·h·Bᵀ in one BLAS call: no (..., d_out) delta temporary and no separate add
        # (measured in BENCHMARKS.md: -3 % step time for all-linear r=64).
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling)
        return fused.view(out.shape)

    # ------------------------------------------------------------------ merging
    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·A as a (d_out × d_in) matrix (the orientation of y = W·x)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merge(self, safe: bool = False, keep_original: bool = False) -> None:
        """Fold ΔW into the base weight so inference costs nothing extra.

        ``safe``: compute the merged weight first and refuse (ValueError) if ΔW or the result
        has a NaN/Inf, leaving the layer untouched. ``keep_original``: keep a copy of the base
        weight so ``unmerge`` restores it bit for bit (otherwise unmerge subtracts ΔW, exact up
        to float rounding of W+ΔW−ΔW).
        """
        if self.merged:
            raise RuntimeError("adapter is already merged; call unmerge() first")
        weight = self.base.weight
        delta = self.delta_weight().to(weight.dtype)
        if is_conv1d(self.base):
            delta = delta.T
        if safe:
            merged = weight.detach() + delta
            if not (torch.isfinite(delta).all() and torch.isfinite(merged).all()):
                raise ValueError("refusing to merge: the adapter's delta weight has NaN or Inf values")
        if keep_original:
            self._original_weight = weight.detach().clone()
        with torch.no_grad():
            weight.add_(delta)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        weight = self.base.weight
        with torch.no_grad():
            if self._original_weight is not None:
                weight.copy_(self._original_weight)
                self._original_weight = None
            else:
                delta = self.delta_weight().to(weight.dtype)
                weight.sub_(delta.T if is_conv1d(self.base) else delta)
        self.merged = False

    def extra_repr(self) -> str:
        trained = "".join(f for f, t in (("A", self.train_A), ("B", self.train_B)) if t)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, train={trained}, merged={self.merged}"
        )
