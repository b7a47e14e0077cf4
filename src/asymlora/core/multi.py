"""Mixed-adapter batches: one forward pass in which every row of the batch uses its own adapter.

    model(**batch, adapter_names=["sentiment", "topics", "__base__", ...])   # one name per row
    model.generate(**batch, adapter_names=[...])
    with asymlora.adapters.mixed_batch(model, names): ...                   # the same, as a block

Row i of every adapted layer computes  y_i = W0·x_i + s_k·B_k·A_k·x_i  with k = names[i]
(``"__base__"``: y_i = W0·x_i). The base GEMM runs once for the whole batch. The adapters of a
layer are grouped by their A tensor: adapters that share one frozen A (b-only adapters with
one seed, ``asymlora.core.adapters``) form one group, and for a group

    H = A·X_g                      one GEMM over all rows of the group (computed once)
    Y_i += s_k · B_k · H_i         per row i of the group, k = its adapter

The second step is a *segment* matmul when each adapter's rows are contiguous (one in-place
``addmm`` per adapter on a slice of the output, nothing copied), otherwise a gathered batched
matmul: B's stacked (K×r×d_out), gathered per row (R×r×d_out) and applied with one ``baddbmm``.
No Python loop over rows: the per-row bookkeeping (which rows, which adapter) is built once per
forward call as index tensors and reused by every layer with the same adapter grouping.

Cost per layer for R rows × T tokens, K adapters of one group (flops, copies, launches):
  here:  2·R·T·r·(d_in + d_out) flops; copies (K + R)·r·d_out numbers when rows are not grouped
         (none when they are); launches ~4 (gathered) or 1 + K (segments).
  per-adapter dispatch (PEFT): the same flops; per adapter a copy of its rows of x, a temporary
         delta, a scaled copy and an indexed add into the output: ≈ R·T·(d_in + 3·d_out) numbers
         moved, ~6·K launches, and a Python scan of all rows per adapter per layer (K·R steps).
Mixed batches are for inference: a model in training mode is refused (as PEFT does).
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asymlora.core.layer import BASE_ONLY, LoraLinear
from asymlora.errors import UserError

_ROUTER = "_asymlora_router"  # model.__dict__ key of the model's Router


class Router:
    """Shared by a model and all its adapted layers (``layer.router``): the routing in force,
    so entering or leaving a mixed batch is O(1), not a walk over the model's modules."""

    def __init__(self) -> None:
        self.stack: list[Routing] = []
        self.pushed: list[bool] = []  # per nested forward call: did its pre-hook push a routing?

    @property
    def current(self) -> Routing | None:
        return self.stack[-1] if self.stack else None


def router_of(model: nn.Module) -> Router:
    router = model.__dict__.get(_ROUTER)
    if router is None:
        router = model.__dict__[_ROUTER] = Router()
    return router


@dataclass
class _GroupPlan:
    """Rows of one A-group of a layer: ``members`` adapter names; ``rows`` the batch rows
    (None: all rows); ``local`` per group row the member index; ``segments`` (member,
    start, end, offset in the group's rows) when each member's rows are one contiguous block."""

    members: list[str]
    rows: torch.Tensor | None
    block: tuple[int, int] | None
    local: torch.Tensor
    segments: list[tuple[int, int, int, int]] | None


