"""``asymlora bench``: run the speed/memory benchmark suite of a source checkout.

A thin wrapper around ``python -m benchmarks.run``. The suite lives in the repository's
``benchmarks/`` folder, next to ``src/``, and is not part of the installed package: the
command looks for it in the current folder (the repository root), loads that package by its
path (nothing is added to ``sys.path``), and takes the list of benchmarks from it
(``benchmarks.run.BENCHMARKS``), so the two cannot disagree.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from asymlora.cli.options import Problems, add_list, add_output_dir, add_overwrite, str_list
from asymlora.errors import UserError

SUITE = "benchmarks"
NOT_FOUND = ("the benchmarks are part of a source checkout, not of the installed package: run asymlora bench "
             "from the repository root ({folder}/ not found in {cwd})")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="speed and memory benchmarks vs PEFT LoRA and the paper's code (from a source checkout)",
        description="Time and memory of a training step, adapter init, checkpoints, merged inference and "
        "mixed-adapter batches, asymlora side by side with PEFT LoRA. Runs the suite in benchmarks/ of a "
        "source checkout: call it from the repository root.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke run")
    add_output_dir(parser, None, "output folder for results.json / results.md (default: benchmarks/, a temp folder "
                                 "with --quick)")
    add_list(parser, "--only", kind=str_list, default=None, metavar="NAME",
             help="run only these benchmarks, commas or spaces (the names of benchmarks/run.py; a wrong one is "
                  "reported with the valid ones)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--merge", action="store_true", help="update only the --only benchmarks in DIR/results.json")
    add_overwrite(parser, "benchmark results")
    parser.set_defaults(func=run)


def load_suite(root: Path | None = None) -> ModuleType:
    """``benchmarks.run`` of the checkout at ``root`` (default: the current folder); a
    :class:`UserError` when there is no ``benchmarks/run.py`` there (an installed package)."""
    folder = (root or Path.cwd()) / SUITE
    if not (folder / "run.py").is_file():
        raise UserError(NOT_FOUND.format(folder=SUITE, cwd=root or Path.cwd()))
    loaded = sys.modules.get(SUITE)
    if loaded is None or [os.path.realpath(p) for p in getattr(loaded, "__path__", [])] != [os.path.realpath(folder)]:
        for name in [n for n in sys.modules if n == SUITE or n.startswith(SUITE + ".")]:
            del sys.modules[name]  # another folder's suite: load this checkout's
        spec = importlib.util.spec_from_file_location(SUITE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        assert spec is not None and spec.loader is not None  # a .py path always gets a source loader
        package = importlib.util.module_from_spec(spec)
        sys.modules[SUITE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{SUITE}.run")


def run(args: argparse.Namespace) -> int:
    p = Problems()
    p.at_least("--threads", args.threads, 1)
    p.output_folder("--output-dir", args.output_dir)
    try:
        suite = load_suite()
    except UserError as err:
        p.add(str(err))
    else:
        bad = [b for b in args.only or [] if b not in suite.BENCHMARKS]
        p.check(not bad, f"unknown benchmark(s) {bad}; valid: {', '.join(suite.BENCHMARKS)}")
        if not args.merge:  # --merge goes on with the earlier results; --quick alone writes to a new temp folder
            out = args.output_dir or (None if args.quick else suite.HERE)
            p.earlier_output(out, args.overwrite, ("results.json", "results.md"), "benchmark results")
    p.raise_if_any()
    argv = (["--quick"] if args.quick else []) + (["--output-dir", args.output_dir] if args.output_dir else [])
    argv += (["--only", *args.only] if args.only else []) + ["--threads", str(args.threads)]
    argv += ["--merge"] if args.merge else []
    return int(suite.main(argv) or 0)
