"""``asymlora merge``: one adapter whose update is a weighted sum of saved adapters' updates.

    asymlora merge ADAPTER ADAPTER [...] [--weights W ...] [--normalize] -o OUT
    asymlora merge ADAPTER ADAPTER [...] --method svd --rank K -o OUT
"""
from __future__ import annotations

import argparse
import math
import os

from asymlora.cli.options import Problems, add_list, add_output_dir, add_strict, float_list

DESCRIPTION = """\
Write to --output-dir one adapter folder whose update is sum_i w_i * dW_i of the ADAPTER folders'
updates (dW = s*B*A), without loading the base model. The result is a saved adapter like any
other: load it with asymlora.load_adapter, convert it with `asymlora export`.

--method exact (default): b-only adapters made with one seed and rank share their frozen A
(checked on the recorded fingerprints and the rebuilt tensors, not on the configs), so the sum
is exactly s*(sum_i w_i*B_i)*A: a b-only adapter of the same rank. Anything else (LoRA, different
seeds, a-only mixed with b-only) is refused, naming the adapters that differ, unless an
approximation is asked for: linear (A's and B's averaged separately: naive FedAvg), cat (exact,
rank adds up) or svd --rank K (best rank-K approximation). Every method prints its relative
error ||sum w*dW - result|| / ||sum w*dW||, overall and for the worst layer.

Weights may be negative (task vectors); --normalize divides them by their sum (sample counts as
weights: federated averaging). Saved modules_to_save (e.g. a classifier head) are refused unless
--modules-to-save weighted (the same weighted sum of their parameters) or drop."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from asymlora.merging import METHODS, MODULES_TO_SAVE_CHOICES

    p = subparsers.add_parser(
        "merge",
        help="one adapter from a weighted sum of saved adapters (exact for b-only adapters of one seed)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter folders written by asymlora.save_adapter")
    add_list(p, "--weights", "-w", kind=float_list, default=None, metavar="W",
             help="one weight per ADAPTER, commas or spaces, negative allowed (default: 1/K each, the mean)")
    p.add_argument("--normalize", action="store_true",
                   help="divide the weights by their sum (e.g. client sample counts: FedAvg)")
    p.add_argument("--method", default="exact", choices=METHODS,
                   help="exact (default; b-only adapters of one seed), linear, cat, or svd (needs --rank)")
    p.add_argument("--rank", "-r", type=int, default=None, metavar="K", help="rank of the result of --method svd")
    p.add_argument("--modules-to-save", default="refuse", choices=MODULES_TO_SAVE_CHOICES,
                   help="what to do with saved modules_to_save: refuse (default), weighted, drop")
    add_output_dir(p, None, "output folder for the new adapter (required; must not exist or be empty)")
    add_strict(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymlora.formats.native import CONFIG_NAME
    from asymlora.merging import save_weighted_adapter

    p = Problems()
    for folder in args.adapters:
        p.check(os.path.isfile(os.path.join(folder, CONFIG_NAME)),
                f"ADAPTER {folder!r} is not an adapter folder (no {CONFIG_NAME})")
    k = len(args.adapters)
    weights = args.weights if args.weights is not None else [1.0 / k] * k
    if args.weights is not None:
        p.check(len(weights) == k, f"--weights has {len(weights)} value{'s' * (len(weights) != 1)} {weights} for "
                f"{k} adapters: give one weight per ADAPTER")
        for w in weights:
            p.check(math.isfinite(w), f"--weights {w} is not a finite number")
        if args.normalize and all(math.isfinite(w) for w in weights):
            p.check(sum(weights) != 0, f"--normalize: the weights {weights} sum to 0")
    if args.method == "svd":
        p.check(args.rank is not None and args.rank >= 1, f"--method svd needs --rank K >= 1, got {args.rank}")
    else:
        p.check(args.rank is None, f"--rank is only used by --method svd (got --method {args.method})")
    abs_inputs = [os.path.abspath(f) for f in args.adapters]
    p.check(len(set(abs_inputs)) == k, f"ADAPTER folders {args.adapters} name one folder twice")
    if p.check(args.output_dir is not None, "--output-dir/-o DIR is required"):
        out = args.output_dir
        p.check(not (os.path.lexists(out) and not (os.path.isdir(out) and not os.listdir(out))),
                f"--output-dir {out!r} already exists and is not empty; remove it or pick another folder")
    p.raise_if_any()
    report = save_weighted_adapter(args.adapters, weights, args.output_dir, method=args.method, rank=args.rank,
                                   normalize=args.normalize, modules_to_save=args.modules_to_save,
                                   strict=args.strict)
    print(report)
    print(f"wrote adapter to {args.output_dir}")
    return 0
