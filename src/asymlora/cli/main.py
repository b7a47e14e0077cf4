"""The ``asymlora`` command.

Each subcommand lives in ``asymlora.cli.<name>`` and exposes
``register(subparsers)`` which adds its parser and sets ``func``. Modules are
imported lazily so ``asymlora --help`` stays fast and a missing optional
dependency of one command does not break the others.

Errors: a mistake in what the user gave (a bad flag value, a missing file, a bad dataset or
adapter folder, a tampered file) raises :class:`asymlora.errors.UserError`; ``main`` prints it
as one line, ``asymlora <command>: error: <message>``, removes the output folder if this call
created it, and returns 2. An ``--output-dir`` that cannot be written (a file on the way, a
read-only file system) is refused the same way before any work; an ``OSError`` during the work (a
full disk) is one line naming the file and the OS error, exit 1 (atomic writes leave the files
written before as they were). Any other exception is a bug and keeps its traceback. ``--debug``
(anywhere on the command line) or ``ASYMLORA_DEBUG=1`` shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from asymlora.errors import BaseMismatchWarning, UserError, WorkerLost
from asymlora.fileio import unwritable_folder
from asymlora.startup import start_command_process
from asymlora.version import __version__

# subcommand name -> module under asymlora.cli
COMMANDS: dict[str, str] = {
    "compare": "compare",
    "sft": "sft",
    "train": "train",
    "run": "run",
    "results": "results",
    "theory": "theory",
    "similarity": "similarity",
    "export": "export",
    "merge": "merge",
    "bench": "bench",
    "probe": "probe",
    "eval": "eval",
}


DEBUG_FLAG = "--debug"
DEBUG_ENV = "ASYMLORA_DEBUG"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``asymlora compare: error: ...``) instead of the usage
    block; subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="asymlora",
        description="Asymmetric LoRA: freeze a random orthonormal A, train B.",
        epilog=f"Mistakes in the input are reported in one line (exit status 2); {DEBUG_FLAG} "
        f"or {DEBUG_ENV}=1 shows the full traceback.",
    )
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show tracebacks for input errors too")
    parser.add_argument("--version", action="version", version=f"asymlora {__version__}")
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
            mod = importlib.import_module(f"asymlora.cli.{module}")
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("asymlora.cli"):
                continue  # command not built yet
            raise
        mod.register(sub)
    return parser


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove ``--debug`` wherever it stands (before a ``--`` separator)."""
    end = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:end]
    return [a for i, a in enumerate(argv) if i >= end or a != DEBUG_FLAG], debug


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "theory_command", None)
    return " ".join(["asymlora", args.command] + ([sub] if sub else []))


def _warnings_in_one_line(command: str) -> None:
    """Our warnings to the user (an adapter on another base) as one line each,
    ``asymlora <command>: warning: <message>``; other warnings as Python shows them."""
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, BaseMismatchWarning):
            print(f"{command}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line


def main(argv: Sequence[str] | None = None) -> int:
    start_command_process()  # offline, and no third-party chatter before the command's first line
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a one-line usage error already printed
        return stop.code if isinstance(stop.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    out = getattr(args, "output_dir", None)
    out_existed = out is None or os.path.lexists(out)
    why = unwritable_folder(out) if out is not None else None
    if why is not None:  # a bad --output-dir: said before any work
        print(f"{_command_name(args)}: error: cannot write to --output-dir {out}: {why}", file=sys.stderr)
        return 2
    previous = warnings.showwarning
    _warnings_in_one_line(_command_name(args))
    try:
        return _call(args, out, out_existed, debug)
    finally:
        warnings.showwarning = previous


def _call(args: argparse.Namespace, out: str | None, out_existed: bool, debug: bool) -> int:
    """Run the command; each way it can fail, in one line (module docstring)."""
    try:
        result = args.func(args)
    except UserError as err:
        # this call created the output folder: leave nothing half-written
        if out is not None and not out_existed and os.path.isdir(out):
            shutil.rmtree(out, ignore_errors=True)
        if debug:
            raise
        message = " ".join(str(err).split())  # one line
        print(f"{_command_name(args)}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # SIGINT, or SIGTERM during a sweep (asymlora.sweep.interrupt)
        signum = getattr(err, "signum", signal.SIGINT)
        from asymlora.sweep.outdir import partial_results

        saved = partial_results(out) if out and os.path.isdir(out) else None
        kept = f"; the finished runs are kept in {saved} (add --resume to go on)" if saved else ""
        print(f"{_command_name(args)}: stopped by {signal.Signals(signum).name}{kept}", file=sys.stderr)
        if hasattr(err, "signum"):  # a sweep: its workers are stopped and its results on disk; skip the
            sys.stdout.flush()      # interpreter's teardown of the loaded models (tens of seconds on a busy
            sys.stderr.flush()      # machine) so that the process ends when asked to
            os._exit(128 + signum)
        return 128 + signum
    except WorkerLost as err:  # a worker killed from outside: the finished runs are saved, --resume goes on
        from asymlora.sweep.outdir import partial_results

        saved = partial_results(out) if out and os.path.isdir(out) else None
        kept = (f"; the finished runs are kept in {saved}: add --resume to go on" if saved else
                "; nothing finished yet: run it again")
        print(f"{_command_name(args)}: {err}{kept}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` etc.: stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as err:  # a full disk, a folder gone read-only during the work: what failed, in one line
        if debug:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"{_command_name(args)}: error: {where}{err.strerror or err}"
              + (" (files written before are left as they were)" if out else ""), file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
