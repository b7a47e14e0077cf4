"""The one sweep driver: a task (compare, sft) gives what differs — how to load it, describe it,
run one job, score and report — and :func:`run_sweep` does the rest, the same for every task
(docs/design.md §4):

1. the output folder is checked (``asymlora.sweep.outdir``: an earlier sweep is never lost) and,
   with ``--resume``, the saved settings are checked before anything is loaded;
2. the task is loaded once in this process; its data and model are fingerprinted (and checked
   against the saved ones); a strategy that cannot adapt the model is refused here;
3. the :class:`~asymlora.sweep.schedule.Schedule` releases jobs to the backend
   (``asymlora.sweep.backends``) through :func:`~asymlora.sweep.engine.run_jobs`, the journal
   replaying what an interrupted sweep finished, the partial results saved after each;
4. the task's last phase (sft's benchmarks), its results dict and its reports.
"""
from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from asymlora.fileio import atomic_write_text
from asymlora.sweep.backends import InProcess, Job, adapter_backend, worker_count
from asymlora.sweep.engine import run_jobs
from asymlora.sweep.outdir import SweepFolder, check_output_dir
from asymlora.sweep.resume import (
    Journal,
    check_fingerprints,
    data_fingerprint,
    load_partial,
    model_fingerprint,
    settings_fingerprint,
)
from asymlora.sweep.schedule import Schedule
from asymlora.sweep.timing import Phases
from asymlora.text import plural

__all__ = ["Loaded", "SweepTask", "Sweep", "run_sweep"]


def _log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Loaded:
    """A task loaded in this process: its ``state`` (what a job runs on), the fingerprints of
    its data and model (``--resume`` refuses other ones) and the seconds each loading phase took."""

    state: Any
    fingerprints: dict[str, str]
    phases: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fingerprinted(cls, state: Any, model_path: str, splits: Sequence[Any], timings: dict[str, float]) -> Loaded:
        """A task whose data are ``splits`` (train, validation, test) and whose model is the
        folder ``model_path``; ``timings`` holds its "load" and "tokenise" seconds."""
        return cls(state, {"data": data_fingerprint(*splits), "model": model_fingerprint(model_path)},
                   {"load": timings["load"], "tokenise": timings["tokenise"]})


@dataclass
class Sweep:
    """What the driver hands back to the task's last steps: the specs, the schedule that ran
    them, the settings block, the timings and the workers used."""

    specs: list[Any]
    sched: Schedule
    settings: dict[str, Any]
    phases: Phases
    workers: int
    t_start: float


class SweepTask(ABC):
    """One task of the sweep engine. ``prepare_worker(cfg)`` and ``execute(state, cfg, job,
    tag) -> (record, eval seconds)`` are module-level functions (a spawned worker or a Ray task
    receives them): the task loaded in a worker, and one job on it."""

    prepare_worker: Callable[[Any], Any]
    execute: Callable[..., Any]

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def load(self) -> Loaded:
        """The task loaded in this process."""

    def refuse_unfit(self, state: Any, specs: list[Any]) -> None:
        """Raise a UserError for a strategy that cannot adapt the task's model (before any run)."""
        return None

    @abstractmethod
    def settings(self, state: Any, specs: list[Any], threads: int, probe: dict[int, float],
                 workers: int) -> dict[str, Any]:
        """The settings block of results.json."""

    def before_runs(self, state: Any, specs: list[Any], settings: dict[str, Any], phases: Phases) -> Any:
        """Work done once before the runs; returns the state the jobs run on in this process."""
        return state

    @abstractmethod
    def intro(self, state: Any, specs: list[Any], settings: dict[str, Any], sched: Schedule, workers: int,
              threads: int) -> str:
        """The sweep's first line."""

    @abstractmethod
    def report_run(self, tag: str, rec: dict[str, Any], pilot: bool) -> None:
        """Print one finished run."""

    def runs_here(self, job: Job) -> bool:
        """Whether ``job`` runs in this process rather than on the backend (compare's head-only
        runs read features computed here)."""
        return False

    def first_jobs(self, sched: Schedule, specs: list[Any]) -> list[Job]:
        return [job for spec in specs for job in sched.pilot_jobs(spec)]

    def finish_runs(self, state: Any, sweep: Sweep) -> None:
        """Work that completes the runs, counted in their wall time (sft: the deferred test
        scores of the winning pilots)."""
        return None

    def last_phase(self, state: Any, sweep: Sweep) -> None:
        """A phase after the runs, before the results are assembled (sft: the benchmarks)."""
        return None

    @abstractmethod
    def assemble(self, sweep: Sweep, complete: bool) -> dict[str, Any]:
        """The results dict (partial ones while the sweep runs)."""

    @abstractmethod
    def write(self, results: dict[str, Any], sweep: Sweep) -> dict[str, Any]:
        """Write the reports of the finished sweep; returns the final results."""


