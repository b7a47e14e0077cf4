"""``asymlora probe`` as a library call: the paper's §4 theory on a real classifier and real
training data, layer by layer, before any training.

:func:`run_probe` loads a sequence classifier (new head initialised as ``asymlora compare``
does for the same seed), runs ``max_examples`` training examples through it with hooks on the
target layers and reports, per layer, the input covariance's effective rank and the expected
fraction of a proxy target update that b-only, a-only and both-trained adapters capture at rank
r (``asymlora.analysis.probe`` has the math and the choice of proxy). :func:`format_report` and
:func:`write_outputs` turn the result into text and files.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from asymlora.errors import UserError

__all__ = ["ProbeSettings", "run_probe", "format_report", "write_outputs", "load_classifier", "skeleton",
           "example_batches", "classification_loss", "find_targets", "plot", "MAX_MEMORY_GB"]

MAX_MEMORY_GB = 8.0
STRATEGY_STYLES = {  # column -> (label, colour, marker)
    "frac_a_only": ("a-only (B random, frozen)", "tab:red", "s"),
    "frac_b_only": ("b-only (A random, frozen)", "tab:blue", "o"),
    "frac_both": ("both trained (optimal)", "tab:green", "^"),
}


@dataclass
class ProbeSettings:
    """What to probe. ``model`` None: the bundled all-MiniLM-L6-v2; ``data``: a named dataset
    (``asymlora.compare.data.NAMED_DATASETS``) or a local file/folder; ``target_modules`` None:
    the architecture's default, else names, one regex, or ``["all-linear"]``."""

    model: str | None = None
    data: str = "fortunes"
    text_column: str = "text"
    label_column: str = "label"
    target_modules: list[str] | None = None
    rank: int = 8
    max_examples: int = 256
    batch_size: int = 16
    max_length: int = 64
    mc_samples: int = 200
    seed: int = 0


# ---- model and data ----------------------------------------------------------------------------
def load_classifier(path: str, label_names: list[str], seed: int) -> Any:
    """The pretrained encoder with a new classification head drawn as compare's seed ``seed``.

    UserError when the folder has no weights or weights other than the head are missing (the
    probe must see the real pretrained weights, not a random init)."""
    import transformers

    from asymlora.compare.task import head_name, reinit_head
    from asymlora.compare.task import load_classifier as load_sequence_classifier

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = load_sequence_classifier(path, label_names, require_weights=True)
    reinit_head(model, seed, head_name(model))
    return model


