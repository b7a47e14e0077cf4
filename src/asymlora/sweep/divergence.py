"""A diverging run is a result, not a crash (docs/design.md): a run whose training loss (or
gradient norm) becomes NaN or infinite stops with ``NonFiniteLossError`` before the bad update;
the sweep books it as *diverged at its step* and goes on. A diverged pilot is never chosen
(``asymlora.sweep.schedule``); when every rate of a strategy diverges, its selection says so and
its row in the results table reads "every rate diverged"; a diverged run at the chosen rate is
left out of the means and the paired differences, and counted."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from asymlora.training.loop import NonFiniteLossError

__all__ = ["run_or_diverged", "diverged_record", "is_diverged", "all_diverged_rows", "diverged_cell", "DIVERGED_NOTE"]

DIVERGED_NOTE = "every rate diverged"


def diverged_record(job: Any, err: NonFiniteLossError, seconds: float) -> dict[str, Any]:
    """The record of a job whose run stopped on a non-finite loss at ``err.step``."""
    spec = job.spec
    return {"strategy": spec.label, "preset": getattr(spec, "preset", None), "rank": getattr(spec, "rank", None),
            "seed": job.seed, "lr": job.lr, "diverged": True, "diverged_at_step": err.step, "steps": err.step,
            "diverged_because": str(err).split(";")[0], "wall_time_s": seconds, "eval_time_s": 0.0,
            "history": []}


def run_or_diverged(run: Callable[[], tuple[dict[str, Any], float]], job: Any) -> tuple[dict[str, Any], float]:
    """``run()`` (a job's (record, eval seconds)), or the diverged record of the job when its
    loss became non-finite."""
    t = time.perf_counter()
    try:
        return run()
    except NonFiniteLossError as err:
        return diverged_record(job, err, time.perf_counter() - t), 0.0


def is_diverged(rec: dict[str, Any]) -> bool:
    return bool(rec.get("diverged"))


def all_diverged_rows(summary: list[dict[str, Any]], selections: list[dict[str, Any]],
                      order: list[str]) -> list[dict[str, Any]]:
    """The summary rows in strategy ``order``, with a row for each strategy none of whose rates
    finished (``all_diverged``; the rates and the steps they diverged at)."""
    rows = {r["strategy"]: r for r in summary}
    for s in selections:
        if s.get("all_diverged"):
            rows[s["strategy"]] = {"strategy": s["strategy"], "all_diverged": True, "n": 0,
                                   "diverged_at": [[g["lr"], g["diverged_at_step"]] for g in s["grid"]
                                                   if g.get("diverged_at_step") is not None]}
    return [rows[label] for label in order if label in rows]


def diverged_cell(row: dict[str, Any]) -> str:
    """What a table shows for a strategy whose every rate diverged."""
    return f"{DIVERGED_NOTE} (" + ", ".join(f"lr {lr:g} at step {step}" for lr, step in row["diverged_at"]) + ")"
