"""What one ``asymlora compare`` run is: the protocol's settings (``asymlora.sweep.config``)
and the classification task's — the model, the dataset and its columns, a quantized base.

Strategies: the registry's (``asymlora.strategies``: ours, PEFT's ``peft:NAME``, the user's
``MODULE:ATTR``, head-only).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from asymlora.bundled import ENCODER, model_problem
from asymlora.sweep.config import (
    HEAD_ONLY,
    STOPPING_RULES,
    StrategySpec,
    SweepConfig,
    parse_strategy,
    target_spec,
)

__all__ = ["STOPPING_RULES", "HEAD_ONLY", "StrategySpec", "parse_strategy", "target_spec", "CompareConfig"]


@dataclass
class CompareConfig(SweepConfig):
    """A compare sweep: ``SweepConfig``'s protocol settings plus the classification task —
    ``model`` (None: the bundled all-MiniLM-L6-v2; a name in ``asymlora.bundled.BUNDLED_MODELS``
    or a folder), ``data`` (fortunes, tweets or a file),
    its text and label columns, ``quantize`` (an ``asymlora.core.quant`` scheme of the frozen base)
    and ``plots``."""

    model: str | None = None
    data: str = "fortunes"
    text_column: str = "text"
    label_column: str = "label"
    quantize: str | None = None
    output_dir: str = "asymlora-compare"
    plots: bool = True

    def task_problems(self) -> list[str]:
        """The model and data settings (the protocol's are checked by ``problems``)."""
        out: list[str] = []
        if self.quantize is not None and (problem := _quantize_problem(self.quantize)):
            out.append(problem)  # an unknown scheme, or its package (bitsandbytes, torchao) missing
        if problem := model_problem(self.model, ENCODER):
            out.append(problem)  # not a bundled model's name nor a model folder, or not installed
        if self.data not in ("fortunes", "tweets") and not os.path.exists(self.data):
            out.append(f"--data {self.data!r} is neither a named dataset (fortunes, tweets) nor an existing path")
        return out


def _quantize_problem(scheme: str) -> str | None:
    from asymlora.core.quant import scheme_problem

    return scheme_problem(scheme)
