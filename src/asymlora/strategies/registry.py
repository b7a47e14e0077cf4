"""The one place strategies are registered: ours (``asymlora.strategies.ours``), PEFT's
(``asymlora.strategies.peft_methods``), the head-only baseline, and any ``MODULE:ATTR`` of the
user's (``asymlora.strategies.user``). Adding a strategy is one entry here plus its test.

A strategy named on the command line may carry ``@Kr`` (rank K·r): ``b-only@2r`` trains
2r·Σd_out parameters, the same as ``lora`` at r when d_in = d_out (BERT's query/value).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from asymlora.errors import UserError
from asymlora.strategies.base import Strategy
from asymlora.strategies.ours import OURS
from asymlora.strategies.peft_methods import PEFT_STRATEGIES
from asymlora.strategies.user import is_user_name, load_user_strategy

__all__ = ["HEAD_ONLY", "REGISTRY", "DEFAULT_STRATEGIES", "StrategySpec", "get_strategy", "parse_strategy",
           "strategy_names", "describe_strategies"]

HEAD_ONLY = "head-only"
HEAD_ONLY_STRATEGY = Strategy(name=HEAD_ONLY, family="baseline", trains="the task's head only (no adapter)",
                              same_r="no rank", adapt=None, train_lr=1e-2)

REGISTRY: dict[str, Strategy] = {s.name: s for s in (*OURS, HEAD_ONLY_STRATEGY, *PEFT_STRATEGIES)}
_ALIASES = {alias: s.name for s in REGISTRY.values() for alias in s.aliases}

# what `asymlora compare` runs with no --strategies: LoRA, the paper's b-only and the head-only
# baseline. a-only and b-only@2r are one flag away (with them the default takes about 20 minutes).
DEFAULT_STRATEGIES = (HEAD_ONLY, "lora", "b-only")

_SPEC_RE = re.compile(r"^(?P<name>.+?)(?:@(?P<mult>\d+)r)?$")


def strategy_names() -> list[str]:
    """Every registered name (aliases not repeated)."""
    return list(REGISTRY)


def _valid() -> str:
    return (f"{', '.join(REGISTRY)} or MODULE:FACTORY of your own, optionally suffixed @Kr (e.g. b-only@2r); "
            "`asymlora compare --help` describes them")


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` (an alias such as ``peft-lora`` gives ``peft:lora``)."""
    name = _ALIASES.get(name, name)
    if name in REGISTRY:
        return REGISTRY[name]
    if is_user_name(name):
        return load_user_strategy(name)
    raise UserError(f"strategy {name!r} is not valid; use {_valid()}")


@dataclass(frozen=True)
class StrategySpec:
    """One row of a sweep: ``preset`` the strategy's registered name (None for head-only);
    ``rank`` the adapter rank used and ``base_rank`` the r it was derived from (``b-only@2r`` at
    r=8: rank 16, base_rank 8). ``label`` keeps the name as the user typed it."""

    label: str
    preset: str | None
    rank: int
    base_rank: int

    @property
    def strategy(self) -> Strategy:
        return get_strategy(self.preset or HEAD_ONLY)

    @property
    def is_adapter(self) -> bool:
        return self.preset is not None

    @property
    def lr_scale(self) -> float:
        return self.strategy.lr_scale

    @property
    def is_reference(self) -> bool:
        return self.strategy.reference


def parse_strategy(spec: str, r: int) -> StrategySpec:
    """``NAME`` or ``NAME@Kr`` (rank K·r) of a registered strategy or a ``MODULE:ATTR`` of the
    user's; a bad one is a UserError naming what is valid."""
    m = _SPEC_RE.match(spec.strip())
    if not m:
        raise UserError(f"strategy {spec!r} is not valid; use {_valid()}")
    name, mult = m.group("name"), m.group("mult")
    strategy = get_strategy(name)
    if not strategy.is_adapter:
        if mult:
            raise UserError(f"strategy {spec!r}: {name} has no rank; use {_valid()}")
        return StrategySpec(HEAD_ONLY, None, 0, r)
    k = int(mult) if mult else 1
    if k < 1:
        raise UserError(f"strategy {spec!r}: the rank multiplier must be >= 1")
    label = f"{name} r={k * r}" + (f" (@{k}r)" if k > 1 else "")
    return StrategySpec(label, strategy.name, k * r, r)


def describe_strategies() -> str:
    """Two lines per registered strategy for ``--help``: its name and what it trains, then
    what r means for it (and its rate scale, its old names)."""
    import textwrap

    pad = max(len(n) for n in REGISTRY) + 3
    lines = []
    for s in REGISTRY.values():
        more = f"r: {s.same_r}" + (f"; rates ×{s.lr_scale:g} the grid" if s.lr_scale != 1 else "")
        more += f"; also {', '.join(s.aliases)}" if s.aliases else ""
        lines.append(f"  {s.name:<{pad}}{s.trains}")
        lines += textwrap.wrap(more, 100, initial_indent=" " * (pad + 2), subsequent_indent=" " * (pad + 4))
    return "\n".join(lines)
