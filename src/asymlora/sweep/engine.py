"""Driving a sweep: submit the jobs a schedule releases to the backends, book each finished
one, release what it unlocks, and save the partial results after each (docs/design.md).
A worker process killed from outside (the out-of-memory killer) ends the sweep with
:class:`asymlora.errors.WorkerLost` naming the runs it lost, after the finished ones are saved.
SIGTERM or SIGINT stop the sweep: every worker is stopped at once and
:class:`asymlora.sweep.interrupt.Interrupted` propagates to the caller."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from asymlora.errors import WorkerLost
from asymlora.sweep.interrupt import stop_on_signals
from asymlora.sweep.resume import Journal

__all__ = ["run_jobs", "worker_died"]


def worker_died(err: BaseException) -> bool:
    """Whether a job failed because its worker process died (a local pool's
    ``BrokenProcessPool``; Ray's ``WorkerCrashedError`` / ``NodeDiedError``), not in the job's code."""
    return isinstance(err, BrokenProcessPool) or type(err).__name__ in ("WorkerCrashedError", "NodeDiedError")


def _describe(job: Any) -> str:
    spec = getattr(job, "spec", None)
    if spec is None:  # sft's benchmark phase drives adapter folders
        return str(job)
    return f"{spec.label} seed {job.seed} lr {job.lr:g}"

# A sweep's jobs are asymlora.sweep.backends.Job; sft's benchmark phase drives adapter folders.
JobT = TypeVar("JobT", bound=Hashable)


def run_jobs(first: Iterable[JobT], backend_for: Callable[[JobT], Any],
             record: Callable[[JobT, Any, str], list[JobT]], tag: Callable[[JobT], str],
             on_progress: Callable[[], None], backends: Iterable[Any] = (), journal: Journal | None = None) -> None:
    """Drive every job to completion: ``backend_for(job)`` runs it, ``record(job, result,
    tag)`` books its result and returns the jobs it unlocks, ``on_progress()`` runs after each
    batch of finished jobs. ``backends`` are closed at the end — stopped at once when the sweep
    is interrupted or fails. With a ``journal``, a job whose outcome it saved is booked from
    there instead of running again (``--resume``), and every new outcome is added to it."""
    pending: dict[Future, tuple[JobT, str]] = {}
    replayed: set[Future] = set()  # outcomes the journal gave back: not added to it again
    backends = list(backends)

    def submit(job: JobT) -> None:
        t = tag(job)
        saved = journal.take(job) if journal is not None else None
        if saved is None:
            fut = backend_for(job).submit(job, t)
        else:
            fut = Future()
            fut.set_result(saved)
            replayed.add(fut)
        pending[fut] = (job, t)

    aborted = True
    with stop_on_signals():
        try:
            for job in first:
                submit(job)
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                lost: list[str] = []
                for fut in done:
                    job, t = pending.pop(fut)
                    err = fut.exception()
                    if err is not None and worker_died(err):
                        lost.append(f"{t} {_describe(job)}")
                        continue
                    outcome = fut.result()
                    if journal is not None and fut not in replayed:
                        journal.add(job, outcome)
                    replayed.discard(fut)
                    for nxt in record(job, outcome, t):
                        submit(nxt)
                on_progress()  # what finished before the worker died is saved for --resume
                if lost:
                    raise WorkerLost(lost)
            aborted = False
        finally:
            for b in backends:
                b.close(abort=aborted)
