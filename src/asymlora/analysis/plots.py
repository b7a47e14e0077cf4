"""Heatmaps of adapter similarity (layers × run pairs), as in Figures 1-2 of the paper.

matplotlib runs on the non-interactive Agg backend; every PNG is written atomically
(rendered into memory, written to a temp file in the target folder, then renamed).
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from asymlora.analysis.similarity import (
    FACTORS,
    SimilarityReport,
    nanmean,
    short_layer_names,
)
from asymlora.fileio import atomic_write_bytes

__all__ = ["heatmap_png", "save_heatmap", "save_report_heatmaps"]


def heatmap_png(
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    title: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    cbar_label: str = "similarity",
    annotate: bool | None = None,
) -> bytes:
    """Render ``matrix`` (rows × cols) as a PNG heatmap and return its bytes.

    NaN cells (e.g. an all-zero factor, which has no subspace) are drawn grey.
    ``annotate=None`` writes the values in the cells when the grid is small.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {m.shape}")
    if m.shape != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"matrix shape {m.shape} does not match {len(row_labels)} row and {len(col_labels)} column labels"
        )
    nr, nc = m.shape
    if annotate is None:
        annotate = nr * nc <= 400
    width = min(4.0 + 0.9 * nc, 40.0)
    height = min(1.8 + 0.32 * nr, 40.0)
    fig, ax = plt.subplots(figsize=(width, height))
    try:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                       interpolation="nearest")
        ax.set_xticks(range(nc))
        ax.set_xticklabels(col_labels, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(nr))
        ax.set_yticklabels(row_labels, fontsize=8)
        ax.set_xlabel("run pair")
        ax.set_ylabel("layer")
        if title:
            ax.set_title(title, fontsize=10)
        cb = fig.colorbar(im, ax=ax)
        cb.set_label(cbar_label)
        if annotate:
            mid = (vmin + vmax) / 2
            for i in range(nr):
                for j in range(nc):
                    v = m[i, j]
                    txt = "–" if not np.isfinite(v) else f"{v:.2f}"
                    ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                            color="black" if (np.isfinite(v) and v > mid) else "white")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_heatmap(path: str | os.PathLike, matrix: np.ndarray, row_labels: Sequence[str],
                 col_labels: Sequence[str], **kwargs) -> Path:
    """:func:`heatmap_png` written atomically to ``path``."""
    return atomic_write_bytes(path, heatmap_png(matrix, row_labels, col_labels, **kwargs))


def save_report_heatmaps(
    report: SimilarityReport, out_dir: str | os.PathLike, *, measures: Sequence[str] = ("subspace", "cosine")
) -> list[Path]:
    """One PNG per factor and measure: ``similarity_<measure>_<A|B>.png`` (layers × run pairs)."""
    out = Path(out_dir)
    rows = short_layer_names(report.layers)
    cols = report.pair_labels()
    paths = []
    for measure in measures:
        for factor in FACTORS:
            v = report.get(factor, measure)
            if measure == "subspace":
                title = (f"{factor}: subspace similarity ‖U1ᵀU2‖²/min(r1,r2) "
                         f"({'row spaces' if factor == 'A' else 'column spaces'}); "
                         f"chance ≈ {nanmean(report.chance[factor]):.3f}")
                vmin, label = 0.0, "mean cos² of principal angles"
            else:
                title = f"{factor}: cosine similarity of flattened matrices"
                vmin, label = -1.0, "cosine"
            paths.append(
                save_heatmap(out / f"similarity_{measure}_{factor}.png", v, rows, cols,
                             title=title, vmin=vmin, vmax=1.0, cbar_label=label)
            )
    return paths
