"""``LoraLinear``: a linear layer plus low-rank updates of which one factor may be frozen.

    y = base(x) + Σ_{k active} s_k · B_k·(A_k·dropout_k(x)),   A_k: r_k×d_in,  B_k: d_out×r_k

The base module (``nn.Linear`` or transformers' ``Conv1D``, whose weight is stored transposed,
d_in×d_out) is kept as ``self.base``, never copied. A trained factor is an ``nn.Parameter``; a
frozen factor is a *buffer*: it never appears in ``parameters()``, so no optimizer, no
``requires_grad_(True)`` call, no ``train()``/``eval()`` switch, no adapter switch and no adapter
toggling can unfreeze it, while ``.to()`` / ``.half()`` still move and cast it with the model.

Named adapters: a layer holds one or more adapters by name (``"default"`` for the one ``wrap``
makes). The adapter named ``"default"`` keeps the historical attribute names ``lora_A`` /
``lora_B`` (so single-adapter state dicts are unchanged); adapter ``n`` is stored as
``lora_A_n`` / ``lora_B_n``. Adapters whose frozen factor is the same tensor (same seed, init,
rank; see ``asymlora.core.adapters``) register that one tensor under both names: one buffer.
``layer.lora_A`` / ``lora_B`` / ``scaling`` / ``r`` / ``dropout`` read the *active* adapter (the
only one, or an error naming the active ones when several are active).

Memory: with A frozen, autograd keeps only ``A·x`` (r numbers per token) for B's gradient and
A itself for the input gradient — not x (d_in numbers per token). A dropout > 0 on the adapter
input keeps an x-sized mask instead.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from asymlora.core.base import Conv1D, is_conv1d, weight_of
from asymlora.core.quant import refuse_merge, scheme_of
from asymlora.errors import UserError

SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
DEFAULT_ADAPTER = "default"
BASE_ONLY = "__base__"  # reserved name: a mixed-batch row that gets the base model only
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_TYPES) and not isinstance(module, LoraLinear)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an ``nn.Linear`` or transformers ``Conv1D`` (weight stored d_in×d_out)."""
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        d_in, d_out = weight_of(module).shape
        return int(d_in), int(d_out)
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features)
    raise UserError(f"{type(module).__name__} is not a supported linear layer (nn.Linear or transformers Conv1D)")


def check_adapter_name(name: Any) -> str:
    """An adapter name is a non-empty string of letters, digits, ``_`` and ``-``, not ``__base__``."""
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise UserError(f"adapter name {name!r} is invalid: use a non-empty string of letters, digits, '_' and '-'")
    if name == BASE_ONLY:
        raise UserError(f"adapter name {BASE_ONLY!r} is reserved for 'base model only' rows of a mixed batch")
    return name


def factor_key(factor: str, adapter: str) -> str:
    """Attribute name of factor ``"A"``/``"B"`` of ``adapter`` (``lora_A`` for the default adapter)."""
    return f"lora_{factor}" if adapter == DEFAULT_ADAPTER else f"lora_{factor}_{adapter}"


@dataclass
class AdapterSlot:
    """Per-layer settings of one named adapter (its tensors are registered on the layer)."""

    r: int
    scaling: float


