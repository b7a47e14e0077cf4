"""What ``asymlora compare`` writes and prints: the per-strategy summary, the paired verdicts,
the results table, results.json / results.csv / results.md (plots: ``compare.plots``)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

from asymlora.compare.config import CompareConfig, StrategySpec
from asymlora.fileio import atomic_write_text
from asymlora.sweep.divergence import DIVERGED_NOTE, all_diverged_rows, diverged_cell
from asymlora.sweep.stats import PairedDifference, cheaper_not_worse, paired_verdicts, summarize_runs
from asymlora.text import mean_pm, plural

__all__ = ["summarize", "paired_verdicts", "assemble", "format_table", "format_report", "write_reports"]

_SUMMARY_KEYS = ("test_accuracy", "test_macro_f1", "val_accuracy", "val_macro_f1", "lr", "best_step", "steps",
                 "val_slope_last_quarter", "wall_time_s", "peak_memory_bytes", "saved_activation_bytes",
                 "final_train_loss", "adapter_file_bytes", "step_time_s", "train_accuracy", "generalization_gap")


def summarize(runs: list[dict[str, Any]], order: list[str],
              keys: tuple[str, ...] = _SUMMARY_KEYS) -> list[dict[str, Any]]:
    """``asymlora.sweep.stats.summarize_runs`` over compare's metrics by default."""
    return summarize_runs(runs, order, keys)


def assemble(cfg: CompareConfig, settings: dict[str, Any], specs: list[StrategySpec], runs: list[dict[str, Any]],
             selections: list[dict[str, Any]], phases: Any, elapsed: float, complete: bool) -> dict[str, Any]:
    """The results dict written to results.json. Each run gets its training time per step (wall
    time less evaluation, over the steps it took), a cost column beside its file size and peak memory."""
    runs = [dict(r, step_time_s=_step_time(r)) for r in runs]
    verdicts = paired_verdicts(runs, specs, cfg.margin)
    summary = all_diverged_rows(summarize(runs, [s.label for s in specs]), selections, [s.label for s in specs])
    return {"complete": complete, "settings": settings, "total_time_s": elapsed, "phases_s": phases.to_dict(),
            "lr_selection": selections, "summary": summary,
            "verdicts": [v.to_dict() for v in verdicts], "verdict_lines": [v.line() for v in verdicts],
            "cheaper_not_worse": cheaper_not_worse(verdicts, summary),
            "generalization_gap": _gaps(runs, specs, summary, cfg.margin), "runs": runs}


def _gaps(runs: list[dict[str, Any]], specs: list[StrategySpec], summary: list[dict[str, Any]],
          margin: float) -> dict[str, Any] | None:
    """The train − test accuracy gap of each run's final weights (train side: a stratified train
    sample as large as validation), per strategy and paired against LoRA by seed. The
    generalisation bound (docs/design.md) is smaller for fewer trained parameters, so it orders
    the gaps b-only ≤ LoRA; a difference carries its interval but no verdict word, since a smaller
    gap is not a better model. None for runs recorded before the train sample was scored."""
    scored = [r for r in runs if not r.get("diverged")]
    if not scored or any(r.get("generalization_gap") is None for r in scored):
        return None
    diffs = paired_verdicts(scored, specs, margin, metric="generalization_gap")
    return {"per_strategy": {row["strategy"]: [row["generalization_gap_mean"], row["generalization_gap_std"]]
                             for row in summary if "generalization_gap_mean" in row},
            "paired": [{k: v for k, v in d.to_dict().items() if k != "verdict"} for d in diffs],
            "lines": [_gap_line(d) for d in diffs]}


def _gap_line(d: PairedDifference) -> str:
    n = len(d.seeds)
    ci = f" [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}]" if math.isfinite(d.lo) else ""
    reading = ("smaller gap" if d.hi < 0 else "larger gap" if d.lo > 0 else "the interval spans 0") if ci else ""
    return (f"{d.method} − {d.reference}, train − test gap: {100 * d.mean:+.1f} pts{ci} over {plural(n, 'seed')}"
            + (f" ({reading})" if reading else ""))