def run_sweep(task: SweepTask, threads: int, probe: dict[int, float], t_start: float) -> dict[str, Any]:
    """Run ``task`` by the protocol (the steps of this module's docstring); returns its results."""
    cfg = task.cfg
    specs = cfg.runs()
    phases = Phases()
    check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)  # an earlier sweep is never lost by accident
    saved = load_partial(cfg.output_dir) if cfg.resume else None
    fingerprints = {"settings": settings_fingerprint(cfg, cfg.NOT_IN_FINGERPRINT)}
    if saved:  # refused before anything is loaded when the settings differ
        check_fingerprints(saved["fingerprints"], fingerprints, cfg.output_dir)
    folder = SweepFolder(cfg.output_dir, saved)
    if hasattr(cfg, "checkpoint_dir"):  # this sweep's own checkpoints: no earlier one is taken
        from dataclasses import replace

        task.cfg = cfg = replace(cfg, checkpoint_dir=folder.checkpoints)
    loaded = task.load()
    task.refuse_unfit(loaded.state, specs)  # a method that cannot adapt this model: one line, before any run
    fingerprints.update(loaded.fingerprints)
    if saved:
        check_fingerprints(saved["fingerprints"], fingerprints, cfg.output_dir)
    journal = Journal(saved["journal"] if saved else ())
    for name, seconds in loaded.phases.items():
        phases.add(name, seconds)
    workers = worker_count(cfg, specs)
    settings = task.settings(loaded.state, specs, threads, probe, workers)
    os.makedirs(cfg.output_dir, exist_ok=True)
    local_state = task.before_runs(loaded.state, specs, settings, phases)
    sched = Schedule(specs, cfg, phases, report_run=task.report_run)
    sweep = Sweep(specs, sched, settings, phases, workers, t_start)
    _log(task.intro(loaded.state, specs, settings, sched, workers, threads))

    def checkpoint_results() -> None:
        partial = task.assemble(sweep, complete=False)
        partial.update(fingerprints=fingerprints, journal=journal.to_json(), **folder.state())  # what --resume reads
        atomic_write_text(folder.partial_path, json.dumps(partial, indent=1))

    pool = adapter_backend(cfg, workers, type(task).prepare_worker, type(task).execute)
    # Jobs run here beside worker processes (compare's head-only, on cached features) take one
    # thread, as a worker does: this process's count comes from a timing probe that the machine's
    # load can tip, and a record must not depend on it (a resumed sweep equals an uninterrupted one).
    local = InProcess(local_state, cfg, type(task).execute, threads=1 if pool is not None else None)
    t_runs = time.perf_counter()
    if saved:
        _log(f"resuming the sweep in {cfg.output_dir}: {plural(len(journal.entries), 'finished job')} kept "
             "(runs, and pilots' segments up to a rung); the others run now")
    run_jobs(task.first_jobs(sched, specs), lambda job: local if (pool is None or task.runs_here(job)) else pool,
             sched.book, sched.tag, checkpoint_results, [local, pool or local], journal=journal)
    task.finish_runs(loaded.state, sweep)
    settings["runs_wall_s"] = round(time.perf_counter() - t_runs, 2)
    task.last_phase(loaded.state, sweep)
    # what the runs kept (sft's adapters) joins the output folder just before the results naming it
    results = task.write(folder.publish(task.assemble(sweep, complete=True)), sweep)
    folder.finish()  # the paused pilots' checkpoints, and the partial results of an --overwrite
    return results
