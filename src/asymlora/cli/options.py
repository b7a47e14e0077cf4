"""The conventions every ``asymlora`` command shares.

* ``--output-dir/-o DIR`` names the one folder a command writes into (``--out`` still works
  as a hidden alias, so older scripts keep running).
* List options (``--seeds``, ``--rank``, ...) take values separated by commas, spaces or
  both: ``--seeds 0,1,2``, ``--seeds 0 1 2`` and ``--seeds "0, 1" 2`` are the same.
* Progress bars and lines (``--no-progress`` turns them off) are drawn only on a terminal: in
  a log file or CI their carriage returns made lines of thousands of characters, so there a
  command prints its ordinary lines only (one per finished run for compare and sft)
  (:func:`show_progress`).
* Arguments are checked before any work, and every bad one is reported at once
  (:class:`Problems`), as one :class:`asymlora.errors.UserError`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from asymlora.errors import UserError
from asymlora.text import plural  # noqa: F401  (commands import it from here with the other helpers)


def add_output_dir(parser: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """``--output-dir/-o`` (dest ``output_dir``) plus the hidden alias ``--out``."""
    parser.add_argument("--output-dir", "-o", dest="output_dir", default=default, metavar="DIR", help=help)
    parser.add_argument("--out", dest="output_dir", help=argparse.SUPPRESS)


def add_overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: replace what an earlier ``what`` wrote in --output-dir (the one flag every
    command with -o takes for it: ``asymlora.sweep.outdir.check_output_dir``)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace the earlier {what} in --output-dir once this one completes (without it, "
                             "such a folder is refused)")


def add_strict(parser: argparse.ArgumentParser) -> None:
    """``--strict``: an adapter trained on other base weights is refused instead of warned about
    (``asymlora.formats.base_identity``)."""
    parser.add_argument("--strict", action="store_true",
                        help="refuse an adapter trained on other base weights than the model's (default: a warning)")


def _split(text: str, convert: Callable[[str], Any], kind: str) -> list[Any]:
    items = text.replace(",", " ").split()
    try:
        return [convert(x) for x in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {kind} separated by commas or spaces") from None


def int_list(text: str) -> list[int]:
    """``"0,1 2"`` -> ``[0, 1, 2]`` (argparse type)."""
    return _split(text, int, "integers")


def float_list(text: str) -> list[float]:
    return _split(text, float, "numbers")


def str_list(text: str) -> list[str]:
    return _split(text, str, "names")


class _Flatten(argparse.Action):
    """With ``nargs="+"`` and a list ``type``: join every token's items into one list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [x for v in values for x in v])


def add_list(parser: Any, *flags: str, kind: Callable[[str], list[Any]] = int_list, **kwargs: Any) -> None:
    """A list option that accepts commas or spaces (``--seeds 0,1,2`` or ``--seeds 0 1 2``)."""
    parser.add_argument(*flags, type=kind, nargs="+", action=_Flatten, **kwargs)


class Problems:
    """Collects every problem with the arguments, then raises them together as one
    :class:`UserError` (``"--q must be > 0, got 0; --n must be >= 1, got -5"``)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.add(message)
        return ok

    def at_least(self, flag: str, value: Any, minimum: float, optional: bool = True) -> None:
        """``value`` (a number or a list of numbers; None allowed when ``optional``) >= minimum."""
        if value is None:
            self.check(optional, f"{flag} is required")
            return
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= minimum):
                self.add(f"{flag} must be >= {minimum:g}, got {v!r}")

    def positive(self, flag: str, value: Any) -> None:
        """``value`` (a number or list; None = not given) is finite and > 0."""
        for v in [] if value is None else value if isinstance(value, (list, tuple)) else [value]:
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                self.add(f"{flag} must be a finite number > 0, got {v!r}")

    def existing(self, flag: str, path: str | None, kind: str = "path") -> None:
        """``path`` (None = not given) exists: a folder for ``kind="folder"``, a file for ``"file"``."""
        if path is None:
            return
        ok = {"folder": os.path.isdir, "file": os.path.isfile}.get(kind, os.path.exists)(path)
        self.check(ok, f"{flag} {path!r} does not exist" + ("" if kind == "path" or not os.path.exists(path)
                                                            else f" as a {kind}"))

    def output_folder(self, flag: str, path: str | None) -> None:
        """An output folder may exist, but not as a file."""
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            self.add(f"{flag} {path!r} exists and is not a folder")

    def earlier_output(self, path: str | None, overwrite: bool, markers: tuple[str, ...], what: str) -> None:
        """A folder holding what an earlier ``what`` wrote there (any of ``markers``) is refused
        unless --overwrite: a second run never destroys the first (``asymlora.sweep.outdir``)."""
        from asymlora.sweep.outdir import check_output_dir

        if path is None:
            return
        try:
            check_output_dir(path, resume=False, overwrite=overwrite, markers=markers, what=what, resumable=False)
        except UserError as err:
            self.add(str(err))

    def raise_if_any(self) -> None:
        if self.items:
            raise UserError("; ".join(self.items))


def check_distinct(problems: Problems, flag: str, values: Sequence[Any] | None) -> None:
    if values is not None and len(set(values)) != len(values):
        problems.add(f"{flag} {values!r} repeats a value")


def add_quantize(parser: argparse.ArgumentParser, default_help: str = "none: the base stays float") -> None:
    """``--quantize SCHEME``: load the base model's linear layers quantized (``asymlora.core.quant``;
    the value is checked with ``quant.check_scheme`` before any work, with the other arguments)."""
    from asymlora.core.quant import SCHEMES

    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help=f"quantize the frozen base model's linear layers (not the head): {', '.join(SCHEMES)} "
                             f"(QLoRA-style; needs bitsandbytes / torchao) (default: {default_help})")


def add_model_and_data(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--data``, ``--text-column``, ``--label-column``: the text-classification
    inputs that compare, train and probe share (defaults: the bundled model and fortunes)."""
    from asymlora.bundled import ENCODER, model_help
    from asymlora.sweep.budget import DEFAULT_DATA

    parser.add_argument("--model", default=None, help=model_help(ENCODER))
    parser.add_argument("--data", default=DEFAULT_DATA, help="fortunes (default), tweets, or a local dataset path")
    parser.add_argument("--text-column", default="text", help="text column of a local dataset (default: text)")
    parser.add_argument("--label-column", default="label", help="label column of a local dataset (default: label)")


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress: not with ``--no-progress``, and only when stderr (where bars go,
    also the sweep workers', which inherit it) is a terminal."""
    return not args.no_progress and sys.stderr.isatty()
