"""``asymlora compare``: every adapter strategy on one real task, over several seeds."""
from __future__ import annotations

import argparse

from asymlora.cli.options import add_model_and_data, add_output_dir, add_quantize
from asymlora.cli.protocol_options import add_protocol_options, protocol_settings
from asymlora.strategies import DEFAULT_STRATEGIES
from asymlora.sweep.budget import DEFAULT, QUICK

DESCRIPTION = """\
Fine-tune a pretrained classifier with each strategy at its own learning rate, over paired seeds;
print and save the table (test accuracy and macro-F1, mean ± std over seeds), the chosen rates,
and one verdict line per strategy against LoRA at the same r (mean paired difference with its 95 %
t-interval), drawn in verdicts.png.

Protocol: for each strategy, one pilot run per rate of --lrs on the first seed picks the rate by
validation accuracy at the end of the run (a best rate on the grid's edge gets --max-lr-extensions
more rates beyond it); a pilot clearly losing at 1/4 or 1/2 of the budget (its best possible final
score below the leader's current one, by more than the noise) stops there (--no-prune: never). The
other seeds train at the chosen rate. Every run (--stopping budget): --max-steps steps, warm-up,
then a linearly decaying rate, scored on test with its final weights — a budget shown long enough
by a twin run at twice the steps giving the same verdict (README). --stopping plateau: the older
rule (constant rate, stop after --patience evaluations without a new best, best weights restored).

With no arguments: the bundled all-MiniLM-L6-v2 encoder on topic classification of Debian
fortunes (5 classes); strategies head-only, lora r=8 and b-only r=8; lr grid 1e-3, 3e-3, 1e-2;
seeds 0 1 2; 360 steps of batch 16, 48 tokens. Measured on 2 cores of an Intel Xeon as a whole
process: 318 s with native bf16 (AVX512-BF16/AMX), 588 s without (AVX2 only: fp32, as with
--mixed-precision no; medians of 2); README, "Two commands". Writes results.json (with the time per phase),
results.csv, results.md, metric_by_strategy.png, training_curves.png, lr_selection.png, verdicts.png
and cost.png.

Strategies (--strategies, commas; NAME@Kr multiplies the rank by K). Each runs at its own rate
from the grid (times its scale, where it has one); its row carries its trained parameters,
adapter file size, peak memory and time per step, and cost.png plots accuracy against them:
{strategies}
  MODULE:FACTORY  your own: a factory (model, request) -> adapted model or PEFT config, or a
                 Strategy, in an importable module or a .py file (examples/custom_strategy.py)
A method PEFT cannot apply to the model is refused in one line before any run.
--data: fortunes | tweets | a .csv/.tsv/.jsonl/.json file with text and label columns |
a folder written by datasets' save_to_disk.
"""


def register(subparsers) -> None:
    from asymlora.strategies import describe_strategies

    p = subparsers.add_parser("compare",
                              help="compare lora / b-only / a-only / head-only / PEFT's methods on a real task",
                              description=DESCRIPTION.format(strategies=describe_strategies()),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_data(p)
    add_protocol_options(p, _compare_defaults(DEFAULT), lr_note="validation accuracy",
                         targets_note="the architecture's, query,value for BERT")
    add_quantize(p)
    add_output_dir(p, "asymlora-compare", "output folder (default: ./asymlora-compare)")
    p.add_argument("--quick", action="store_true",
                   help="about-a-minute smoke run of the same protocol on small subsets")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)


def _compare_defaults(b) -> dict:
    return dict(strategies=list(DEFAULT_STRATEGIES), ranks=[b.r], seeds=list(b.seeds), lrs=list(b.lrs),
                max_lr_extensions=b.max_lr_extensions, stopping="budget", max_steps=b.max_steps,
                eval_every=b.eval_every,
                patience=b.patience, min_steps=b.min_steps, warmup_steps=b.warmup_steps, batch_size=b.batch_size,
                max_length=b.max_length, max_train=b.max_train, max_val=b.max_val, max_test=b.max_test)


def config_from_args(args: argparse.Namespace):
    from asymlora.compare import CompareConfig

    return CompareConfig(
        model=args.model, data=args.data, text_column=args.text_column, label_column=args.label_column,
        **protocol_settings(args, _compare_defaults(QUICK if args.quick else DEFAULT)),
        quantize=args.quantize, output_dir=args.output_dir, quick=args.quick, plots=not args.no_plots,
    )


def run(args: argparse.Namespace) -> int:
    from asymlora.compare import format_report, run_compare

    cfg = config_from_args(args)
    cfg.validate()  # every bad setting is reported before any work
    print(format_report(run_compare(cfg), cfg))
    return 0
