"""Adapter strategies, registered in one place (``asymlora.strategies.registry``)."""
from asymlora.strategies.base import Adapted, AdaptRequest, Strategy
from asymlora.strategies.registry import (
    DEFAULT_STRATEGIES,
    HEAD_ONLY,
    REGISTRY,
    StrategySpec,
    describe_strategies,
    get_strategy,
    parse_strategy,
    strategy_names,
)

__all__ = ["AdaptRequest", "Adapted", "Strategy", "DEFAULT_STRATEGIES", "HEAD_ONLY", "REGISTRY", "StrategySpec",
           "describe_strategies", "get_strategy", "parse_strategy", "strategy_names"]
