"""Small text helpers shared by the library's reports and the command line."""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["plural", "format_table", "mean_pm"]


def plural(n: int, word: str, words: str | None = None) -> str:
    """``plural(1, "thread")`` -> ``"1 thread"``; ``plural(2, "pair")`` -> ``"2 pairs"``."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, every column right-aligned to its widest cell, a rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def mean_pm(mean: float, std: float, digits: int = 2, scale: float = 1.0) -> str:
    """``"86.44 ± 0.12"``; just the mean when the std is undefined (one seed: NaN)."""
    if not math.isfinite(std):
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
