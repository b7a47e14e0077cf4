"""Stopping a sweep cleanly: SIGTERM and SIGINT (Ctrl-C) to the process driving a sweep raise
:class:`Interrupted` in its main thread; the backend then stops every worker it started
(``asymlora.sweep.backends``) and the partial ``results.json``, written atomically after each
finished run, is left as it was, with the paused runs' checkpoints under ``runs/`` for
``--resume`` (docs/design.md)."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupted", "stop_on_signals", "ignore_in_worker"]

_HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """The sweep was stopped by a signal. A ``KeyboardInterrupt`` so that ``except Exception``
    around a run does not swallow it; ``signum`` is the signal's number (exit status 128 + it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _raise(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside: SIGTERM and SIGINT raise :class:`Interrupted` in the main thread (outside
    the main thread, where Python cannot install handlers, nothing changes). The previous
    handlers are put back on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in _HANDLED}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def ignore_in_worker() -> None:
    """In a worker process: leave SIGINT to the parent (Ctrl-C reaches the whole process group;
    the parent stops the workers itself), and die with the parent even when it is killed
    outright (Linux ``PR_SET_PDEATHSIG``), so that no worker keeps computing for nobody."""
    import multiprocessing
    import os

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(1)
