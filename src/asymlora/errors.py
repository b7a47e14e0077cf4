"""The project's error type for mistakes in what the user gave (as opposed to our bugs).

``asymlora.cli.main`` prints a :class:`UserError` as one line on stderr and exits 2; any other
exception is a bug and keeps its traceback. ``UserError`` subclasses ``ValueError`` so library
callers that already catch ``ValueError`` keep working.
"""
from __future__ import annotations

__all__ = ["UserError", "MissingFileError", "WorkerLost", "BaseMismatchWarning"]


class UserError(ValueError):
    """A bad argument, file, dataset or adapter folder supplied by the user; the message names
    the bad value and what would be valid."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or an asset they must install) is not there.

    Both a :class:`UserError` (the CLI prints it in one line) and a ``FileNotFoundError``
    (what library callers catch for a missing file)."""


class WorkerLost(RuntimeError):
    """A worker process of a sweep died from outside (SIGKILL, the out-of-memory killer) while it
    ran ``runs`` (their tags and names). Neither the user's mistake nor our bug: the CLI prints one
    line naming the lost runs and that ``--resume`` goes on from the finished ones, and exits 1."""

    def __init__(self, runs: list[str]) -> None:
        super().__init__("a worker process died (killed from outside: SIGKILL, out of memory?); the runs not "
                         "finished then (running or queued) are lost: " + ", ".join(runs))
        self.runs = runs


class BaseMismatchWarning(UserWarning):
    """An adapter is loaded onto base weights other than the ones it was trained on
    (``asymlora.formats.base_identity``); the CLI prints it as one line."""
