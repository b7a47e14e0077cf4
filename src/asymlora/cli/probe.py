"""``asymlora probe``: the paper's §4 theory on your model and data, layer by layer, before training.

Loads a sequence classifier (new head initialised as ``asymlora compare`` does for the same
seed), runs a few hundred training examples through it with hooks on the target layers and
reports, per layer, the input covariance's effective rank and the expected fraction of a proxy
target update that b-only, a-only and both-trained adapters capture at rank r
(``asymlora.analysis.probe`` has the math and the choice of proxy).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import time
from typing import Any

from asymlora.errors import UserError

DEFAULT_OUT = "asymlora-probe"
MAX_MEMORY_GB = 8.0
STRATEGY_STYLES = {  # column -> (label, colour, marker)
    "frac_a_only": ("a-only (B random, frozen)", "tab:red", "s"),
    "frac_b_only": ("b-only (A random, frozen)", "tab:blue", "o"),
    "frac_both": ("both trained (optimal)", "tab:green", "^"),
}
DESCRIPTION = """\
Before any training: run EXAMPLES real training examples through the frozen model with hooks on
the target layers; per layer estimate the input second moment Σ (exact, float64) and a proxy
target update Δ = -½·G·Σ⁺ from the loss gradient G at the start of fine-tuning (fresh head),
then apply the paper's §4 formulas: the effective rank of Σ, the expected fraction of the proxy
signal ‖ΔΣ^½‖² that b-only (Monte-Carlo ± s.e.), a-only (exactly r/d_out) and both trained
(Eckart–Young) capture at rank r, and r90: the smallest rank at which b-only keeps 90% of both.
Writes probe.csv, probe.json and probe.png to --output-dir and prints a recommendation per
layer group. About a minute on 2 CPU cores for the bundled MiniLM on query/value.
"""


# ---- arguments ---------------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    from asymlora.cli.options import (
        add_list,
        add_model_and_data,
        add_output_dir,
        str_list,
    )

    p = subparsers.add_parser("probe",
                              help="predict per layer whether b-only/a-only lose signal (paper §4, no training)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data(p)
    add_list(p, "--target-modules", kind=str_list, default=None,
             help="module names (commas or spaces), one regex, or all-linear (default: the architecture's)")
    p.add_argument("-r", "--rank", type=int, default=8, help="adapter rank r (default: 8)")
    p.add_argument("--examples", type=int, default=256, help="training examples to run (default: 256)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default: 16)")
    p.add_argument("--max-length", type=int, default=64, help="max tokens per text (default: 64)")
    p.add_argument("--mc-samples", type=int, default=200, help="Haar draws for b-only at rank r (default: 200)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split/subset, head init and Monte Carlo (default: 0)")
    add_output_dir(p, DEFAULT_OUT, f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true", help="skip probe.png")
    p.set_defaults(func=run)


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no model or data, all reported together before any work."""
    from asymlora.cli.options import Problems
    from asymlora.compare.data import NAMED_DATASETS

    problems = Problems()
    for flag, value, low in (("-r/--rank", args.rank, 1), ("--examples", args.examples, 1),
                             ("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, 8),
                             ("--mc-samples", args.mc_samples, 2), ("--seed", args.seed, 0)):
        problems.check(value >= low, f"{flag} {value}: must be an integer >= {low}")
    problems.check(args.model is None or os.path.isfile(os.path.join(args.model, "config.json")),
                   f"--model {args.model!r} is not a folder with a transformers model (config.json)")
    problems.check(args.data in NAMED_DATASETS or os.path.exists(args.data),
                   f"--data {args.data!r} is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor an existing "
                   "file or folder")
    problems.check(args.target_modules is None or bool(args.target_modules),
                   "--target-modules is empty; give module names, one regex, or all-linear")
    problems.output_folder("--output-dir", args.output_dir)
    problems.raise_if_any()


# ---- model and data ----------------------------------------------------------------------------
def load_classifier(path: str, label_names: list[str], seed: int) -> Any:
    """The pretrained encoder with a new classification head drawn as compare's seed ``seed``.

    UserError when the folder has no weights or weights other than the head are missing (the
    probe must see the real pretrained weights, not a random init)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    from asymlora.compare.task import head_name, reinit_head

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)}, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path!r}: cannot load a sequence classifier with weights: {err}") from None
    head = head_name(model)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(head + ".") and k != head]
    if missing:
        raise UserError(f"--model {path!r}: {len(missing)} pretrained weights are missing (e.g. {missing[0]!r}); "
                        "the probe needs the real weights")
    reinit_head(model, seed, head)
    return model


def skeleton(path: str) -> Any:
    """The classifier's architecture on the ``meta`` device (no weights: instant), to check the
    target modules and the rank before loading data and weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path!r}: not a sequence-classification architecture: {err}") from None