def skeleton(path: str) -> Any:
    """The classifier's architecture on the ``meta`` device (no weights: instant), to check the
    target modules and the rank before loading data and weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path!r}: not a sequence-classification architecture: {err}") from None


def example_batches(data: Any, tokenizer: Any, s: ProbeSettings) -> list[dict[str, Any]]:
    """``s.max_examples`` stratified training examples, tokenized and padded in batches."""
    from asymlora.compare.data import (
        PadCollator,
        TokenizedDataset,
        subsample_stratified,
    )

    split = subsample_stratified(data.train, s.max_examples, s.seed)
    if len(split) == 0:
        raise UserError(f"--data {s.data!r}: the training split is empty")
    ds = TokenizedDataset(split, tokenizer, s.max_length)
    collate = PadCollator(tokenizer.pad_token_id or 0)
    return [collate([ds[i] for i in range(start, min(start + s.batch_size, len(ds)))])
            for start in range(0, len(ds), s.batch_size)]


def classification_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Cross-entropy summed over the batch: every example weighs the same across batches."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], reduction="sum")


def find_targets(model: Any, names: list[str] | None, r: int) -> dict[str, Any]:
    """Target layers (head excluded); UserError for no match, r too large or too much memory."""
    from asymlora.analysis.probe import probe_memory_bytes
    from asymlora.compare.task import head_name
    from asymlora.core.inject import find_target_modules
    from asymlora.core.layer import linear_shape
    from asymlora.sweep.config import target_spec

    try:
        targets = find_target_modules(model, target_spec(names), exclude=[head_name(model)])
    except UserError:
        raise
    except ValueError as err:
        raise UserError(f"--target-modules: {err}") from None
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    small = min(shapes.items(), key=lambda kv: min(kv[1]))
    if r > min(small[1]):
        raise UserError(f"--rank {r} exceeds layer {small[0]!r} (d_in={small[1][0]}, d_out={small[1][1]}); "
                        f"valid: 1..{min(small[1])}")
    need = probe_memory_bytes(shapes.values()) / 2**30
    if need > MAX_MEMORY_GB:
        raise UserError(f"--target-modules: {len(targets)} layers need {need:.1f} GiB of float64 statistics "
                        f"(> {MAX_MEMORY_GB:g} GiB); probe fewer layers at a time, e.g. a regex over some blocks")
    return targets


# ---- run -----------------------------------------------------------------------------------------
def run_probe(s: ProbeSettings) -> dict[str, Any]:
    """Load, collect statistics, analyse every layer; returns the results (``rows``, ``summary``,
    ``config``, ``timing_s``). Bad targets or rank fail on the weightless skeleton, before any
    data or weights load."""
    import torch
    from transformers import AutoTokenizer

    from asymlora.analysis.probe import analyse_layer, collect_moments, summarize
    from asymlora.bundled import resolve_model
    from asymlora.compare.data import load_text_dataset

    t0 = time.perf_counter()
    path = resolve_model(s.model)
    find_targets(skeleton(path), s.target_modules, s.rank)
    try:
        data = load_text_dataset(s.data, s.seed, text_column=s.text_column, label_column=s.label_column)
    except UserError:
        raise
    except ValueError as err:
        raise UserError(f"--data {s.data!r}: {err}") from None
    model = load_classifier(path, data.label_names, s.seed)
    targets = find_targets(model, s.target_modules, s.rank)
    batches = example_batches(data, AutoTokenizer.from_pretrained(path, local_files_only=True), s)
    moments = collect_moments(model, batches, classification_loss, targets)
    t_collect = time.perf_counter() - t0
    rows = [analyse_layer(m, s.rank, n_samples=s.mc_samples, seed=[s.seed, i])
            for i, m in enumerate(moments.values())]
    return {
        "description": "asymlora probe: Zhu et al. 2024 §4 (Lemmas 4.1/4.2, Theorem 4.3) on real layer inputs; "
                       "proxy Δ = -½·G·Σ⁺ from the step-0 loss gradient G with a fresh head",
        "config": {"model": os.path.abspath(path), "model_type": model.config.model_type, "data": s.data,
                   "target_modules": s.target_modules or "architecture default", "r": s.rank,
                   "examples": sum(len(b["labels"]) for b in batches), "batch_size": s.batch_size,
                   "max_length": s.max_length, "mc_samples": s.mc_samples, "seed": s.seed,
                   "torch": torch.__version__},
        "timing_s": {"collect": round(t_collect, 2), "total": round(time.perf_counter() - t0, 2)},
        "rows": rows,
        "summary": summarize(rows),
    }


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def format_report(res: dict[str, Any]) -> str:
    """The per-layer table, the recommendation per layer group and the time, as printed by
    ``asymlora probe``."""
    from asymlora.analysis.similarity import short_layer_names
    from asymlora.text import format_table

    rows, cfg = res["rows"], res["config"]
    lines = [f"asymlora probe: {cfg['model_type']} on {cfg['data']}, {cfg['examples']} examples, r={cfg['r']}; "
             f"fractions of the proxy signal ‖ΔΣ^½‖² captured (b-only: mean ± s.e. over {cfg['mc_samples']} "
             "Haar draws)"]
    names = short_layer_names([r["layer"] for r in rows])
    table = [[n, f"{r['d_in']}→{r['d_out']}", str(r["n_tokens"]), _fmt(r["effective_rank"], ".1f"),
              _fmt(r["frac_a_only"]), f"{_fmt(r['frac_b_only'])}±{_fmt(r['se_b_only'], '.3f')}",
              _fmt(r["frac_both"]), _fmt(r["b_over_both"], ".2f"),
              "-" if r["r90_b_only"] is None else str(r["r90_b_only"])] for n, r in zip(names, rows)]
    lines.append(format_table(["layer", "d_in→d_out", "tokens", "eff.rank Σ", "a-only", "b-only", "both",
                               "b/both", "r90"], table))
    lines.append("\nSummary (r90: smallest rank at which b-only keeps 90% of both; '-' = not within min(d_in, d_out)):")
    lines += [f"  {s['group']}: {s['recommendation']}" for s in res["summary"]]
    timing = res["timing_s"]
    lines.append(f"\n{timing['total']:.0f} s ({timing['collect']:.0f} s loading and forward/backward)")
    return "\n".join(lines)


# ---- files -----------------------------------------------------------------------------------
def plot(path: str, res: dict[str, Any]) -> None:
    """One panel per layer group: fraction captured at rank r across depth, one line per strategy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from asymlora.fileio import atomic_path

    rows = res["rows"]
    groups = list(dict.fromkeys(r["group"] for r in rows))
    fig = Figure(figsize=(4.6 * len(groups), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    for ax, group in zip(axes, groups):
        sub = [r for r in rows if r["group"] == group]
        xs = list(range(len(sub)))
        for key, (label, color, marker) in STRATEGY_STYLES.items():
            err = [2 * r["se_b_only"] for r in sub] if key == "frac_b_only" else None
            ax.errorbar(xs, [r[key] for r in sub], yerr=err, label=label, color=color, marker=marker, capsize=2)
        ax.set_xticks(xs)
        ax.set_xlabel("depth (layer index in the group)")
        ax.set_title(f"{group.split('.*.')[-1]}  ({sub[0]['d_in']}→{sub[0]['d_out']})", fontsize=10)
        ax.set_yscale("log")  # a-only's r/d_out and b-only sit decades below "both" on real layers
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"fraction of proxy signal at r={rows[0]['r']} (b-only ±2 s.e.)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"asymlora probe: {res['config']['model_type']} on {res['config']['data']}", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_outputs(res: dict[str, Any], out_dir: str, with_plot: bool = True) -> list[str]:
    from asymlora.fileio import atomic_write_csv, atomic_write_text

    paths = [os.path.join(out_dir, n) for n in ("probe.csv", "probe.json")]
    atomic_write_csv(paths[0], res["rows"])
    atomic_write_text(paths[1], json.dumps(res, indent=2, allow_nan=True) + "\n")
    if with_plot:
        paths.append(os.path.join(out_dir, "probe.png"))
        plot(paths[-1], res)
    return paths
