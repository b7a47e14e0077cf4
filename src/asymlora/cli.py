"""The ``asymlora`` command.

Each subcommand lives in ``asymlora.commands.<name>`` and exposes
``register(subparsers)`` which adds its parser and sets ``func``. Modules are
imported lazily so ``asymlora --help`` stays fast and a missing optional
dependency of one command does not break the others.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# subcommand name -> module under asymlora.commands
COMMANDS: dict[str, str] = {
    "compare": "compare",
    "train": "train",
    "run": "run",
    "results": "results",
    "theory": "theory",
    "similarity": "similarity",
    "export": "export",
    "bench": "bench",
    "probe": "probe",
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asymlora",
        description="Asymmetric LoRA: freeze a random orthonormal A, train B.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        first = next((a for a in argv if not a.startswith("-")), None)
        if first in COMMANDS:
            wanted = first
    for name, module in COMMANDS.items():
        if wanted is not None and name != wanted:
            continue
        try:
            mod = importlib.import_module(f"asymlora.commands.{module}")
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("asymlora.commands"):
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except BrokenPipeError:  # output piped into `head` etc.: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
