"""``asymlora probe``: the paper's §4 theory on your model and data, layer by layer, before
training (the engine is ``asymlora.analysis.probe_run``)."""
from __future__ import annotations

import argparse
import os
from typing import Any

DEFAULT_OUT = "asymlora-probe"
DESCRIPTION = """\
Before any training: run --max-examples real training examples through the frozen model with
hooks on the target layers; per layer estimate the input second moment Σ (exact, float64) and a
proxy target update Δ = -½·G·Σ⁺ from the loss gradient G at the start of fine-tuning (fresh head),
then apply the paper's §4 formulas: the effective rank of Σ, the expected fraction of the proxy
signal ‖ΔΣ^½‖² that b-only (Monte-Carlo ± s.e.), a-only (exactly r/d_out) and both trained
(Eckart–Young) capture at rank r, and r90: the smallest rank at which b-only keeps 90% of both.
Writes probe.csv, probe.json and probe.png to --output-dir and prints a recommendation per
layer group. About a minute on 2 CPU cores for the bundled MiniLM on query/value.
"""


def register(subparsers: Any) -> None:
    from asymlora.cli.options import (
        add_list,
        add_model_and_data,
        add_output_dir,
        add_overwrite,
        str_list,
    )

    p = subparsers.add_parser("probe",
                              help="predict per layer whether b-only/a-only lose signal (paper §4, no training)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data(p)
    add_list(p, "--target-modules", kind=str_list, default=None,
             help="module names (commas or spaces), one regex, or all-linear (default: the architecture's)")
    p.add_argument("--rank", "-r", type=int, default=8, metavar="R", help="adapter rank r (default: 8)")
    p.add_argument("--max-examples", type=int, default=256, help="training examples to run (default: 256)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default: 16)")
    p.add_argument("--max-length", type=int, default=64, help="max tokens per text (default: 64)")
    p.add_argument("--mc-samples", type=int, default=200, help="Haar draws for b-only at rank r (default: 200)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split/subset, head init and Monte Carlo (default: 0)")
    add_output_dir(p, DEFAULT_OUT, f"output folder (default: ./{DEFAULT_OUT})")
    add_overwrite(p, "probe")
    p.add_argument("--no-plots", action="store_true", help="skip probe.png")
    p.set_defaults(func=run)


def validate(args: argparse.Namespace) -> None:
    """Every check that needs no model or data, all reported together before any work."""
    from asymlora.bundled import ENCODER, model_problem
    from asymlora.cli.options import Problems
    from asymlora.compare.data import NAMED_DATASETS

    problems = Problems()
    for flag, value, low in (("--rank", args.rank, 1), ("--max-examples", args.max_examples, 1),
                             ("--batch-size", args.batch_size, 1), ("--max-length", args.max_length, 8),
                             ("--mc-samples", args.mc_samples, 2), ("--seed", args.seed, 0)):
        problems.check(value >= low, f"{flag} {value}: must be an integer >= {low}")
    if model := model_problem(args.model, ENCODER):
        problems.add(model)
    problems.check(args.data in NAMED_DATASETS or os.path.exists(args.data),
                   f"--data {args.data!r} is neither a named dataset ({', '.join(NAMED_DATASETS)}) nor an existing "
                   "file or folder")
    problems.check(args.target_modules is None or bool(args.target_modules),
                   "--target-modules is empty; give module names, one regex, or all-linear")
    problems.output_folder("--output-dir", args.output_dir)
    problems.earlier_output(args.output_dir, args.overwrite, ("probe.csv", "probe.json", "probe.png"), "probe")
    problems.raise_if_any()


def run(args: argparse.Namespace) -> int:
    from asymlora.analysis.probe_run import ProbeSettings, format_report, run_probe, write_outputs

    validate(args)  # a UserError here or in run_probe() is one line and exit 2 (asymlora.cli.main)
    res = run_probe(ProbeSettings(
        model=args.model, data=args.data, text_column=args.text_column, label_column=args.label_column,
        target_modules=args.target_modules, rank=args.rank, max_examples=args.max_examples,
        batch_size=args.batch_size, max_length=args.max_length, mc_samples=args.mc_samples, seed=args.seed))
    print(format_report(res))
    paths = write_outputs(res, args.output_dir, not args.no_plots)
    print("wrote " + ", ".join(paths))
    return 0