def example_batches(data: Any, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--examples`` stratified training examples, tokenized and padded in batches."""
    from asymlora.compare.data import (
        PadCollator,
        TokenizedDataset,
        subsample_stratified,
    )

    split = subsample_stratified(data.train, args.examples, args.seed)
    if len(split) == 0:
        raise UserError(f"--data {args.data!r}: the training split is empty")
    ds = TokenizedDataset(split, tokenizer, args.max_length)
    collate = PadCollator(tokenizer.pad_token_id or 0)
    return [collate([ds[i] for i in range(s, min(s + args.batch_size, len(ds)))])
            for s in range(0, len(ds), args.batch_size)]


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
        raise UserError(f"-r/--rank {r} exceeds layer {small[0]!r} (d_in={small[1][0]}, d_out={small[1][1]}); "
                        f"valid: 1..{min(small[1])}")
    need = probe_memory_bytes(shapes.values()) / 2**30
    if need > MAX_MEMORY_GB:
        raise UserError(f"--target-modules: {len(targets)} layers need {need:.1f} GiB of float64 statistics "
                        f"(> {MAX_MEMORY_GB:g} GiB); probe fewer layers at a time, e.g. a regex over some blocks")
    return targets


# ---- run -----------------------------------------------------------------------------------------
def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Load, collect statistics, analyse every layer; returns the results dict (written by ``run``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer

    from asymlora.analysis.probe import analyse_layer, collect_moments, summarize
    from asymlora.compare.data import load_text_dataset
    from asymlora.sweep.budget import default_model_path

    t0 = time.perf_counter()
    path = args.model or default_model_path()
    find_targets(skeleton(path), args.target_modules, args.rank)  # bad targets/rank fail before any work
    try:
        data = load_text_dataset(args.data, args.seed, text_column=args.text_column, label_column=args.label_column)
    except UserError:
        raise
    except ValueError as err:
        raise UserError(f"--data {args.data!r}: {err}") from None
    model = load_classifier(path, data.label_names, args.seed)
    targets = find_targets(model, args.target_modules, args.rank)
    batches = example_batches(data, AutoTokenizer.from_pretrained(path), args)
    moments = collect_moments(model, batches, classification_loss, targets)
    t_collect = time.perf_counter() - t0
    rows = [analyse_layer(m, args.rank, n_samples=args.mc_samples, seed=[args.seed, i])
            for i, m in enumerate(moments.values())]
    return {
        "description": "asymlora probe: Zhu et al. 2024 §4 (Lemmas 4.1/4.2, Theorem 4.3) on real layer inputs; "
                       "proxy Δ = -½·G·Σ⁺ from the step-0 loss gradient G with a fresh head",
        "config": {"model": os.path.abspath(path), "model_type": model.config.model_type, "data": args.data,
                   "target_modules": args.target_modules or "architecture default", "r": args.rank,
                   "examples": sum(len(b["labels"]) for b in batches), "batch_size": args.batch_size,
                   "max_length": args.max_length, "mc_samples": args.mc_samples, "seed": args.seed,
                   "torch": torch.__version__},
        "timing_s": {"collect": round(t_collect, 2), "total": round(time.perf_counter() - t0, 2)},
        "rows": rows,
        "summary": summarize(rows),
    }


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, spec)


def print_report(res: dict[str, Any]) -> None:
    from asymlora.analysis.similarity import short_layer_names
    from asymlora.text import format_table

    rows, cfg = res["rows"], res["config"]
    print(f"asymlora probe: {cfg['model_type']} on {cfg['data']}, {cfg['examples']} examples, r={cfg['r']}; "
          f"fractions of the proxy signal ‖ΔΣ^½‖² captured (b-only: mean ± s.e. over {cfg['mc_samples']} Haar draws)")
    names = short_layer_names([r["layer"] for r in rows])
    table = [[n, f"{r['d_in']}→{r['d_out']}", str(r["n_tokens"]), _fmt(r["effective_rank"], ".1f"),
              _fmt(r["frac_a_only"]), f"{_fmt(r['frac_b_only'])}±{_fmt(r['se_b_only'], '.3f')}",
              _fmt(r["frac_both"]), _fmt(r["b_over_both"], ".2f"),
              "-" if r["r90_b_only"] is None else str(r["r90_b_only"])] for n, r in zip(names, rows)]
    print(format_table(["layer", "d_in→d_out", "tokens", "eff.rank Σ", "a-only", "b-only", "both",
                         "b/both", "r90"], table))
    print("\nSummary (r90: smallest rank at which b-only keeps 90% of both; '-' = not within min(d_in, d_out)):")
    for s in res["summary"]:
        print(f"  {s['group']}: {s['recommendation']}")
    print(f"\n{res['timing_s']['total']:.0f} s ({res['timing_s']['collect']:.0f} s loading and forward/backward)")


# ---- artefacts -----------------------------------------------------------------------------------
def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    from asymlora.fileio import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


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
    from asymlora.fileio import atomic_write_text

    paths = [os.path.join(out_dir, n) for n in ("probe.csv", "probe.json")]
    write_csv(paths[0], res["rows"])
    atomic_write_text(paths[1], json.dumps(res, indent=2, allow_nan=True) + "\n")
    if with_plot:
        paths.append(os.path.join(out_dir, "probe.png"))
        plot(paths[-1], res)
    return paths


def run(args: argparse.Namespace) -> int:
    validate(args)  # a UserError here or in probe() is one line and exit 2 (asymlora.cli.main)
    res = probe(args)
    print_report(res)
    paths = write_outputs(res, args.output_dir, not args.no_plot)
    print("wrote " + ", ".join(paths))
    return 0
