"""Learning-rate schedules as multipliers of the peak rate per step (``LambdaLR``): linear warm-up
then linear decay, constant after warm-up, and warm-up–stable–decay (WSD)."""
from __future__ import annotations

import math
from collections.abc import Callable


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor for the optimizer step with 0-based index ``k``:
    ``(k+1)/w`` for ``k < w`` (so the first step is not wasted at lr 0), then
    ``(T-k)/(T-w)``: 1 at the end of warm-up, ``1/(T-w)`` at the last step ``k = T-1``."""

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        return max(0.0, (total_steps - k) / max(1, total_steps - warmup_steps))

    return factor


def constant_after_warmup(warmup_steps: int) -> Callable[[int], float]:
    """LR factor ``(k+1)/w`` for ``k < w``, then 1."""

    def factor(k: int) -> float:
        return (k + 1) / warmup_steps if k < warmup_steps else 1.0

    return factor


WSD_DECAY_FRACTION = 0.25


def warmup_stable_decay(total_steps: int, warmup_steps: int,
                        decay_fraction: float = WSD_DECAY_FRACTION) -> Callable[[int], float]:
    """Warm-up, stable, decay: ``(k+1)/w`` for ``k < w``, then 1 until the last
    ``d = ceil(decay_fraction·T)`` steps, then ``(T − k)/d`` down to ``1/d`` at ``k = T − 1``.
    Most steps run at the peak rate, and the short decay at the end still brings the weights to
    rest (Hu et al. 2024, MiniCPM; Hägele et al. 2024 find it matches a cosine schedule of the same
    length)."""
    decay = max(1, math.ceil(decay_fraction * total_steps))
    start = max(warmup_steps, total_steps - decay)

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        if k < start:
            return 1.0
        return max(0.0, (total_steps - k) / max(1, total_steps - start))

    return factor


def lr_schedule(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The multiplier of ``TrainArgs.lr_schedule`` ``kind`` (linear, wsd or constant)."""
    if kind == "linear":
        return linear_warmup_decay(total_steps, warmup_steps)
    if kind == "wsd":
        return warmup_stable_decay(total_steps, warmup_steps)
    return constant_after_warmup(warmup_steps)
