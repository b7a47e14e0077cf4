"""The three PNGs of ``asymlora compare``, each readable at a glance:

- ``metric_by_strategy.png``: test accuracy and macro-F1 per strategy, bars from 0 with their
  values written on them, one dot per seed, the chosen lr under each name, the majority class.
- ``training_curves.png``: validation accuracy against step for every run (seeds as thin
  lines, best steps marked) and the smoothed training loss.
- ``lr_selection.png``: validation accuracy of the pilot runs against the learning rate, one
  line per strategy, the chosen rate circled, pruned pilots marked with their rung.
- ``cost.png``: test accuracy (mean over seeds with its 95 % t-interval) against the trained
  parameters on a log axis, one point per strategy: the cheap rows that are not worse stand out
  at the top left.
- ``verdicts.png`` (``asymlora.sweep.plots.write_verdict_plot``, shared with ``asymlora sft``):
  each paired difference (method − LoRA) with its 95 % interval, the ±margin band and the
  verdict word — the one figure to read first.

Written atomically (rendered into memory, temp file, rename) on matplotlib's Agg backend.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from asymlora.sweep.plots import save_figure, write_verdict_plot

__all__ = ["write_plots"]


def _finished(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary rows of the strategies with finished runs (not every rate diverged)."""
    return [r for r in results["summary"] if not r.get("all_diverged")]


