"""Where the runs of ``asymlora compare`` execute: in this process, or in worker processes
with one thread each (on CPUs two single-thread runs side by side do ~1.25x the work of one run
on two threads: small matrices, Python overhead). Every run seeds its own RNGs, so a result
does not depend on which process ran it."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from asymlora.compare.config import CompareConfig, StrategySpec
from asymlora.compare.run import train_one
from asymlora.compare.task import HeadFeatures, Task, available_cpus, prepare_task

__all__ = ["Job", "InProcess", "Pool", "worker_count", "run_dir"]


@dataclass(frozen=True)
class Job:
    """One run to do, or one segment of it: ``pilot`` runs try a rate of the grid on the first
    seed; ``until`` pauses the run at that step (a rung of the lr search) with a checkpoint in
    ``run_dir``; ``resume`` continues it from there."""

    spec: StrategySpec
    seed: int
    lr: float
    pilot: bool
    until: int | None = None
    resume: bool = False


def run_dir(cfg: CompareConfig, job: Job) -> str:
    """Where the checkpoint of a paused run lives (``<output_dir>/runs/…``)."""
    slug = job.spec.label.replace(" ", "").replace("=", "").replace("(", "").replace(")", "").replace("@", "x")
    return os.path.join(cfg.output_dir, "runs", f"{slug}-seed{job.seed}-lr{job.lr:g}")


class InProcess:
    """Runs each job at once in this process; ``submit`` returns a finished future, so the
    scheduler below serves the in-process and the worker-pool cases alike. ``execute(task, cfg,
    job, tag, features)`` does one job (default: a compare run)."""

    def __init__(self, task: Any, cfg: CompareConfig, features: dict[str, HeadFeatures] | None,
                 execute: Callable[..., Any] | None = None) -> None:
        self.task, self.cfg, self.features = task, cfg, features
        self.execute = execute or _execute

    def submit(self, job: Any, tag: str) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(self.execute(self.task, self.cfg, job, tag, self.features))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(err)
        return fut


_WORKER: dict[str, Any] = {}


def _worker_init(cfg: CompareConfig, prepare: Callable[[Any], Any]) -> None:
    """Each worker process loads the task once and computes with one thread."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _WORKER["task"], _WORKER["cfg"] = prepare(cfg), cfg


def _worker_job(execute: Callable[..., Any], job: Any, tag: str) -> Any:
    return execute(_WORKER["task"], _WORKER["cfg"], job, tag, None)


class Pool:
    """``workers`` processes with one thread each, each loading the task once with
    ``prepare(cfg)`` and running jobs with ``execute`` (defaults: a compare task and run; both
    must be module-level functions, which is what a spawned process can receive)."""

    def __init__(self, cfg: CompareConfig, workers: int, prepare: Callable[[Any], Any] | None = None,
                 execute: Callable[..., Any] | None = None) -> None:
        self.execute = execute or _execute
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init,
                                        initargs=(replace(cfg, progress=False), prepare or prepare_task))

    def submit(self, job: Any, tag: str) -> Future:
        return self.pool.submit(_worker_job, self.execute, job, tag)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _execute(task: Task, cfg: CompareConfig, job: Job, tag: str,
             features: dict[str, HeadFeatures] | None) -> tuple[dict[str, Any], float]:
    desc = f"{tag} {job.spec.label} " + (f"lr {job.lr:g}" if job.pilot else f"seed {job.seed}")
    segmented = job.until is not None or job.resume
    out = train_one(task, job.spec, job.seed, job.lr, cfg, desc=desc, features=features, pilot=job.pilot,
                    output_dir=run_dir(cfg, job) if segmented else None, resume=job.resume, pause_at=job.until)
    return out.record, out.eval_seconds


def worker_count(cfg: CompareConfig, specs: list[StrategySpec]) -> int:
    """Worker processes for the adapter runs: ``cfg.workers``, or on a CPU-only machine one
    per available core up to 2 (the setting measured on the 2-core machine; larger pools were
    not measured), one when there is a GPU."""
    if cfg.workers is not None:
        return cfg.workers
    if torch.cuda.is_available() or not any(s.is_adapter for s in specs):
        return 1
    return max(1, min(2, available_cpus()))