def gap_section(results: dict[str, Any]) -> str:
    """The gap paragraph of the report (empty for runs recorded without the train sample)."""
    gap = results.get("generalization_gap")
    if not gap:
        return ""
    n = results["settings"]["used_sizes"].get("train_sample")
    per = "; ".join(f"{name} {mean_pm(100 * m, 100 * sd)}" for name, (m, sd) in gap["per_strategy"].items())
    return "\n".join([f"Train − test accuracy gap of the final weights (train sample of {n}), in points: {per}.",
                      *gap["lines"]])


def _step_time(rec: dict[str, Any]) -> float | None:
    steps = rec.get("steps") or 0
    if not steps or rec.get("wall_time_s") is None:
        return None
    return (rec["wall_time_s"] - (rec.get("eval_time_s") or 0.0)) / steps


def _mib(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x / 2**20:,.1f}"


def _ms(x: float | None) -> str:
    return "-" if x is None or x != x else f"{1000 * x:.0f}"


def _kib(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x / 2**10:,.0f}"


def format_table(summary: list[dict[str, Any]], markdown: bool = False) -> str:
    """Results table: chosen lr, test metrics mean ± std over seeds, convergence, budget. Under
    the plateau rule the mean best step and the runs that stopped on a plateau; under the fixed
    budget, the steps every run took."""
    plateau = any(r.get("stopping") == "plateau" for r in summary)
    head = ["strategy", "trainable", "lr", "test acc", "test macro-F1", "val acc"]
    head += ["best step", "plateau"] if plateau else ["steps"]
    head += ["saved act. (MiB)", "adapter", "file (KiB)", "peak mem (MiB)", "ms/step"]
    body = []
    for r in summary:
        if r.get("all_diverged"):
            body.append([r["strategy"], "-", "-", diverged_cell(r)] + [""] * (len(head) - 4))
            continue
        row = [
            r["strategy"], f"{r['trainable_params']:,}", f"{r['lr_mean']:g}",
            mean_pm(r["test_accuracy_mean"], r["test_accuracy_std"], scale=100),
            mean_pm(r["test_macro_f1_mean"], r["test_macro_f1_std"], scale=100),
            f"{100 * r['val_accuracy_mean']:.2f}",
        ]
        row += [f"{r['best_step_mean']:.0f}", f"{r['plateaued']}/{r['n']}"] if plateau else [f"{r['steps_mean']:.0f}"]
        row += [f"{r.get('saved_activation_bytes_mean', float('nan')) / 2**20:,.1f}",
                f"{r['adapter_params']:,}", _kib(r.get("adapter_file_bytes_mean")),
                _mib(r.get("peak_memory_bytes_mean")),
                _ms(r.get("step_time_s_mean"))]
        if r.get("diverged"):
            row[3] += f" ({r['diverged']} diverged)"
        body.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def fmt(row: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(row) for row in body])


_CSV_COLUMNS = ["strategy", "preset", "rank", "seed", "lr", "role", "trainable_params", "adapter_params",
                "test_accuracy", "test_macro_f1", "val_accuracy", "val_macro_f1", "best_step", "steps",
                "stopped_early", "val_slope_last_quarter", "final_train_loss", "wall_time_s", "eval_time_s",
                "peak_memory_bytes", "saved_activation_bytes", "adapter_file_bytes", "step_time_s",
                "train_accuracy", "generalization_gap"]


def _csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(_CSV_COLUMNS)
    for r in results["runs"]:
        w.writerow([r.get(c) for c in _CSV_COLUMNS])
    return buf.getvalue()