class Routing:
    """Which adapter each row of a batch uses (``names``), and the cached per-layer plans."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.order = list(dict.fromkeys(n for n in self.names if n != BASE_ONLY))
        index = {n: i for i, n in enumerate(self.order)}
        self.row_adapter = torch.tensor([index.get(n, -1) for n in self.names], dtype=torch.long)
        self._plans: dict[Any, list[_GroupPlan]] = {}

    def forward(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        return mixed_forward(layer, x, self)

    def plan(self, layer: LoraLinear, n_rows: int, device: torch.device) -> list[_GroupPlan]:
        """Groups of this layer's routed adapters that share one A tensor, with their rows."""
        groups: dict[int, list[int]] = {}
        for i, name in enumerate(self.order):
            if name in layer.slots:
                groups.setdefault(id(layer.factor(name, "A")), []).append(i)
        key = (tuple(tuple(g) for g in groups.values()), n_rows, str(device))
        if key not in self._plans:
            row_adapter = self._rows_for(n_rows)
            self._plans[key] = [self._group_plan(g, row_adapter, device) for g in groups.values()]
        return self._plans[key]

    def _rows_for(self, n_rows: int) -> torch.Tensor:
        """Per-row adapter index; a batch k times longer (beam search, num_return_sequences)
        repeats each row's name k times, as ``generate`` repeats each input row."""
        names = len(self.names)
        if n_rows == names:
            return self.row_adapter
        if n_rows % names:
            raise UserError(f"adapter_names has {names} names but an adapted layer got a batch of {n_rows} rows; "
                            "give one name per row of the batch")
        return self.row_adapter.repeat_interleave(n_rows // names)

    def _group_plan(self, members: list[int], row_adapter: torch.Tensor, device: torch.device) -> _GroupPlan:
        lookup = torch.full((len(self.order) + 1,), -1, dtype=torch.long)  # last slot: base rows
        lookup[members] = torch.arange(len(members))
        row_local = lookup[row_adapter]  # -1 -> lookup[-1] = -1
        mask = row_local >= 0
        rows = mask.nonzero().flatten()
        n_rows, n_group = row_adapter.numel(), rows.numel()
        first, last = int(rows[0]), int(rows[-1]) + 1
        values, counts = torch.unique_consecutive(row_local, return_counts=True)
        ends = torch.cumsum(counts, 0)
        keep = values >= 0
        runs_v, runs_e, runs_c = values[keep].tolist(), ends[keep].tolist(), counts[keep].tolist()
        segments = None
        if len(runs_v) == len(members):  # each member's rows form one contiguous block
            before = torch.cumsum(mask, 0).tolist()  # group rows up to and including each row
            segments = [(v, e - c, e, before[e - 1] - c) for v, e, c in zip(runs_v, runs_e, runs_c)]
        return _GroupPlan(
            members=[self.order[i] for i in members],
            rows=None if n_group == n_rows else rows.to(device),
            block=(first, last) if last - first == n_group else None,
            local=row_local[rows].to(device),
            segments=segments,
        )


def mixed_forward(layer: LoraLinear, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """y = base(x) plus, for each row, its adapter's s·B·A·x (module docstring)."""
    if layer.merged:
        raise UserError("adapter_names cannot be used while adapters are merged; unmerge them first")
    if x.dim() < 2:
        raise UserError("a mixed-adapter batch needs inputs with a batch dimension first")
    out = layer.base(x).contiguous()  # a no-op for a linear layer's output; views below write into it
    n = x.shape[0]
    out3 = out.view(n, -1, out.shape[-1])  # (rows, tokens, d_out), a view: updates land in out
    for group in routing.plan(layer, n, x.device):
        a = layer.factors(group.members[0])[0]
        if group.rows is None:
            xg = x
        elif group.block is not None:
            xg = x[group.block[0]:group.block[1]]
        else:
            xg = x.index_select(0, group.rows)
        h = F.linear(xg.to(a.dtype), a)  # A·x once for every row of the group
        h3 = h.reshape(h.shape[0], -1, h.shape[-1])
        if group.segments is not None:
            _segments(layer, group, group.segments, out3, h3)
        else:
            _gathered(layer, group, out3, h3)
    return out


def _segments(layer: LoraLinear, group: _GroupPlan, segments: list[tuple[int, int, int, int]],
              out3: torch.Tensor, h3: torch.Tensor) -> None:
    """Each adapter's rows are one block: out[block] += s·H[block]·Bᵀ in place, one BLAS call
    per adapter on token-row slices of the flat (rows·tokens, d) views; nothing is copied."""
    tokens = out3.shape[1]
    out2, h2 = out3.view(-1, out3.shape[-1]), h3.reshape(-1, h3.shape[-1])
    for member, start, end, offset in segments:
        name = group.members[member]
        b, scaling = layer.factor(name, "B"), layer.slots[name].scaling
        out_rows = out2[start * tokens:end * tokens]
        h_rows = h2[offset * tokens:(offset + end - start) * tokens]
        if out2.dtype == b.dtype == h2.dtype:
            out_rows.addmm_(h_rows, b.t(), alpha=scaling)
        else:  # half-precision base, float32 trained B: compute the delta, then cast
            out_rows.add_(F.linear((h_rows * scaling).to(b.dtype), b).to(out2.dtype))


def _gathered(layer: LoraLinear, group: _GroupPlan, out3: torch.Tensor, h3: torch.Tensor) -> None:
    """Rows of several adapters interleaved: each row's s·Bᵀ gathered, one batched matmul."""
    bs = [layer.factors(n)[1] for n in group.members]
    scales = [layer.slots[n].scaling for n in group.members]
    stacked = torch.stack([b.t() for b in bs])  # (K, r, d_out)
    alpha = scales[0]
    if any(s != alpha for s in scales):
        stacked = stacked * torch.tensor(scales, dtype=stacked.dtype, device=stacked.device).view(-1, 1, 1)
        alpha = 1.0
    per_row = stacked.index_select(0, group.local)  # (rows, r, d_out)
    h3 = h3.to(per_row.dtype)
    if group.rows is None and out3.dtype == per_row.dtype:
        out3.baddbmm_(h3, per_row, alpha=alpha)
        return
    delta = torch.bmm(h3, per_row)
    if alpha != 1.0:
        delta.mul_(alpha)
    delta = delta.to(out3.dtype)
    if group.rows is None:
        out3.add_(delta)
    else:
        out3.index_add_(0, group.rows, delta)


# ---------------------------------------------------------------------------- routing on a model
def _check_names(model: nn.Module, names: Any) -> list[str]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise UserError(f"adapter_names must be a list of adapter names, one per row, got {type(names).__name__}")
    known = set(getattr(model, "asymlora_configs", None) or {})
    unknown = sorted({n for n in names if n not in known and n != BASE_ONLY}, key=str)
    if unknown:
        raise UserError(f"adapter_names has unknown adapter(s) {unknown}; the model has {sorted(known)} "
                        f"(and {BASE_ONLY!r} for base-only rows)")
    if not names:
        raise UserError("adapter_names is empty: give one name per row of the batch")
    if model.training:
        raise UserError("adapter_names (mixed-adapter batches) are for inference: call model.eval() first")
    return list(names)


def push_routing(model: nn.Module, names: Sequence[str]) -> None:
    names = _check_names(model, names)
    router_of(model).stack.append(Routing(names))


def pop_routing(model: nn.Module) -> None:
    stack = router_of(model).stack
    if stack:
        stack.pop()


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, every forward of ``model`` routes row i to ``adapter_names[i]``."""
    push_routing(model, adapter_names)
    try:
        yield model
    finally:
        pop_routing(model)


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    pushed = router_of(model).pushed
    pushed.append(False)
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        push_routing(model, names)
        pushed[-1] = True
    return args, kwargs


def _post_hook(model: nn.Module, args: tuple, output: Any) -> None:
    pushed = router_of(model).pushed
    if pushed and pushed.pop():
        pop_routing(model)


def _generate(self: Any, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
    # self: a model whose class has ``generate`` (install_routing checks); nn.Module does not declare it
    generate = type(self).generate
    if adapter_names is None:
        return generate(self, *args, **kwargs)
    with mixed_batch(self, adapter_names):
        return generate(self, *args, **kwargs)


def install_routing(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``
    run mixed-adapter batches (a forward pre-hook that takes the argument out; ``generate``
    wrapped on this instance)."""
    router = router_of(model)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.router = router
    if _pre_hook in model._forward_pre_hooks.values():
        return
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model.register_forward_hook(_post_hook, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        # torch types module attributes as Tensor | Module; any value is allowed at runtime
        model.generate = types.MethodType(_generate, model)  # type: ignore[assignment]


def uninstall_routing(model: nn.Module) -> None:
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if h in (_pre_hook, _post_hook)]:
            del hooks[key]
    model.__dict__.pop("generate", None)
    model.__dict__.pop(_ROUTER, None)
