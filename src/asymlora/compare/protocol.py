"""The protocol of ``asymlora compare`` (DESIGN.md §8): each strategy at its own learning rate,
picked on validation; every run trained until its validation curve stops improving; paired seeds.

1. **Learning rate.** For each strategy, one run per rate of the grid on the first seed (the
   pilot). The rate whose run reaches the best validation accuracy wins (ties: the smaller
   rate). When it is the grid's smallest or largest, the optimum may lie beyond: with
   ``max_lr_extensions`` > 0 the next rate beyond it is tried too (that many times at most);
   otherwise the selection records and prints that the choice sits on an edge. The pilot run
   at the chosen rate *is* the first seed's run — it was trained under exactly the rules of
   step 2, so nothing is trained twice. Test data is never looked at here.
2. **Runs** (``asymlora.compare.run``). Every other seed trains at the chosen rate: warm-up,
   then a constant rate (a decay would flatten the curve by itself); validation every
   ``eval_every`` steps; stop after ``patience`` evaluations without a new best, counted from
   ``min_steps`` (or at ``max_steps``); the weights of the best
   validation step are restored and scored on test. Each run records its best step, whether
   patience ran out (a plateau) or the step cap was hit, and the slope of its validation curve
   over the last quarter of the run.
3. **Pairing.** A seed fixes the data order, the head's initialisation and the seeds of the
   frozen factors for every strategy, so strategy differences are paired by seed
   (``asymlora.compare.stats``).

The head-only baseline trains the head on features of the frozen encoder computed once (eval
mode), as a linear probe; its runs follow the same rules.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import replace
from typing import Any, Callable

import torch

from asymlora.commands.options import plural
from asymlora.compare.config import CompareConfig, StrategySpec
from asymlora.compare.pruning import PruneDecision, accuracy_difference_se, prune_rates
from asymlora.compare.run import autocast, resolve_precision, train_one
from asymlora.compare.task import Task, head_features, prepare_task, threads_for_run
from asymlora.compare.workers import execute, prepare_worker, worker_count
from asymlora.fileio import atomic_write_text
from asymlora.sweep.backends import InProcess, Job, LocalPool
from asymlora.sweep.engine import run_jobs
from asymlora.sweep.interrupt import stop_on_signals
from asymlora.sweep.resume import (Journal, check_fingerprints, data_fingerprint, load_partial, model_fingerprint,
                                   settings_fingerprint)

__all__ = ["run_compare", "select_lr", "grid_extension", "Phases", "train_one"]


def _log(msg: str) -> None:
    print(msg, flush=True)


class Phases:
    """Seconds per phase of the protocol. load, tokenise, features (head-only's cached inputs)
    and report are wall-clock time of this process; pilot, train and eval add up the runs
    (``eval``: validation and test scoring inside them, which ``pilot`` and ``train`` do not
    count), so with worker processes side by side they sum to more than the wall time
    (``settings.runs_wall_s``)."""

    NAMES = ("load", "tokenise", "features", "pilot", "train", "eval", "report")

    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k in self.NAMES}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds  # other protocols add their own phases

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}


# ----------------------------------------------------------------------------- the protocol


def select_lr(pilots: dict[float, dict[str, Any]], metric: str = "val_accuracy",
              higher_is_better: bool = True) -> float:
    """The rate whose pilot run reached the best validation ``metric`` (by default the highest
    accuracy; ``asymlora sft`` picks the lowest loss); ties go to the smaller rate (the more
    conservative choice)."""
    if not pilots:
        raise ValueError("no pilot runs to choose a learning rate from")
    sign = -1.0 if higher_is_better else 1.0
    return min(pilots, key=lambda lr: (sign * pilots[lr][metric], lr))


def _report_run(tag: str, rec: dict[str, Any], pilot: bool) -> None:
    if rec.get("stopping") == "budget":
        end = f"{rec['steps']} steps"
    else:
        end = f"best step {rec['best_step']}/{rec['steps']} ({'plateau' if rec['stopped_early'] else 'step cap'})"
    _log(f"{tag} {rec['strategy']:<18} seed {rec['seed']} lr {rec['lr']:<7g} "
         f"val {100 * rec['val_accuracy']:.2f}  test {100 * rec['test_accuracy']:.2f}  {end}  "
         f"{rec['wall_time_s']:.0f} s" + ("  [pilot]" if pilot else ""))


def _report_pruned(tag: str, label: str, decision: PruneDecision, total_steps: int, scale: float = 100.0) -> None:
    _log(f"{tag} {label:<18} lr {decision.lr:<7g} pruned at step {decision.step}/{total_steps}: validation "
         f"{scale * decision.value:.2f}, at best {scale * decision.optimistic:.2f} by the end, below the leader's "
         f"{scale * decision.leader:.2f} by more than the noise allowance ({scale * decision.allowance:.2f})  [pilot]")


def _curve(rec: dict[str, Any], metric: str) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h[metric])) for h in rec["history"] if metric in h]


class _Schedule:
    """Which run to do next, and what each finished one means.

    Pilots of every strategy first (one per rate of the grid, on the first seed); with pruning
    (``cfg.rung_steps()``) an adapter pilot pauses at each rung, and once every live pilot of its
    strategy has reached the rung the rule of ``asymlora.compare.pruning`` drops the ones that
    are clearly losing and continues the others from their checkpoints. When a strategy's
    pilots are all finished or dropped, its rate is chosen (or the grid extended past an edge)
    and its other seeds are released."""

    def __init__(self, specs: list[StrategySpec], cfg: CompareConfig, phases: Phases,
                 report_run: Callable[[str, dict[str, Any], bool], None] = _report_run) -> None:
        self.cfg, self.phases, self.report_run = cfg, phases, report_run
        # what the pilots are ranked by (class attributes of the config: compare ranks by
        # validation accuracy, sft by validation loss)
        self.metric, self.higher = cfg.selection_metric, cfg.selection_higher_is_better
        self.rungs = cfg.rung_steps()
        self.total = len(specs) * (len(cfg.lr_grid()) + len(cfg.seeds) - 1)
        self.started = 0
        self.tags: dict[tuple[str, int, float], str] = {}
        self.pilots: dict[str, dict[float, dict[str, Any]]] = {s.label: {} for s in specs}
        self.live: dict[str, set[float]] = {s.label: set() for s in specs}       # pilots not finished nor pruned
        self.waiting: dict[str, dict[float, dict[str, Any]]] = {s.label: {} for s in specs}  # paused at a rung
        self.pruned: dict[str, dict[float, tuple[dict[str, Any], PruneDecision]]] = {s.label: {} for s in specs}
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

    def _first_segment(self, spec: StrategySpec, seed: int, lr: float) -> Job:
        until = self.rungs[0] if (self.rungs and spec.is_adapter) else None
        self.live[spec.label].add(lr)
        return Job(spec, seed, lr, True, until=until)

    def pilot_jobs(self, spec: StrategySpec) -> list[Job]:
        return [self._first_segment(spec, self.cfg.seeds[0], lr) for lr in self.cfg.lr_grid()]

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
        self.report_run(tag, rec, job.pilot and self.cfg.selects_lr)
        if not job.pilot:
            self.runs[(job.spec.label, job.seed)] = dict(rec, role="run")
            return []
        self.pilots[job.spec.label][job.lr] = rec
        self.live[job.spec.label].discard(job.lr)
        return self._maybe_select(job.spec)

    def _next_rung(self, step: int) -> int | None:
        return next((r for r in self.rungs if r > step), None)

    def _at_rung(self, spec: StrategySpec, step: int) -> list[Job]:
        """A pilot paused at ``step``: once every live pilot of the strategy waits there, prune."""
        label, waiting = spec.label, self.waiting[spec.label]
        if set(waiting) != self.live[label] or any(r["steps"] != step for r in waiting.values()):
            return []
        curves = {lr: _curve(r, self.metric) for lr, r in waiting.items()}
        curves.update({lr: _curve(r, self.metric) for lr, r in self.pilots[label].items()})  # finished ones
        leader = max((c[-1][1] for c in curves.values() if c and c[-1][0] >= step), default=0.0)
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
                _report_pruned(self.tags.get((label, rec["seed"], lr), "[-]"), label, d, self.cfg.max_steps)
            else:
                jobs.append(Job(spec, rec["seed"], lr, True, until=self._next_rung(step), resume=True))
        waiting.clear()
        return jobs + (self._maybe_select(spec) if not self.live[label] else [])

    def _maybe_select(self, spec: StrategySpec) -> list[Job]:
        """When no pilot of the strategy is left running: choose its rate, or extend the grid."""
        label = spec.label
        if self.live[label]:
            return []
        pilots = self.pilots[label]
        chosen = select_lr(pilots, self.metric, self.higher)
        beyond = grid_extension(sorted(set(pilots) | set(self.pruned[label])), chosen)
        if beyond is not None and self.extensions.get(label, 0) < self.cfg.max_lr_extensions:
            # The best rate is at the edge of what was tried: the optimum may lie beyond it.
            self.extensions[label] = self.extensions.get(label, 0) + 1
            self.total += 1
            return [self._first_segment(spec, self.cfg.seeds[0], beyond)]
        self.selections[label] = _selection(spec, self.cfg, pilots, chosen, self.metric, self.pruned[label])
        self.runs[(label, self.cfg.seeds[0])] = dict(pilots[chosen], role="pilot-winner" if self.cfg.selects_lr
                                                     else "run")
        return [Job(spec, seed, chosen, False) for seed in self.cfg.seeds[1:]]

    def ordered(self, specs: list[StrategySpec]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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


def _selection(spec: StrategySpec, cfg: CompareConfig, pilots: dict[float, dict[str, Any]],
               chosen: float, metric: str = "val_accuracy",
               pruned: dict[float, tuple[dict[str, Any], PruneDecision]] | None = None) -> dict[str, Any]:
    pruned = pruned or {}
    tried = sorted(set(pilots) | set(pruned))
    edge = None if grid_extension(tried, chosen) is None else ("lower" if chosen == tried[0] else "upper")
    what = metric.removeprefix("val_").replace("_", " ")
    grid = [{"lr": lr, metric: r[metric], "best_step": r["best_step"], "steps": r["steps"],
             "stopped_early": r["stopped_early"], "pruned_at_step": None, "wall_time_s": r["wall_time_s"],
             "curve": _curve(r, metric)} for lr, r in pilots.items()]
    grid += [{"lr": lr, metric: d.value, "best_step": None, "steps": r["steps"], "stopped_early": False,
              "pruned_at_step": d.step, "optimistic_final": d.optimistic, "leader_at_rung": d.leader,
              "allowance": d.allowance, "wall_time_s": r["wall_time_s"], "curve": _curve(r, metric)}
             for lr, (r, d) in pruned.items()]
    return {
        "strategy": spec.label, "chosen_lr": chosen, "selected_on": f"validation {what}, seed {cfg.seeds[0]}",
        "at_edge": edge, "grid": sorted(grid, key=lambda g: g["lr"]),
    }


def _settings(cfg: CompareConfig, task: Task, specs: list[StrategySpec], threads: int,
              thread_probe: dict[int, float]) -> dict[str, Any]:
    import transformers

    import asymlora

    base = task.base
    targets = asymlora.find_target_modules(base, cfg.targets, exclude=[task.head])
    k = task.num_labels
    return {
        "model": os.path.abspath(task.model_path),
        "model_name": "all-MiniLM-L6-v2" if cfg.model is None else os.path.basename(os.path.normpath(task.model_path)),
        "model_type": base.config.model_type, "model_params": sum(p.numel() for p in base.parameters()),
        "data": cfg.data, "dataset": task.data.summary(),
        "used_sizes": {"train": len(task.train), "val": len(task.val), "test": len(task.test)},
        "majority_class_test_accuracy": max(task.test.class_counts(k)) / len(task.test),
        "strategies": [s.label for s in specs], "ranks": cfg.ranks, "seeds": cfg.seeds,
        "lr_grid": cfg.lr_grid(), "selects_lr": cfg.selects_lr, "max_lr_extensions": cfg.max_lr_extensions, "max_steps": cfg.max_steps,
        "stopping": cfg.stopping, "rungs": cfg.rung_steps(), "prune_z": cfg.prune_z,
        "eval_every": cfg.eval_every, "patience": cfg.patience, "min_steps": cfg.min_steps, "warmup_steps": cfg.warmup_steps,
        "lr_schedule": ("linear warm-up, then linear decay to 0" if cfg.fixed_budget else "linear warm-up, then constant"),
        "batch_size": cfg.batch_size,
        "batching": "length-grouped batches (runs of 50 batches sorted by length, batches shuffled)",
        "max_length": cfg.max_length, "weight_decay": cfg.weight_decay, "margin": cfg.margin,
        "alpha": "2r (scaling alpha/r = 2)", "target_modules": cfg.target_modules or "architecture default",
        "adapted_layers": f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in targets}))} ({plural(len(targets), 'layer')})",
        "head": task.head, "quick": cfg.quick, "threads": threads,
        "thread_probe_s": {str(n): round(v, 5) for n, v in thread_probe.items()},
        "mixed_precision": cfg.mixed_precision, "precision_used": resolve_precision(cfg.mixed_precision),
        "peak_memory": ("CUDA max_memory_allocated" if torch.cuda.is_available() else
                        "CPU peak resident set size of the process during the run (Linux VmHWM reset per run)"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "asymlora": asymlora.__version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
    }


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run the protocol for every strategy and write the reports; returns the results dict."""
    cfg.validate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    t_start = time.perf_counter()
    with stop_on_signals(), threads_for_run(cfg.threads) as (threads, probe):
        return _run(cfg, threads, probe, t_start)


def _run(cfg: CompareConfig, threads: int, probe: dict[int, float], t_start: float) -> dict[str, Any]:
    from asymlora.compare.report import assemble, write_reports

    specs = cfg.runs()
    phases = Phases()
    saved = load_partial(cfg.output_dir) if cfg.resume else None
    fingerprints = {"settings": settings_fingerprint(cfg, cfg.NOT_IN_FINGERPRINT)}
    if saved:  # refused before anything is loaded when the settings differ
        check_fingerprints(saved["fingerprints"], fingerprints, cfg.output_dir)
    task = prepare_task(cfg)
    fingerprints.update(data=data_fingerprint(task.train_ds, task.val_ds, task.test_ds),
                        model=model_fingerprint(task.model_path))
    if saved:
        check_fingerprints(saved["fingerprints"], fingerprints, cfg.output_dir)
    else:  # a fresh sweep: no checkpoint of an earlier one may be taken for this one's
        shutil.rmtree(os.path.join(cfg.output_dir, "runs"), ignore_errors=True)
    journal = Journal(saved["journal"] if saved else ())
    phases.add("load", task.timings["load"])
    phases.add("tokenise", task.timings["tokenise"])
    workers = worker_count(cfg, specs)
    settings = _settings(cfg, task, specs, threads, probe)
    settings["workers"] = workers
    os.makedirs(cfg.output_dir, exist_ok=True)
    features = None
    if any(s.preset is None for s in specs):
        t = time.perf_counter()
        with autocast(resolve_precision(cfg.mixed_precision)):
            feats = {name: head_features(task.base, task.head, ds, task.collate)
                     for name, ds in (("train", task.train_ds), ("val", task.val_ds), ("test", task.test_ds))}
        features = None if any(f is None for f in feats.values()) else feats
        phases.add("features", time.perf_counter() - t)
    sched = _Schedule(specs, cfg, phases)
    grid = ", ".join(f"{x:g}" for x in cfg.lr_grid())
    _log(f"asymlora compare: {settings['model_name']} ({settings['model_params'] / 1e6:.1f}M params) on "
         f"{task.data.name} ({task.num_labels} classes); train {len(task.train)} / val {len(task.val)} / test "
         f"{len(task.test)}; {plural(len(specs), 'strategy', 'strategies')}, lr {'grid ' if cfg.selects_lr else ''}"
         f"{grid}, {plural(len(cfg.seeds), 'seed')} ({', '.join(map(str, cfg.seeds))}): {plural(sched.total, 'run')} "
         f"of batch {cfg.batch_size}, " + (f"{plural(cfg.max_steps, 'step')} each with a decaying rate"
                                            + (f" (pilots clearly losing at step {' or '.join(map(str, sched.rungs))} "
                                               "are pruned)" if sched.rungs else "")
                                            if cfg.fixed_budget else
                                            f"until validation stops improving ({plural(cfg.patience, 'evaluation')} × "
                                            f"{plural(cfg.eval_every, 'step')}, at most {plural(cfg.max_steps, 'step')})")
         + "; "
         + (f"{workers} worker processes × 1 thread" if workers > 1 else plural(threads, "thread")))

    def checkpoint_results() -> None:
        runs, selections = sched.ordered(specs)
        partial = assemble(cfg, settings, specs, runs, selections, phases, time.perf_counter() - t_start,
                           complete=False)
        partial.update(fingerprints=fingerprints, journal=journal.to_json())  # what --resume reads
        atomic_write_text(os.path.join(cfg.output_dir, "results.json"), json.dumps(partial, indent=1))

    local = InProcess((task, features), cfg, execute)
    pool = (LocalPool(replace(cfg, progress=False), workers, prepare_worker, execute) if workers > 1 else None)
    t_runs = time.perf_counter()
    first = [job for spec in sorted(specs, key=lambda s: s.is_adapter) for job in sched.pilot_jobs(spec)]
    if saved:
        _log(f"resuming the sweep in {cfg.output_dir}: {plural(len(journal.entries), 'finished job')} kept "
             "(runs, and pilots' segments up to a rung); the others run now")
    run_jobs(first, lambda job: pool if (pool is not None and job.spec.is_adapter) else local,
             lambda job, out, tag: sched.record(job, *out, tag), sched.tag, checkpoint_results, [local, pool or local],
             journal=journal)
    settings["runs_wall_s"] = round(time.perf_counter() - t_runs, 2)
    shutil.rmtree(os.path.join(cfg.output_dir, "runs"), ignore_errors=True)  # the paused pilots' checkpoints
    t = time.perf_counter()
    runs, selections = sched.ordered(specs)
    results = assemble(cfg, settings, specs, runs, selections, phases, time.perf_counter() - t_start, complete=True)
    write_reports(results, cfg.output_dir, plots=cfg.plots)
    phases.add("report", time.perf_counter() - t)
    results["phases_s"] = phases.to_dict()
    results["total_time_s"] = time.perf_counter() - t_start
    atomic_write_text(os.path.join(cfg.output_dir, "results.json"), json.dumps(results, indent=1))
    return results
