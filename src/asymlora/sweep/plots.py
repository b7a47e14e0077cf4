"""The protocol's own figure, shared by every task on the engine: ``verdicts.png``, each paired
difference (method − reference) with its 95 % interval, the ±margin band and the verdict word.
Written atomically (rendered into memory, temp file, rename) on matplotlib's Agg backend."""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from asymlora.fileio import atomic_write_bytes

__all__ = ["save_figure", "write_verdict_plot"]


def save_figure(fig: Any, path: str) -> str:
    """Render ``fig`` as PNG into memory and write it atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_verdict_plot(verdicts: list[dict[str, Any]], path: str, title: str = "") -> str | None:
    """One row per paired difference (``PairedDifference.to_dict()``): the per-seed differences
    as dots, the mean with its interval as a bar, the ±margin band shaded, zero dashed and the
    verdict written at the right. Accuracy-like metrics are drawn in points, log-likelihoods in
    nats per token (each row has its own axis). None when there is no verdict to draw."""
    if not verdicts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(verdicts), 1, figsize=(7.5, 0.95 * len(verdicts) + 0.9), squeeze=False)
    for ax, v in zip(axes[:, 0], verdicts):
        nats = v["metric"].endswith("loglik")
        scale, unit = (1.0, "nats/token") if nats else (100.0, "points")
        m, lo, hi, margin = (scale * v[k] for k in ("mean", "lo", "hi", "margin"))
        ax.axvspan(-margin, margin, color="tab:green", alpha=0.15, lw=0)
        ax.axvline(0, color="gray", ls="--", lw=1)
        if np.isfinite(lo) and np.isfinite(hi):
            ax.plot([lo, hi], [0, 0], color="k", lw=2.5, solid_capstyle="butt")
        ax.plot(m, 0, "o", color="k", ms=7)
        ax.plot([scale * d for d in v["differences"]], [0.18] * len(v["differences"]), ".", color="tab:blue", ms=6)
        span = max(abs(x) for x in (lo, hi, m, 2 * margin, *(scale * d for d in v["differences"]))
                   if np.isfinite(x)) * 1.15
        ax.set_xlim(-span, span)
        ax.set_ylim(-0.5, 0.5)
        ax.set_yticks([])
        ax.set_ylabel(f"{v['method']}\nvs {v['reference']}", rotation=0, ha="right", va="center", fontsize=8)
        ax.text(1.01, 0.5, v["verdict"], transform=ax.transAxes, va="center", fontsize=9, fontweight="bold")
        ax.set_xlabel(f"{v['metric']}: method − reference ({unit}); band = ±margin, bar = 95 % interval, "
                      f"dots = seeds", fontsize=7)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
