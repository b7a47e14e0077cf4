"""The text a finished sweep prints (``asymlora compare``, ``asymlora sft``): the task's
tables, the learning rate each strategy got and the grid it was picked from, the task's extra
sections, the paired verdicts against LoRA, and the time and files written. A task gives only
what differs: its tables, the metric its lr search selects on, what its verdicts compare."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SelectionMetric", "format_sweep_report"]


@dataclass(frozen=True)
class SelectionMetric:
    """How the lr search's metric reads in the report: ``name`` ("validation accuracy"), the
    key of a grid point that holds it (``val_accuracy``) and how one value is shown."""

    name: str
    key: str
    show: Callable[[float], str]


def _grid_point(g: dict[str, Any], metric: SelectionMetric) -> str:
    if g.get("diverged_at_step") is not None:
        return f"{g['lr']:.3g}: diverged at step {g['diverged_at_step']}"
    return (f"{g['lr']:.3g}: {metric.show(g[metric.key])}"
            + (f" (pruned at step {g['pruned_at_step']})" if g.get("pruned_at_step") else ""))


def _selection_line(sel: dict[str, Any], metric: SelectionMetric, first_seed: int) -> str:
    grid = "  ".join(_grid_point(g, metric) for g in sel["grid"])
    if sel.get("chosen_lr") is None:
        return f"lr for {sel['strategy']}: none, every rate diverged   ({metric.name} by lr, seed {first_seed}: {grid})"
    edge = (f"  — on the {sel['at_edge']} edge of the grid: the best rate may lie beyond it (widen --lrs "
            f"or raise --max-lr-extensions)" if sel.get("at_edge") else "")
    return (f"lr for {sel['strategy']}: {sel['chosen_lr']:.3g}   ({metric.name} by lr, seed {first_seed}: "
            f"{grid}){edge}")


def format_sweep_report(results: dict[str, Any], *, tables: Sequence[str], metric: SelectionMetric,
                        first_seed: int, margin: float, verdicts_on: str, output_dir: str,
                        files: Sequence[str], sections: Sequence[str] = ()) -> str:
    """The report of one sweep, as printed. ``results``: the dict the sweep returned
    (``lr_selection``, ``verdict_lines``, ``phases_s``, ``total_time_s``); ``tables``: the task's
    result tables (printed first); ``sections``: further text after the chosen rates (e.g. sft's
    benchmark table); ``verdicts_on``: what the paired differences compare ("test-accuracy"; "" when
    the verdict lines name it);
    ``files``: the names written into ``output_dir``."""
    parts = [t for t in tables if t]
    parts.append("\n".join(_selection_line(sel, metric, first_seed) for sel in results["lr_selection"]))
    parts += [s for s in sections if s]
    if results["verdict_lines"]:
        on = f"{verdicts_on} " if verdicts_on else ""
        parts.append(f"paired {on}differences against LoRA at the same r, 95 % t-interval over seeds "
                     f"(margin ±{100 * margin:g} point):\n"
                     + "\n".join("  " + line for line in results["verdict_lines"]))
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in results["phases_s"].items())
    parts.append(f"total {results['total_time_s']:.0f} s ({phases}); wrote {os.path.abspath(output_dir)}/"
                 + ", ".join(files))
    return "\n" + "\n\n".join(p for p in parts if p)
