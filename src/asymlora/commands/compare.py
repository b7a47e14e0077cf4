"""``asymlora compare``: every adapter strategy on one real task, over several seeds."""
from __future__ import annotations

import argparse
import os

from asymlora.commands.options import add_list, add_output_dir, str_list
from asymlora.tasks.default import DEFAULT, DEFAULT_DATA, DEFAULT_STRATEGIES, QUICK

DESCRIPTION = """\
Fine-tune a pretrained classifier once per strategy and seed, then print and save a table of
test accuracy and macro-F1 (mean ± std over seeds), trainable parameters, time and peak memory.

With no arguments: the bundled all-MiniLM-L6-v2 encoder on topic classification of Debian
fortunes (5 classes); strategies head-only, lora r=8, a-only r=8, b-only r=8 and b-only r=16
(the same trainable budget as lora r=8); seeds 0 1 2; 40 steps of batch 32, 48 tokens.
About 7 minutes on 2 idle CPU cores.
Writes results.json, results.csv, results.md, metric_by_strategy.png and training_curves.png.

Strategies: lora | b-only | a-only | head-only, with an optional @Kr suffix (rank K·r).
--data: fortunes | tweets | a .csv/.tsv/.jsonl/.json file with text and label columns |
a folder written by datasets' save_to_disk.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="compare lora / b-only / a-only / head-only on a real task",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local transformers model folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--data", default=DEFAULT_DATA, help="fortunes (default), tweets, or a local dataset path")
    p.add_argument("--text-column", default="text", help="text column of a local dataset (default: text)")
    p.add_argument("--label-column", default="label", help="label column of a local dataset (default: label)")
    add_list(p, "--strategies", kind=str_list, default=None,
             help=f"commas or spaces (default: {','.join(DEFAULT_STRATEGIES)})")
    add_list(p, "--ranks", "-r", default=None, help=f"adapter rank(s) r (default: {DEFAULT.r})")
    add_list(p, "--seeds", default=None, help="seeds, commas or spaces (default: 0,1,2)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default: {DEFAULT.steps})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: {DEFAULT.lr:g})")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {DEFAULT.batch_size})")
    p.add_argument("--max-length", type=int, default=None, help=f"max tokens per text (default: {DEFAULT.max_length})")
    p.add_argument("--eval-every", type=int, default=None, help=f"validate every N steps (default: {DEFAULT.eval_every})")
    p.add_argument("--max-train", type=int, default=None, help="cap on training examples (default: all)")
    p.add_argument("--max-val", type=int, default=None, help=f"cap on validation examples (default: {DEFAULT.max_val})")
    p.add_argument("--max-test", type=int, default=None, help="cap on test examples (default: all)")
    add_list(p, "--target-modules", kind=str_list, default=None,
                   help="adapted module names (default: the architecture's, query,value for BERT)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all available CPUs)")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="auto = bf16/fp16 on a GPU, fp32 on CPU")
    add_output_dir(p, "asymlora-compare", "output folder (default: ./asymlora-compare)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny subsets, 4 steps, 2 seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from asymlora.compare import CompareConfig

    b = QUICK if args.quick else DEFAULT
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return CompareConfig(
        model=args.model, data=args.data, text_column=args.text_column, label_column=args.label_column,
        strategies=pick(args.strategies, list(DEFAULT_STRATEGIES)), ranks=pick(args.ranks, [b.r]),
        seeds=pick(args.seeds, list(b.seeds)), steps=pick(args.steps, b.steps), lr=pick(args.lr, b.lr),
        batch_size=pick(args.batch_size, b.batch_size), max_length=pick(args.max_length, b.max_length),
        eval_every=pick(args.eval_every, b.eval_every), max_train=pick(args.max_train, b.max_train),
        max_val=pick(args.max_val, b.max_val), max_test=pick(args.max_test, b.max_test),
        output_dir=args.output_dir, threads=args.threads, mixed_precision=args.mixed_precision,
        target_modules=args.target_modules, quick=args.quick, progress=not args.no_progress,
        plots=not args.no_plots,
    )


def run(args: argparse.Namespace) -> int:
    from asymlora.compare import format_table, run_compare

    cfg = config_from_args(args)
    cfg.validate()  # bad input fails before any work
    results = run_compare(cfg)
    summary = results["summary"]
    print()
    print(format_table(summary))
    print()
    best = max(summary, key=lambda r: r["test_accuracy_mean"])
    print(f"best test accuracy: {best['strategy']} {100 * best['test_accuracy_mean']:.2f}% "
          f"({best['trainable_params']:,} trainable parameters)")
    out = os.path.abspath(cfg.output_dir)
    print(f"total {results['total_time_s']:.0f} s; wrote {out}/results.json, results.csv, results.md"
          + ("" if not cfg.plots else ", metric_by_strategy.png, training_curves.png"))
    return 0
