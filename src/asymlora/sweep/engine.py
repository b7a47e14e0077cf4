"""Driving a sweep: submit the jobs a schedule releases to the backends, book each finished
one, release what it unlocks, and save the partial results after each (docs/design.md).
SIGTERM or SIGINT stop the sweep: every worker is stopped at once and
:class:`asymlora.sweep.interrupt.Interrupted` propagates to the caller."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, TypeVar

from asymlora.sweep.interrupt import stop_on_signals
from asymlora.sweep.resume import Journal

__all__ = ["run_jobs"]

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
                for fut in done:
                    job, t = pending.pop(fut)
                    outcome = fut.result()
                    if journal is not None and fut not in replayed:
                        journal.add(job, outcome)
                    replayed.discard(fut)
                    for nxt in record(job, outcome, t):
                        submit(nxt)
                on_progress()
            aborted = False
        finally:
            for b in backends:
                b.close(abort=aborted)