def _markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    sel = "; ".join(f"{x['strategy']} " + (DIVERGED_NOTE if x["chosen_lr"] is None else f"{x['chosen_lr']:g}")
                    + (f" ({x['at_edge']} edge of the grid)" if x.get("at_edge") else "")
                    for x in results["lr_selection"])
    grid = ", ".join(f"{x:g}" for x in s["lr_grid"])
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in results["phases_s"].items())
    if s.get("stopping", "plateau") == "budget":
        rule = (f"{s['max_steps']} steps ({s['warmup_steps']} of them warm-up): {s['lr_schedule']}; "
                f"scored with the final weights (the lr search's pilots validate every {s['eval_every']} steps"
                + (f"; a pilot clearly losing at step {' or '.join(map(str, s['rungs']))} is pruned there"
                   if s.get("rungs") else "") + ")")
    else:
        rule = (f"{s['warmup_steps']} warm-up steps then a constant rate, validation every {s['eval_every']} steps, "
                f"stop after {s['patience']} evaluations without a new best (counted from step {s['min_steps']}; at "
                f"most {s['max_steps']} steps), test scored with the weights of the best validation step")
    md = [
        "# asymlora compare", "",
        f"Model `{s['model_name']}` ({s['model_params'] / 1e6:.1f}M parameters, {s['model_type']}), data "
        f"`{s['data']}` ({len(s['dataset']['label_names'])} classes: {', '.join(s['dataset']['label_names'])}); "
        f"train {s['used_sizes']['train']}, val {s['used_sizes']['val']}, test {s['used_sizes']['test']}; "
        f"majority class {100 * s['majority_class_test_accuracy']:.2f}% of test.",
        "",
        f"Protocol: learning rate per strategy from {{{grid}}} by validation accuracy on seed {s['seeds'][0]} "
        f"(chosen: {sel}); every run: batch {s['batch_size']} ({s['batching']}), max {s['max_length']} tokens, "
        f"{rule}. alpha = 2r; adapters on {s['adapted_layers']}; head "
        f"`{s['head']}` trained in every run (head-only: on cached frozen features). Seeds {s['seeds']}, paired; "
        f"{s['threads']} thread(s) on {s['machine']['device']}.",
        "",
        "Mean ± sample std over seeds. *plateau* (plateau rule only): runs whose validation accuracy stopped "
        "improving before the step cap. *saved act.*: the largest total size of the tensors autograd kept for "
        "backward in one step (parameters and buffers excluded).", "",
        format_table(results["summary"], markdown=True), "",
        "Paired differences in test accuracy (per seed, then mean with a 95 % t-interval; verdict margin "
        f"±{100 * s['margin']:g} point):", "",
        *[f"- {line}" for line in results["verdict_lines"]], "",
        *([results["cheaper_not_worse"], ""] if results.get("cheaper_not_worse") else []),
        *([gap_section(results), ""] if results.get("generalization_gap") else []),
        f"Total time {results['total_time_s']:.0f} s ({phases}).", "",
    ]
    return "\n".join(md)


def write_reports(results: dict[str, Any], out_dir: str, plots: bool = True) -> list[str]:
    """results.json, results.csv (one row per run), results.md and, with ``plots``, the PNGs."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, text in (("results.json", json.dumps(results, indent=1)), ("results.csv", _csv(results)),
                       ("results.md", _markdown(results))):
        path = os.path.join(out_dir, name)
        atomic_write_text(path, text)
        written.append(path)
    if plots:
        from asymlora.compare.plots import write_plots

        written += write_plots(results, out_dir)
    return written


PLOT_FILES = ("metric_by_strategy.png", "training_curves.png", "lr_selection.png", "verdicts.png", "cost.png")


def format_report(results: dict[str, Any], cfg: CompareConfig) -> str:
    """What ``asymlora compare`` prints at the end: the table, the chosen rates, the verdicts, the
    time and the files written (``asymlora.sweep.report``)."""
    from asymlora.sweep.report import SelectionMetric, format_sweep_report

    files = ["results.json", "results.csv", "results.md", *(PLOT_FILES if cfg.plots else ())]
    return format_sweep_report(
        results, tables=[format_table(results["summary"])],
        metric=SelectionMetric("validation accuracy", "val_accuracy", lambda v: f"{100 * v:.1f}"),
        first_seed=cfg.seeds[0], margin=cfg.margin, verdicts_on="test-accuracy", output_dir=cfg.output_dir,
        files=files, sections=[results.get("cheaper_not_worse") or "", gap_section(results)])