class LoraLinear(nn.Module):
    """A supported linear layer with named rank-r updates ``s·B·A`` (see module docstring)."""

    def __init__(
        self,
        base: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        train_A: bool,
        train_B: bool,
        dropout: float = 0.0,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        d_in, d_out = linear_shape(base)
        self.base = base
        self.in_features, self.out_features = d_in, d_out
        self.slots: dict[str, AdapterSlot] = {}
        self.lora_dropout = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.router: Any = None  # the model's asymlora.core.multi.Router (mixed-adapter batches)
        self._original_weight: torch.Tensor | None = None
        self.add_adapter(adapter_name, lora_A, lora_B, scaling, train_A, train_B, dropout)
        self.active = (adapter_name,)

    # ------------------------------------------------------------------ named adapters
    def add_adapter(self, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    train_A: bool, train_B: bool, dropout: float = 0.0) -> None:
        """Register adapter ``name`` (inactive unless it is the first). A frozen factor is
        registered as given: pass an existing buffer to share it (one tensor, two names)."""
        check_adapter_name(name)
        if name in self.slots:
            raise UserError(f"adapter {name!r} already exists in this layer; delete it first or pick another name")
        r = lora_A.shape[0]
        if tuple(lora_A.shape) != (r, self.in_features) or tuple(lora_B.shape) != (self.out_features, r):
            raise UserError(
                f"factor shapes A{tuple(lora_A.shape)} B{tuple(lora_B.shape)} do not fit a "
                f"{self.in_features}->{self.out_features} layer at rank {r}: need A ({r}, {self.in_features}) "
                f"and B ({self.out_features}, {r})"
            )
        for factor, value, trainable in (("A", lora_A, train_A), ("B", lora_B, train_B)):
            if trainable:
                self.register_parameter(factor_key(factor, name), nn.Parameter(value, requires_grad=True))
            else:
                self.register_buffer(factor_key(factor, name), value, persistent=True)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.slots[name] = AdapterSlot(int(r), float(scaling))

    def delete_adapter(self, name: str) -> None:
        if name not in self.slots:
            raise UserError(f"adapter {name!r} is not in this layer; it has {sorted(self.slots)}")
        if name in self.merged_adapters:
            raise UserError(f"adapter {name!r} is merged into the base weight; unmerge before deleting it")
        for factor in ("A", "B"):
            delattr(self, factor_key(factor, name))
        del self.lora_dropout[name]
        del self.slots[name]
        self.active = tuple(a for a in self.active if a != name)

    def set_active(self, names: Sequence[str]) -> None:
        """Activate the adapters of ``names`` this layer has; trained factors of the others stop
        requiring grad. Frozen factors are buffers and stay frozen whatever is active."""
        self.active = tuple(n for n in names if n in self.slots)
        for name in self.slots:
            for factor in ("A", "B"):
                t = self.factor(name, factor)
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(name in self.active)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of adapter ``name``."""
        if name not in self.slots:
            raise UserError(f"adapter {name!r} is not in this layer; it has {sorted(self.slots)}")
        return self.factor(name, "A"), self.factor(name, "B")

    def factor(self, name: str, factor: str) -> torch.Tensor:
        """Factor ``"A"``/``"B"`` of adapter ``name`` (read from the registries directly: the
        ``lora_A``/``lora_B`` attributes follow the active adapter)."""
        key = factor_key(factor, name)
        value = self._parameters.get(key)
        # torch types the registries' values Optional; a factor is never registered as None
        return value if value is not None else cast(torch.Tensor, self._buffers[key])

    def trains(self, name: str, factor: str) -> bool:
        return isinstance(self.factor(name, factor), nn.Parameter)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.slots)

    @property
    def primary(self) -> str:
        """The one active adapter, which the single-adapter attributes below read."""
        if len(self.active) != 1:
            raise UserError(
                f"this layer has {len(self.active)} active adapters {list(self.active)}; the single-adapter "
                "attributes (lora_A, lora_B, scaling, ...) need exactly one: use factors(name) or set_adapter"
            )
        return self.active[0]

    def __getattr__(self, name: str) -> Any:
        if name in ("lora_A", "lora_B"):  # the active adapter's factor, whatever its name
            active = self.__dict__.get("active", ())
            if len(active) != 1:  # AttributeError, so hasattr() answers False
                raise AttributeError(f"{name}: this layer has {len(active)} active adapters {list(active)}, "
                                     "not one; use factors(name)")
            return super().__getattr__(factor_key(name[-1], active[0]))
        return super().__getattr__(name)

    @property
    def train_A(self) -> bool:
        return self.trains(self.primary, "A")

    @property
    def train_B(self) -> bool:
        return self.trains(self.primary, "B")

    @property
    def r(self) -> int:
        return self.slots[self.primary].r

    @property
    def scaling(self) -> float:
        return self.slots[self.primary].scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        self.slots[self.primary].scaling = float(value)

    @property
    def dropout(self) -> nn.Module:
        return self.lora_dropout[self.primary]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @merged.setter
    def merged(self, value: bool) -> None:  # merge_and_unload: the base now owns the merged weight
        if value:
            raise UserError("use merge() to merge adapters")
        self.merged_adapters = []

    @property
    def weight(self) -> torch.Tensor:  # so code that reads `layer.weight` keeps working
        return weight_of(self.base)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router.current if self.router is not None else None
        if routing is not None and not self.disabled:  # a mixed-adapter batch (asymlora.core.multi)
            return routing.forward(self, x)
        if self.merged or self.disabled:
            return self.base(x)
        out = self.base(x)
        for name in self.active:
            out = self.add_delta(out, x, name)
        return out

    def add_delta(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """out + s·B·(A·dropout(x)) for adapter ``name``."""
        a, b = self.factors(name)
        scaling = self.slots[name].scaling
        x = self.lora_dropout[name](x)
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        h = F.linear(x, a)  # (..., r): the only activation B's gradient needs
        if out.dtype != b.dtype or h.dtype != b.dtype or out.dim() < 2:
            # half-precision base with a float32 trained factor: compute the delta, then cast
            return out + F.linear((h * scaling).to(b.dtype), b).to(out.dtype)
        # out + s·h·Bᵀ in one BLAS call: no (..., d_out) delta temporary and no separate add
        # (measured in BENCHMARKS.md: -3 % step time for all-linear r=64).
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(), alpha=scaling)
        return fused.view(out.shape)

    # ------------------------------------------------------------------ merging
    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """ΔW = s·B·A of adapter ``name`` (default: the active one) as a (d_out × d_in) matrix, in
        the wider dtype of the two factors (on a half-precision base a trained factor is float32
        and a frozen one half: ``inject.factor_dtype``)."""
        name = self.primary if name is None else name
        a, b = self.factors(name)
        dtype = torch.promote_types(a.dtype, b.dtype)
        return (b.to(dtype) @ a.to(dtype)) * self.slots[name].scaling

    def merge(
        self, safe: bool = False, keep_original: bool = False, adapter_names: Sequence[str] | None = None
    ) -> None:
        """Fold ΔW of ``adapter_names`` (default: the active adapters) into the base weight.

        ``safe``: compute the merged weight first and refuse (UserError) if ΔW or the result
        has a NaN/Inf, leaving the layer untouched. A quantized base is refused (UserError,
        ``asymlora.core.quant.refuse_merge``). ``keep_original``: keep a copy of the base
        weight so ``unmerge`` restores it bit for bit (otherwise unmerge subtracts ΔW, exact up
        to float rounding of W+ΔW−ΔW).
        """
        if self.merged:
            raise UserError("adapter is already merged; call unmerge() first")
        if (scheme := scheme_of(self.base)) is not None:
            raise refuse_merge(scheme)
        names = [n for n in (self.active if adapter_names is None else adapter_names) if n in self.slots]
        if not names:
            raise UserError(f"no adapter to merge in this layer (it has {sorted(self.slots)})")
        weight = weight_of(self.base)
        delta = self.delta_weight(names[0])
        for name in names[1:]:
            delta = delta + self.delta_weight(name)
        if is_conv1d(self.base):
            delta = delta.T
        # W + ΔW summed in the wider dtype and rounded once to the base's (a bf16 base is not
        # rounded twice, ΔW then the sum)
        merged = (weight.detach().to(delta.dtype) + delta).to(weight.dtype)
        if safe and not (torch.isfinite(delta).all() and torch.isfinite(merged).all()):
            raise UserError("refusing to merge: the adapter's delta weight has NaN or Inf values")
        if keep_original:
            self._original_weight = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(merged)
        self.merged_adapters = list(names)

    def unmerge(self) -> None:
        if not self.merged:
            raise UserError("adapter is not merged")
        weight = weight_of(self.base)
        with torch.no_grad():
            if self._original_weight is not None:
                weight.copy_(self._original_weight)
                self._original_weight = None
            else:
                for name in self.merged_adapters:
                    if name in self.slots:
                        delta = self.delta_weight(name).to(weight.dtype)
                        weight.sub_(delta.T if is_conv1d(self.base) else delta)
        self.merged_adapters = []

    def extra_repr(self) -> str:
        parts = []
        for name, slot in self.slots.items():
            trained = "".join(f for f in ("A", "B") if self.trains(name, f))
            parts.append(f"{name}: r={slot.r}, scaling={slot.scaling:g}, trainable={trained}")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters=[{'; '.join(parts)}], active={list(self.active)}, merged={self.merged}"
        )
