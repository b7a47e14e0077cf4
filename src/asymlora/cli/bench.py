"""``asymlora bench``: run the speed/memory benchmark suite of a source checkout.

A thin wrapper around ``python -m benchmarks.run`` (the suite lives in the repository's
``benchmarks/`` folder, next to ``src/``; it is not part of the installed package).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from asymlora.cli.options import Problems, add_list, add_output_dir, str_list
from asymlora.errors import UserError

BENCHMARKS = ("train", "layer_memory", "init", "checkpoint", "inference")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="speed and memory benchmarks vs PEFT LoRA and the paper's code",
        description="Time and memory of a training step, adapter init, checkpoints and merged inference, "
        "asymlora side by side with PEFT LoRA (needs a source checkout: benchmarks/ next to src/).",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke run")
    add_output_dir(parser, None,
                   "output folder for results.json / results.md (default: benchmarks/, a temp folder with --quick)")
    add_list(parser, "--only", kind=str_list, default=None, metavar="NAME", help=f"subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--merge", action="store_true", help="update only the --only benchmarks in OUT/results.json")
    parser.set_defaults(func=run)


def _find_suite():
    try:
        return importlib.import_module("benchmarks.run")
    except ModuleNotFoundError:
        pass
    root = Path(__file__).resolve().parents[3]  # src/asymlora/commands/bench.py -> repository root
    if not (root / "benchmarks" / "run.py").is_file():
        raise UserError(
            f"benchmarks/ not found next to {root / 'src'}: `asymlora bench` needs a source checkout "
            "(git clone + pip install -e .)"
        )
    sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.run")


def run(args: argparse.Namespace) -> int:
    p = Problems()
    p.at_least("--threads", args.threads, 1)
    bad = [b for b in args.only or [] if b not in BENCHMARKS]
    p.check(not bad, f"unknown benchmark(s) {bad}; valid: {', '.join(BENCHMARKS)}")
    p.output_folder("--output-dir", args.output_dir)
    p.raise_if_any()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = (["--quick"] if args.quick else []) + (["--out", args.output_dir] if args.output_dir else [])
    argv += (["--only", *args.only] if args.only else []) + ["--threads", str(args.threads)]
    argv += ["--merge"] if args.merge else []
    return int(_find_suite().main(argv) or 0)
