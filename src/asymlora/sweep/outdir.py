"""What a sweep may do with its output folder: nothing the user already has there is ours to
delete (docs/design.md).

- A folder holding an earlier sweep (its ``results.json``, or the ``results.partial.json`` of an
  interrupted ``--overwrite``) is refused before any work unless ``--resume`` (go on with it) or
  ``--overwrite`` (replace it) is given.
- With ``--overwrite`` the earlier results stay in place until the new sweep is complete: the new
  sweep's partial results (what ``--resume`` reads) go to ``results.partial.json``, and
  ``results.json`` is replaced in one rename at the end.
- What a sweep keeps beside its results (sft's ``adapters/``) is written to
  ``runs/<sweep id>/outputs/`` while it runs and moved into the output folder only when the sweep
  is complete, just before its results.json: an interrupted ``--overwrite`` leaves the earlier
  sweep's adapters as they were, and the complete one replaces only the same-named entries.
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

__all__ = ["RESULTS", "PARTIAL", "earlier_sweep", "check_output_dir", "partial_results", "staged_dir",
           "SweepFolder"]

RESULTS = "results.json"
PARTIAL = "results.partial.json"   # an --overwrite sweep's partial results, beside the earlier complete ones
RUNS = "runs"                      # paused pilots' checkpoints, one subfolder per sweep
STAGED = "outputs"                 # in a sweep's subfolder: what it keeps beside its results, until complete


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
                     what: str = "sweep", resumable: bool = True) -> None:
    """UserError, before any work, when a fresh run would land on an earlier one: ``output_dir``
    holds one of ``markers`` (what a finished or interrupted ``what`` leaves there). Every
    command with ``--output-dir`` keeps this rule; one that cannot go on with an earlier run
    (``resumable=False``) names ``--overwrite`` only."""
    if resume and overwrite:
        raise UserError(f"--resume and --overwrite exclude each other: --resume goes on with the {what} in "
                        f"{output_dir}, --overwrite starts a new one that replaces it")
    found = next((p for p in (os.path.join(output_dir, m) for m in markers) if os.path.lexists(p)), None)
    if found and not resume and not overwrite:
        go_on = "--resume to go on with it, " if resumable else ""
        raise UserError(f"{output_dir} holds an earlier {what} ({found}); add {go_on}--overwrite to replace it once "
                        f"this {what} completes, or choose another --output-dir")


def staged_dir(checkpoint_dir: str | None, output_dir: str) -> str:
    """Where a sweep writes what it keeps beside its results (sft: ``adapters/<run>``) while it
    runs: ``runs/<sweep id>/outputs/`` (``checkpoint_dir`` is the sweep's subfolder, set by the
    driver), moved into ``output_dir`` by :meth:`SweepFolder.publish`; ``output_dir`` itself
    when no sweep folder is set (a run called outside a sweep)."""
    return os.path.join(checkpoint_dir, STAGED) if checkpoint_dir else output_dir


def _relocated(obj: Any, old: str, new: str) -> Any:
    """``obj`` (a results dict) with every path under ``old`` (strings and keys) put under ``new``."""
    def move(value: Any) -> Any:
        if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
            return new + value[len(old):]
        return value

    if isinstance(obj, dict):
        return {move(k): _relocated(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_relocated(v, old, new) for v in obj)
    return move(obj)


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

    @property
    def staged(self) -> str:
        """This sweep's staging folder (:func:`staged_dir`)."""
        return staged_dir(self.checkpoints, self.output_dir)

    def publish(self, results: dict[str, Any]) -> dict[str, Any]:
        """Once the sweep is complete, before its results.json is written: move what it staged
        into the output folder and return ``results`` with the paths that named the staged
        entries naming the published ones. A staged folder whose name is taken by a folder
        (``adapters/``) goes in entry by entry; an entry of the same name (an earlier sweep's
        adapter of the same run, replaced by ``--overwrite``) is replaced, nothing else is
        removed. A file of the user's where a staged folder goes is left alone: a UserError
        says where the staged folder is."""
        staged = self.staged
        if not os.path.isdir(staged):
            return results
        for name in sorted(os.listdir(staged)):
            src, dst = os.path.join(staged, name), os.path.join(self.output_dir, name)
            if os.path.isdir(src) and os.path.isdir(dst):  # (a link to a folder: into the folder it names)
                for child in sorted(os.listdir(src)):
                    self._replace(os.path.join(src, child), os.path.join(dst, child))
                os.rmdir(src)
            elif os.path.lexists(dst):
                raise UserError(f"{dst} is not a folder, so this sweep's {name}/ (in {src}) cannot go there; "
                                "rename that file and add --resume to finish the sweep")
            else:
                os.rename(src, dst)
        os.rmdir(staged)
        return _relocated(results, os.path.abspath(staged), os.path.abspath(self.output_dir))

    def _replace(self, src: str, dst: str) -> None:
        """``src`` renamed to ``dst``; an entry already at ``dst`` is set aside first and removed
        only once ``src`` is in place."""
        if not os.path.lexists(dst):
            os.rename(src, dst)
            return
        aside = f"{dst}.replaced-{self.sweep_id or uuid.uuid4().hex[:12]}"
        os.rename(dst, aside)
        os.rename(src, dst)
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside)
        else:
            os.remove(aside)

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
