"""How a job of ``asymlora compare`` executes on a backend of ``asymlora.sweep.backends``:
the state a worker loads once (``prepare_worker``), one job on it (``execute``), where a paused
run's checkpoint lives (``run_dir``)."""
from __future__ import annotations

import os
from typing import Any

from asymlora.compare.config import CompareConfig
from asymlora.compare.run import execute_run
from asymlora.compare.task import HeadFeatures, Task, prepare_task
from asymlora.sweep.backends import Job
from asymlora.sweep.divergence import run_or_diverged

__all__ = ["prepare_worker", "execute", "run_dir"]


def run_dir(cfg: CompareConfig, job: Job) -> str:
    """Where the checkpoint of a paused run lives (under the sweep's own ``cfg.checkpoint_dir``,
    ``<output_dir>/runs/<sweep id>/``: ``asymlora.sweep.outdir``)."""
    slug = job.spec.label.replace(" ", "").replace("=", "").replace("(", "").replace(")", "").replace("@", "x")
    root = cfg.checkpoint_dir or os.path.join(cfg.output_dir, "runs")
    return os.path.join(root, f"{slug}-seed{job.seed}-lr{job.lr:g}")


def prepare_worker(cfg: CompareConfig) -> tuple[Task, None]:
    """A worker's state: the task, loaded once (head-only runs, which read cached features,
    stay in the parent)."""
    return prepare_task(cfg), None


def execute(state: tuple[Task, dict[str, HeadFeatures] | None], cfg: CompareConfig, job: Job,
            tag: str) -> tuple[dict[str, Any], float]:
    """One job of a compare sweep: (record, seconds spent evaluating); a run whose loss became
    non-finite gives its diverged record."""
    task, features = state
    desc = f"{tag} {job.spec.label} " + (f"lr {job.lr:g}" if job.pilot else f"seed {job.seed}")
    segmented = job.until is not None or job.resume

    def run() -> tuple[dict[str, Any], float]:
        out = execute_run(task, job.spec, job.seed, job.lr, cfg, desc=desc, features=features, pilot=job.pilot,
                          output_dir=run_dir(cfg, job) if segmented else None, resume=job.resume,
                          pause_at=job.until)
        return out.record, out.eval_seconds

    return run_or_diverged(run, job)  # a non-finite loss is a result of the run, not a crash of the sweep
