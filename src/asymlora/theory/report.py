"""The theory's results as text, files and a plot (``asymlora theory simulate`` / ``bound``).

Every file is written atomically (a temporary file in the same folder, then a rename), so an
interrupted call leaves either the old file or the new one.
"""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asymlora.fileio import atomic_write_bytes, atomic_write_csv
from asymlora.text import format_table

__all__ = ["simulation_report", "write_simulation", "plot_simulation", "bound_report", "write_bound"]


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


# ---- simulate -----------------------------------------------------------------------------
def _fmt_loss(mean: float, se: float) -> str:
    return f"{mean:.4f}" if se == 0 else f"{mean:.4f}±{se:.4f}"


def simulation_report(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`asymlora.theory.linear.simulate` as one table per spectrum and a summary."""
    from asymlora.theory.linear import summarize_simulation

    first = rows[0]
    lines = [
        f"Linear model, d_in={first['d_in']}, d_out={first['d_out']}, σ²={first['sigma2']:g}, signal ‖ΔΣ^½‖²=d_out "
        f"(W0=0). Expected loss; noise floor d_out·σ² = {first['noise_floor']:.4f}.",
        "A-only: B Haar-random frozen (exact: r/d_out of the signal). B-only: A Haar-random frozen "
        "(exact where a closed form exists, else Monte-Carlo mean±s.e.). Both: optimal rank-r.\n",
    ]
    for sp in dict.fromkeys(r["spectrum"] for r in rows):
        sub = [r for r in rows if r["spectrum"] == sp]
        lines.append(f"[{sp}]  rank(Σ)={sub[0]['sigma_rank']}, effective rank={sub[0]['effective_rank']:.1f}")
        table = [
            [
                str(r["r"]),
                _fmt_loss(r["loss_a_only"], r["se_a_only"]),
                _fmt_loss(r["loss_b_only"], r["se_b_only"]) + ("" if r["method_b_only"] == "exact" else " (mc)"),
                f"{r['loss_both']:.4f}",
                f"{r['excess_a_only']:.3f}/{r['excess_b_only']:.3f}/{r['excess_both']:.3f}",
            ]
            for r in sub
        ]
        lines.append(format_table(["r", "A-only", "B-only", "both", "excess/‖M‖² A/B/both"], table))
        lines.append("")
    lines.append("Summary:")
    lines += ["  " + line for line in summarize_simulation(rows)]
    return "\n".join(lines)


def write_simulation(out: Path, rows: Sequence[dict[str, Any]], config: dict[str, Any],
                     plot: bool = True) -> list[Path]:
    """``simulation.csv``, ``simulation.json`` (rows + ``config``) and, with ``plot``,
    ``simulation.png`` in ``out``; returns the paths written."""
    out = Path(out)
    atomic_write_csv(out / "simulation.csv", rows)
    write_json(out / "simulation.json", {
        "description": "Zhu et al. 2024, Theorem 4.3 on synthetic linear data (asymlora theory simulate)",
        "config": config,
        "rows": list(rows),
    })
    written = [out / "simulation.csv", out / "simulation.json"]
    if plot:
        plot_simulation(out / "simulation.png", rows)
        written.append(out / "simulation.png")
    return written


def plot_simulation(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """One panel per input spectrum: expected loss against rank r, one line per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spectra = list(dict.fromkeys(r["spectrum"] for r in rows))
    fig = Figure(figsize=(4.2 * len(spectra), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(spectra), squeeze=False, sharey=True)[0]
    styles = {
        "a_only": ("A-only (B random, frozen)", "tab:red", "s", "-", 7),
        "b_only": ("B-only (A random, frozen)", "tab:blue", "o", "--", 4),
        "both": ("both trained (optimal)", "tab:green", "^", "-", 6),
    }
    for ax, sp in zip(axes, spectra):
        sub = sorted((r for r in rows if r["spectrum"] == sp), key=lambda r: r["r"])
        xs = [r["r"] for r in sub]
        for key, (label, color, marker, ls, ms) in styles.items():
            ys = [r[f"loss_{key}"] for r in sub]
            errs = [r.get(f"se_{key}", 0.0) for r in sub]
            ax.errorbar(
                xs, ys, yerr=[2 * e for e in errs] if any(e > 0 for e in errs) else None,
                label=label, color=color, marker=marker, ls=ls, ms=ms, capsize=2,
            )
        ax.axhline(sub[0]["noise_floor"], color="gray", ls="--", lw=1, label="noise floor d_out·σ²")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("rank r")
        ax.set_title(f"{sp} Σ (eff. rank {sub[0]['effective_rank']:.1f})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("expected loss E‖y − ŷ‖²  (B-only: ±2 s.e.)")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"Theorem 4.3: d_in={rows[0]['d_in']}, d_out={rows[0]['d_out']}, σ²={rows[0]['sigma2']:g}", fontsize=10
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


# ---- bound --------------------------------------------------------------------------------
def _ratio_b_only_to_both(shapes: Sequence[Any]) -> float:
    s_in, s_out = sum(s.d_in for s in shapes), sum(s.d_out for s in shapes)
    return math.sqrt(s_out / (s_in + s_out))


def bound_report(shapes: Sequence[Any], rows: Sequence[dict[str, Any]], source: str, q: float, sigma: float) -> str:
    """The adapted layers and the rows of :func:`asymlora.theory.bounds.bound_table` as text."""
    kinds = Counter((s.d_in, s.d_out) for s in shapes)
    suffixes = sorted({s.name.rsplit(".", 1)[-1] for s in shapes})
    lines = [f"Model: {source}", f"Adapted layers: {len(shapes)} ({', '.join(suffixes)})"]
    lines += [f"  {c:4d} x  d_in={d_in:<6d} d_out={d_out}" for (d_in, d_out), c in sorted(kinds.items())]
    lines.append(f"  Σd_in={sum(s.d_in for s in shapes)}  Σd_out={sum(s.d_out for s in shapes)}")
    lines.append(
        f"\nXu–Raginsky bound |E gen| <= sqrt(2σ²·ln2·q·k/n), q={q:g} bits, σ={sigma:g}; "
        f"B-only/both = sqrt(Σd_out/Σ(d_in+d_out)) = {_ratio_b_only_to_both(shapes):.4f}\n"
    )
    table = [
        [str(r["r"]), r["strategy"], f"{r['params']:,}", f"{r['n']:,}", f"{r['bound']:.4g}",
         f"{r['ratio_to_both']:.4f}"]
        for r in rows
    ]
    lines.append(format_table(["r", "strategy", "trainable k", "n", "bound", "ratio/both"], table))
    return "\n".join(lines)


def write_bound(out: Path, shapes: Sequence[Any], rows: Sequence[dict[str, Any]], source: str,
                targets: Any) -> list[Path]:
    """``bound.csv`` and ``bound.json`` in ``out``; returns the paths written."""
    out = Path(out)
    atomic_write_csv(out / "bound.csv", rows)
    write_json(out / "bound.json", {
        "description": "Xu & Raginsky (2017) bound for low-rank adapters, Zhu et al. 2024 §4 (asymlora theory bound)",
        "source": source,
        "targets": targets,
        "layers": [{"name": s.name, "d_in": s.d_in, "d_out": s.d_out} for s in shapes],
        "sum_d_in": sum(s.d_in for s in shapes),
        "sum_d_out": sum(s.d_out for s in shapes),
        "ratio_b_only_to_both": _ratio_b_only_to_both(shapes),
        "rows": list(rows),
    })
    return [out / "bound.csv", out / "bound.json"]
