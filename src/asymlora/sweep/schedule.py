"""Which run of a sweep to do next, and what each finished one means: the learning-rate search
(pilots on the first seed, an extension of the grid past an edge, pruning of clearly losing
rates at rungs — ``asymlora.sweep.pruning``) and the release of the other seeds at the chosen
rate (docs/design.md).

1. **Learning rate.** For each strategy, one run per rate of the grid on the first seed (the
   pilot). The rate whose run reaches the best validation score (``cfg.selection_metric``)
   wins (ties: the smaller rate). When it is the grid's smallest or largest, the optimum may
   lie beyond: with ``max_lr_extensions`` > 0 the next rate beyond it is tried too (that many
   times at most); otherwise the selection records that the choice sits on an edge. The pilot
   run at the chosen rate *is* the first seed's run, so nothing is trained twice. Test data is
   never looked at here.
2. **Runs.** Every other seed trains at the chosen rate.

The decisions depend only on the outcomes booked, never on the order they arrive in (the
rule at a rung waits for every live pilot of the strategy), which is what lets a resumed sweep
end equal to an uninterrupted one (``asymlora.sweep.resume``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from asymlora.sweep.backends import Job
from asymlora.sweep.divergence import is_diverged
from asymlora.sweep.pruning import PruneDecision, accuracy_difference_se, prune_rates
from asymlora.sweep.timing import Phases

__all__ = ["Schedule", "select_lr", "grid_extension", "selection_record", "report_pruned"]


def _log(msg: str) -> None:
    print(msg, flush=True)


def select_lr(pilots: dict[float, dict[str, Any]], metric: str = "val_accuracy",
              higher_is_better: bool = True) -> float:
    """The rate whose pilot run reached the best validation ``metric`` (by default the highest
    accuracy; ``asymlora sft`` picks the lowest loss); ties go to the smaller rate (the more
    conservative choice)."""
    if not pilots:
        raise ValueError("no pilot runs to choose a learning rate from")
    sign = -1.0 if higher_is_better else 1.0
    return min(pilots, key=lambda lr: (sign * pilots[lr][metric], lr))


def report_pruned(tag: str, label: str, decision: PruneDecision, total_steps: int, scale: float = 100.0) -> None:
    _log(f"{tag} {label:<18} lr {decision.lr:<7g} pruned at step {decision.step}/{total_steps}: validation "
         f"{scale * decision.value:.2f}, at best {scale * decision.optimistic:.2f} by the end, below the leader's "
         f"{scale * decision.leader:.2f} by more than the noise allowance ({scale * decision.allowance:.2f})  [pilot]")


def _curve(rec: dict[str, Any], metric: str) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h[metric])) for h in rec["history"] if metric in h]


class Schedule:
    """Which run to do next, and what each finished one means.

    Pilots of every strategy first (one per rate of the grid, on the first seed); with pruning
    (``cfg.rung_steps()``) an adapter pilot pauses at each rung, and once every live pilot of its
    strategy has reached the rung the rule of ``asymlora.sweep.pruning`` drops the ones that
    are clearly losing and continues the others from their checkpoints. When a strategy's
    pilots are all finished or dropped, its rate is chosen (or the grid extended past an edge)
    and its other seeds are released. ``report_run(tag, record, pilot)`` prints a finished run
    (each task its own line: accuracy for compare, losses for sft)."""

    def __init__(self, specs: list[Any], cfg: Any, phases: Phases,
                 report_run: Callable[[str, dict[str, Any], bool], None]) -> None:
        self.cfg, self.phases, self.report_run = cfg, phases, report_run
        # what the pilots are ranked by (class attributes of the config: compare ranks by
        # validation accuracy, sft by validation loss)
        self.metric, self.higher = cfg.selection_metric, cfg.selection_higher_is_better
        self.rungs = cfg.rung_steps()
        self.total = sum(len(cfg.lr_grid(s)) + len(cfg.seeds) - 1 for s in specs)
        self.started = 0
        self.tags: dict[tuple[str, int, float], str] = {}
        self.pilots: dict[str, dict[float, dict[str, Any]]] = {s.label: {} for s in specs}
        self.live: dict[str, set[float]] = {s.label: set() for s in specs}       # pilots not finished nor pruned
        self.waiting: dict[str, dict[float, dict[str, Any]]] = {s.label: {} for s in specs}  # paused at a rung
        self.pruned: dict[str, dict[float, tuple[dict[str, Any], PruneDecision]]] = {s.label: {} for s in specs}
        self.diverged: dict[str, dict[float, dict[str, Any]]] = {s.label: {} for s in specs}  # never chosen
        self.spent: dict[tuple[str, int, float], tuple[float, float]] = {}  # (wall, eval) s of earlier segments
        self.runs: dict[tuple[str, int], dict[str, Any]] = {}
        self.selections: dict[str, dict[str, Any]] = {}
        self.extensions: dict[str, int] = {}

    def tag(self, job: Job) -> str:
        key = (job.spec.label, job.seed, job.lr)
        if key not in self.tags:
            self.started += 1
            self.tags[key] = f"[{self.started}/{self.total}]"
        return self.tags[key]

    def _first_segment(self, spec: Any, seed: int, lr: float) -> Job:
        until = self.rungs[0] if (self.rungs and spec.is_adapter) else None
        self.live[spec.label].add(lr)
        return Job(spec, seed, lr, True, until=until)

    def pilot_jobs(self, spec: Any) -> list[Job]:
        return [self._first_segment(spec, self.cfg.seeds[0], lr) for lr in self.cfg.lr_grid(spec)]

    def record(self, job: Job, rec: dict[str, Any], eval_s: float, tag: str) -> list[Job]:
        """Book a finished job (a whole run, or a pilot's segment up to a rung); returns the
        jobs it unlocks."""
        self.phases.add("pilot" if job.pilot else "train", rec["wall_time_s"] - eval_s)
        self.phases.add("eval", eval_s)
        key = (job.spec.label, job.seed, job.lr)
        wall, ev = self.spent.pop(key, (0.0, 0.0))
        if rec.get("paused"):
            self.spent[key] = (wall + rec["wall_time_s"], ev + eval_s)
            self.waiting[job.spec.label][job.lr] = rec
            return self._at_rung(job.spec, rec["steps"])
        rec = dict(rec, wall_time_s=rec["wall_time_s"] + wall, eval_time_s=rec.get("eval_time_s", eval_s) + ev)
        if is_diverged(rec):
            return self._diverged(job, rec, tag)
        self.report_run(tag, rec, job.pilot and self.cfg.selects_lr)
        if not job.pilot:
            self.runs[(job.spec.label, job.seed)] = dict(rec, role="run")
            return []
        self.pilots[job.spec.label][job.lr] = rec
        self.live[job.spec.label].discard(job.lr)
        return self._maybe_select(job.spec)

    def _diverged(self, job: Job, rec: dict[str, Any], tag: str) -> list[Job]:
        """A run whose loss became non-finite (``asymlora.sweep.divergence``): a pilot is
        dropped from the lr search; a run at the chosen rate is kept as diverged."""
        _log(f"{tag} {job.spec.label:<18} seed {job.seed} lr {job.lr:<7g} diverged at step "
             f"{rec['diverged_at_step']} ({rec['diverged_because']})" + ("  [pilot]" if job.pilot else ""))
        if not job.pilot:
            self.runs[(job.spec.label, job.seed)] = dict(rec, role="run")
            return []
        self.diverged[job.spec.label][job.lr] = rec
        self.live[job.spec.label].discard(job.lr)
        waiting = self.waiting[job.spec.label]
        if waiting:  # the others may all be waiting at a rung for this one
            return self._at_rung(job.spec, next(iter(waiting.values()))["steps"])
        return self._maybe_select(job.spec)

    def book(self, job: Job, result: Sequence[Any], tag: str) -> list[Job]:
        """:func:`asymlora.sweep.engine.run_jobs`' ``record``: ``result`` is the executor's
        ``(rec, eval_s)`` (a list when the journal replays it)."""
        rec, eval_s = result
        return self.record(job, rec, eval_s, tag)

    def _next_rung(self, step: int) -> int | None:
        return next((r for r in self.rungs if r > step), None)

    def _at_rung(self, spec: Any, step: int) -> list[Job]:
        """A pilot paused at ``step``: once every live pilot of the strategy waits there, prune."""
        label, waiting = spec.label, self.waiting[spec.label]
        if set(waiting) != self.live[label] or any(r["steps"] != step for r in waiting.values()):
            return []
        curves = {lr: _curve(r, self.metric) for lr, r in waiting.items()}
        curves.update({lr: _curve(r, self.metric) for lr, r in self.pilots[label].items()})  # finished ones
        at_step = [v for c in curves.values() for s, v in c if s == step]  # finished pilots: their value here
        leader = (max if self.higher else min)(at_step, default=0.0)
        n_val = next(iter(waiting.values())).get("val_size", 0)
        allowance = self.cfg.prune_z * accuracy_difference_se(leader, n_val)
        decisions = {d.lr: d for d in prune_rates(curves, step, self.cfg.max_steps, allowance, self.higher)}
        jobs = []
        for lr, rec in sorted(waiting.items()):
            d = decisions.get(lr)
            if d is not None and d.pruned:
                self.live[label].discard(lr)
                wall, ev = self.spent.pop((label, rec["seed"], lr), (0.0, 0.0))
                self.pruned[label][lr] = (dict(rec, wall_time_s=wall, eval_time_s=ev), d)
                report_pruned(self.tags.get((label, rec["seed"], lr), "[-]"), label, d, self.cfg.max_steps)
            else:
                jobs.append(Job(spec, rec["seed"], lr, True, until=self._next_rung(step), resume=True))
        waiting.clear()
        return jobs + (self._maybe_select(spec) if not self.live[label] else [])

    def _maybe_select(self, spec: Any) -> list[Job]:
        """When no pilot of the strategy is left running: choose its rate, or extend the grid."""
        label = spec.label
        if self.live[label]:
            return []
        pilots, diverged = self.pilots[label], self.diverged[label]
        if not pilots:  # every rate diverged: nothing to choose, no other seed to run
            self.selections[label] = selection_record(spec, self.cfg, pilots, None, self.metric, self.pruned[label],
                                                      diverged)
            return []
        chosen = select_lr(pilots, self.metric, self.higher)
        beyond = grid_extension(sorted(set(pilots) | set(self.pruned[label]) | set(diverged)), chosen)
        if beyond is not None and self.extensions.get(label, 0) < self.cfg.max_lr_extensions:
            # The best rate is at the edge of what was tried: the optimum may lie beyond it.
            self.extensions[label] = self.extensions.get(label, 0) + 1
            self.total += 1
            return [self._first_segment(spec, self.cfg.seeds[0], beyond)]
        self.selections[label] = selection_record(spec, self.cfg, pilots, chosen, self.metric, self.pruned[label],
                                                  diverged)
        self.runs[(label, self.cfg.seeds[0])] = dict(pilots[chosen], role="pilot-winner" if self.cfg.selects_lr
                                                     else "run")
        return [Job(spec, seed, chosen, False) for seed in self.cfg.seeds[1:]]

    def ordered(self, specs: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        runs = [self.runs[(s.label, seed)] for s in specs for seed in self.cfg.seeds if (s.label, seed) in self.runs]
        return runs, [self.selections[s.label] for s in specs if s.label in self.selections]


def grid_extension(tried: list[float], chosen: float) -> float | None:
    """The next rate beyond the edge of the sorted grid ``tried`` when ``chosen`` sits on that
    edge (one grid step further, by the ratio of the two neighbouring rates), else None."""
    if len(tried) < 2 or tried[0] < chosen < tried[-1]:
        return None
    if chosen == tried[0]:
        return tried[0] * tried[0] / tried[1]
    return tried[-1] * tried[-1] / tried[-2]


def selection_record(spec: Any, cfg: Any, pilots: dict[float, dict[str, Any]],
               chosen: float | None, metric: str = "val_accuracy",
               pruned: dict[float, tuple[dict[str, Any], PruneDecision]] | None = None,
               diverged: dict[float, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What the lr search of one strategy found: every rate tried (finished, pruned at a rung,
    or diverged at a step) and the one chosen (None when every rate diverged)."""
    pruned, diverged = pruned or {}, diverged or {}
    tried = sorted(set(pilots) | set(pruned) | set(diverged))
    edge = (None if chosen is None or grid_extension(tried, chosen) is None
            else ("lower" if chosen == tried[0] else "upper"))
    what = metric.removeprefix("val_").replace("_", " ")
    grid = [{"lr": lr, metric: r[metric], "best_step": r["best_step"], "steps": r["steps"],
             "stopped_early": r["stopped_early"], "pruned_at_step": None, "wall_time_s": r["wall_time_s"],
             "curve": _curve(r, metric)} for lr, r in pilots.items()]
    grid += [{"lr": lr, metric: d.value, "best_step": None, "steps": r["steps"], "stopped_early": False,
              "pruned_at_step": d.step, "optimistic_final": d.optimistic, "leader_at_rung": d.leader,
              "allowance": d.allowance, "wall_time_s": r["wall_time_s"], "curve": _curve(r, metric)}
             for lr, (r, d) in pruned.items()]
    grid += [{"lr": lr, metric: None, "best_step": None, "steps": r["steps"], "stopped_early": False,
              "pruned_at_step": None, "diverged_at_step": r["diverged_at_step"], "wall_time_s": r["wall_time_s"],
              "curve": _curve(r, metric)} for lr, r in diverged.items()]
    return {
        "strategy": spec.label, "chosen_lr": chosen, "selected_on": f"validation {what}, seed {cfg.seeds[0]}",
        "at_edge": edge, "grid": sorted(grid, key=lambda g: g["lr"]),
        **({"all_diverged": True} if chosen is None else {}),
    }
