"""Where a sweep's time goes: seconds per phase of the protocol (:class:`Phases`), and the
seconds spent inside an evaluation function (:class:`Timed`) so a run can report its training
and evaluation time apart (docs/design.md)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["Phases", "Timed"]


class Phases:
    """Seconds per phase of the protocol. load, tokenise, features (head-only's cached inputs)
    and report are wall-clock time of this process; pilot, train and eval add up the runs
    (``eval``: validation and test scoring inside them, which ``pilot`` and ``train`` do not
    count), so with worker processes side by side they sum to more than the wall time
    (``settings.runs_wall_s``)."""

    NAMES = ("load", "tokenise", "features", "pilot", "train", "eval", "report")

    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k in self.NAMES}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds  # other protocols add their own phases

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}



class Timed:
    """Wraps an eval function and adds up the seconds spent in it."""

    def __init__(self, fn: Callable[[Any], dict[str, float]]) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, model: Any) -> dict[str, float]:
        t = time.perf_counter()
        try:
            return self.fn(model)
        finally:
            self.seconds += time.perf_counter() - t