def _bars(plt: Any, results: dict[str, Any], path: str) -> str:
    summary = _finished(results)
    labels = [r["strategy"] for r in summary]
    x = np.arange(len(labels))
    wd = 0.38
    fig, ax = plt.subplots(figsize=(max(6.5, 1.7 * len(labels)), 4.5))
    for j, (key, name) in enumerate((("test_accuracy", "accuracy"), ("test_macro_f1", "macro-F1"))):
        means = np.array([100 * r[key + "_mean"] for r in summary])
        stds = np.array([100 * r[key + "_std"] for r in summary])
        bars = ax.bar(x + (j - 0.5) * wd, means, wd, yerr=stds, capsize=4, label=f"test {name}")
        for b, m, sd in zip(bars, means, stds):
            ax.text(b.get_x() + b.get_width() / 2, m + sd + 1.5, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
        for run in (r for r in results["runs"] if not r.get("diverged")):
            ax.plot(labels.index(run["strategy"]) + (j - 0.5) * wd, 100 * run[key], "k.", ms=4, alpha=0.6)
    ticks = [f"{lab}\n{r['trainable_params']:,} params\nlr {r['lr_mean']:g}" for lab, r in zip(labels, summary)]
    ax.set_xticks(x, ticks, fontsize=8)
    ax.set_ylabel("test metric (%)")
    ax.set_ylim(0, 118)
    ax.set_yticks(range(0, 101, 20))
    maj = results["settings"].get("majority_class_test_accuracy")
    if maj is not None:
        ax.axhline(100 * maj, color="gray", ls="--", lw=1, label="majority class")
    s = results["settings"]
    scored = "final weights" if s.get("stopping") == "budget" else "best validation step"
    ax.set_title(f"{s['data']}: each strategy at its own lr, {scored}; mean ± std over seeds "
                 f"{s['seeds']}", fontsize=9)
    ax.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _curves(plt: Any, results: dict[str, Any], path: str) -> str:
    labels = [r["strategy"] for r in _finished(results)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c, lab in enumerate(labels):
        col = colors[c % len(colors)]
        for i, run in enumerate(r for r in results["runs"] if r["strategy"] == lab):
            ev = [(h["step"], 100 * h["val_accuracy"]) for h in run["history"] if "val_accuracy" in h]
            if ev:
                steps, vals = zip(*ev)
                a1.plot(steps, vals, color=col, lw=1.2, alpha=0.85,
                        label=f"{lab} (lr {run['lr']:g})" if i == 0 else None)
                best = dict(ev).get(run["best_step"])
                if best is not None:
                    a1.plot(run["best_step"], best, "o", color=col, ms=5, mfc="none")
            losses = np.array([h["loss"] for h in run["history"]])
            win = max(1, len(losses) // 15)
            if len(losses) >= win:
                sm = np.convolve(losses, np.ones(win) / win, mode="valid")
                a2.plot(np.arange(win, len(losses) + 1), sm, color=col, lw=1, alpha=0.85,
                        label=lab if i == 0 else None)
    a1.set_xlabel("step"), a1.set_ylabel("validation accuracy (%)")
    a1.set_ylim(0, 100)
    a1.set_title("validation accuracy per run (o = the step scored)", fontsize=9)
    a2.set_xlabel("step"), a2.set_ylabel("training loss (smoothed)")
    a2.set_ylim(bottom=0)
    a2.set_title("training loss per run", fontsize=9)
    a1.legend(fontsize=7, loc="lower right"), a2.legend(fontsize=7)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _lr_selection(plt: Any, results: dict[str, Any], path: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for sel in results["lr_selection"]:
        scored = [g for g in sel["grid"] if g.get("diverged_at_step") is None]
        lrs = [g["lr"] for g in scored]
        vals = [100 * g["val_accuracy"] for g in scored]
        chosen = "every rate diverged" if sel["chosen_lr"] is None else f"{sel['chosen_lr']:g}"
        line, = ax.plot(lrs, vals, "o-", label=f"{sel['strategy']} → {chosen}")
        if sel["chosen_lr"] is not None:
            ax.plot(sel["chosen_lr"], 100 * dict(zip(lrs, [g["val_accuracy"] for g in scored]))[sel["chosen_lr"]],
                    "o", ms=12, mfc="none", color=line.get_color())
        for g in sel["grid"]:
            if g.get("diverged_at_step") is not None:  # drawn at the bottom: it has no score
                ax.plot(g["lr"], 0, "v", ms=9, color=line.get_color(), clip_on=False)
                ax.annotate(f"diverged at step {g['diverged_at_step']}", (g["lr"], 0), fontsize=7,
                            textcoords="offset points", xytext=(4, 6), color=line.get_color())
            if g.get("pruned_at_step") is not None:
                ax.plot(g["lr"], 100 * g["val_accuracy"], "x", ms=9, color=line.get_color())
                ax.annotate(f"pruned at {g['pruned_at_step']}", (g["lr"], 100 * g["val_accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(4, -10), color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy at the end (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"learning-rate selection on seed {results['settings']['seeds'][0]} (circled: chosen)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _cost(plt: Any, results: dict[str, Any], path: str) -> str:
    from asymlora.sweep.stats import t_quantile

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results["summary"]:
        if r.get("all_diverged"):  # no score to place
            continue
        n, sd = r["n"], r["test_accuracy_std"]
        half = t_quantile(0.975, n - 1) * sd / np.sqrt(n) if n > 1 and sd == sd else 0.0
        ax.errorbar(r["trainable_params"], 100 * r["test_accuracy_mean"], yerr=100 * half, fmt="o", capsize=4,
                    label=r["strategy"])
        ax.annotate(r["strategy"], (r["trainable_params"], 100 * r["test_accuracy_mean"]), fontsize=7,
                    textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters (adapter and head; log scale)")
    ax.set_ylabel("test accuracy (%), mean and 95 % t-interval")
    ax.set_title("test accuracy against what each strategy trains (a cheaper row not worse: top left)",
                 fontsize=9)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def write_plots(results: dict[str, Any], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = [_bars(plt, results, os.path.join(out_dir, "metric_by_strategy.png")),
           _curves(plt, results, os.path.join(out_dir, "training_curves.png")),
           _cost(plt, results, os.path.join(out_dir, "cost.png"))]
    if results["settings"].get("selects_lr"):
        out.append(_lr_selection(plt, results, os.path.join(out_dir, "lr_selection.png")))
    s = results["settings"]
    verdicts = write_verdict_plot(results["verdicts"], os.path.join(out_dir, "verdicts.png"),
                                  f"{s['data']}, {s['model_name']}: paired test-accuracy differences over seeds "
                                  f"{s['seeds']}")
    return out + ([verdicts] if verdicts else [])
