"""What a sweep may do with its output folder: nothing the user already has there is ours to
delete (docs/design.md).

- A folder holding an earlier sweep (its ``results.json``, or the ``results.partial.json`` of an
  interrupted ``--overwrite``) is refused before any work unless ``--resume`` (go on with it) or
  ``--overwrite`` (replace it) is given.
- With ``--overwrite`` the earlier results stay in place until the new sweep is complete: the new
  sweep's partial results (what ``--resume`` reads) go to ``results.partial.json``, and
  ``results.json`` is replaced in one rename at the end.
- The checkpoints of paused pilots live in ``runs/<sweep id>/``, a folder this sweep made; only
  it is removed at the end (and ``runs/`` when this sweep made it and it is left empty), so a
  user's own ``runs/`` (``-o .``) is never touched.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from typing import Any

from asymlora.errors import UserError

__all__ = ["RESULTS", "PARTIAL", "earlier_sweep", "check_output_dir", "partial_results", "SweepFolder"]

RESULTS = "results.json"
PARTIAL = "results.partial.json"   # an --overwrite sweep's partial results, beside the earlier complete ones
RUNS = "runs"                      # paused pilots' checkpoints, one subfolder per sweep


def earlier_sweep(output_dir: str) -> str | None:
    """The results file of an earlier sweep in ``output_dir`` (None when there is none)."""
    for name in (PARTIAL, RESULTS):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            return path
    return None


def partial_results(output_dir: str) -> str | None:
    """The file ``--resume`` goes on from: the partial results of the latest sweep in
    ``output_dir`` (None when there is none)."""
    return earlier_sweep(output_dir)


def check_output_dir(output_dir: str, resume: bool, overwrite: bool, markers: tuple[str, ...] = (PARTIAL, RESULTS),
                     what: str = "sweep") -> None:
    """UserError, before any work, when a fresh run would land on an earlier one: ``output_dir``
    holds one of ``markers`` (what a finished or interrupted ``what`` leaves there)."""
    if resume and overwrite:
        raise UserError(f"--resume and --overwrite exclude each other: --resume goes on with the {what} in "
                        f"{output_dir}, --overwrite starts a new one that replaces it")
    found = next((p for p in (os.path.join(output_dir, m) for m in markers) if os.path.lexists(p)), None)
    if found and not resume and not overwrite:
        raise UserError(f"{output_dir} holds an earlier {what} ({found}); add --resume to go on with it, "
                        f"--overwrite to replace it once this {what} completes, or choose another --output-dir")


class SweepFolder:
    """A sweep's output folder: where its partial results go and where its paused pilots'
    checkpoints live. ``saved`` is the partial results ``--resume`` goes on from (None for a
    fresh sweep); ``state()`` is what the partial results keep of this folder for it."""

    def __init__(self, output_dir: str, saved: dict[str, Any] | None) -> None:
        self.output_dir = output_dir
        resuming_overwrite = saved is not None and os.path.isfile(os.path.join(output_dir, PARTIAL))
        fresh_over_earlier = saved is None and earlier_sweep(output_dir) is not None
        self.partial_path = os.path.join(output_dir, PARTIAL if resuming_overwrite or fresh_over_earlier
                                         else RESULTS)
        runs = os.path.join(output_dir, RUNS)
        kept = (saved or {}).get("sweep_folder")
        if saved is not None and kept is None:  # saved by an older version: checkpoints directly in runs/
            self.sweep_id, self.made_runs, self.checkpoints = None, False, runs
        elif kept is not None:
            self.sweep_id, self.made_runs = str(kept["id"]), bool(kept["made_runs"])
            self.checkpoints = os.path.join(runs, self.sweep_id)
        else:
            self.sweep_id, self.made_runs = uuid.uuid4().hex[:12], not os.path.lexists(runs)
            self.checkpoints = os.path.join(runs, self.sweep_id)

    def state(self) -> dict[str, Any]:
        return {"sweep_folder": {"id": self.sweep_id, "made_runs": self.made_runs}} if self.sweep_id else {}

    def finish(self) -> None:
        """After the complete results are written: remove what this sweep made for itself."""
        if self.sweep_id is not None:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            if self.made_runs:
                with contextlib.suppress(OSError):  # not empty: something else was put there since
                    os.rmdir(os.path.join(self.output_dir, RUNS))
        if os.path.basename(self.partial_path) == PARTIAL:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.partial_path)
