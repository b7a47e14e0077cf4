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
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Callable

import torch

from asymlora.commands.options import plural
from asymlora.compare.config import CompareConfig, StrategySpec
from asymlora.compare.run import autocast, resolve_precision, train_one
from asymlora.compare.task import Task, head_features, prepare_task, threads_for_run
from asymlora.compare.workers import InProcess, Job, Pool, worker_count
from asymlora.fileio import atomic_write_text

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
    end = "plateau" if rec["stopped_early"] else "step cap"
    _log(f"{tag} {rec['strategy']:<18} seed {rec['seed']} lr {rec['lr']:<7g} "
         f"val {100 * rec['val_accuracy']:.2f}  test {100 * rec['test_accuracy']:.2f}  best step "
         f"{rec['best_step']}/{rec['steps']} ({end})  {rec['wall_time_s']:.0f} s" + ("  [pilot]" if pilot else ""))


class _Schedule:
    """Pilots of every strategy first; a strategy's other seeds as soon as its pilots are in."""

    def __init__(self, specs: list[StrategySpec], cfg: CompareConfig, phases: Phases,
                 report_run: Callable[[str, dict[str, Any], bool], None] = _report_run) -> None:
        self.cfg, self.phases, self.report_run = cfg, phases, report_run
        # what the pilots are ranked by (class attributes of the config: compare ranks by
        # validation accuracy, sft by validation loss)
        self.metric, self.higher = cfg.selection_metric, cfg.selection_higher_is_better
        self.total = len(specs) * (len(cfg.lr_grid()) + len(cfg.seeds) - 1)
        self.started = 0
        self.pilots: dict[str, dict[float, dict[str, Any]]] = {s.label: {} for s in specs}
        self.runs: dict[tuple[str, int], dict[str, Any]] = {}
        self.selections: dict[str, dict[str, Any]] = {}
        self.extensions: dict[str, int] = {}

    def tag(self) -> str:
        self.started += 1
        return f"[{self.started}/{self.total}]"

    def pilot_jobs(self, spec: StrategySpec) -> list[Job]:
        return [Job(spec, self.cfg.seeds[0], lr, True) for lr in self.cfg.lr_grid()]

    def record(self, job: Job, rec: dict[str, Any], eval_s: float, tag: str) -> list[Job]:
        """Book a finished run; returns the jobs it unlocks (the strategy's other seeds)."""
        self.phases.add("pilot" if job.pilot else "train", rec["wall_time_s"] - eval_s)
        self.phases.add("eval", eval_s)
        self.report_run(tag, rec, job.pilot and self.cfg.selects_lr)
        if not job.pilot:
            self.runs[(job.spec.label, job.seed)] = dict(rec, role="run")
            return []
        pilots = self.pilots[job.spec.label]
        pilots[job.lr] = rec
        if len(pilots) < len(self.cfg.lr_grid()) + self.extensions.get(job.spec.label, 0):
            return []
        chosen = select_lr(pilots, self.metric, self.higher)
        beyond = grid_extension(sorted(pilots), chosen)
        if beyond is not None and self.extensions.get(job.spec.label, 0) < self.cfg.max_lr_extensions:
            # The best rate is at the edge of what was tried: the optimum may lie beyond it.
            self.extensions[job.spec.label] = self.extensions.get(job.spec.label, 0) + 1
            self.total += 1
            return [Job(job.spec, job.seed, beyond, True)]
        self.selections[job.spec.label] = _selection(job.spec, self.cfg, pilots, chosen, self.metric)
        self.runs[(job.spec.label, job.seed)] = dict(pilots[chosen], role="pilot-winner" if self.cfg.selects_lr
                                                     else "run")
        return [Job(job.spec, seed, chosen, False) for seed in self.cfg.seeds[1:]]

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
               chosen: float, metric: str = "val_accuracy") -> dict[str, Any]:
    tried = sorted(pilots)
    edge = None if grid_extension(tried, chosen) is None else ("lower" if chosen == tried[0] else "upper")
    what = metric.removeprefix("val_").replace("_", " ")
    return {
        "strategy": spec.label, "chosen_lr": chosen, "selected_on": f"validation {what}, seed {cfg.seeds[0]}",
        "at_edge": edge,
        "grid": [{"lr": lr, metric: r[metric], "best_step": r["best_step"], "steps": r["steps"],
                  "stopped_early": r["stopped_early"],
                  "curve": [(h["step"], h[metric]) for h in r["history"] if metric in h]}
                 for lr, r in sorted(pilots.items())],
    }


def _run_all(specs: list[StrategySpec], cfg: CompareConfig, sched: _Schedule, executors: dict[bool, Any],
             on_progress: Callable[[], None]) -> None:
    """Drive every job to completion; ``executors[is_adapter]`` runs a job (head-only runs stay
    in this process, on the cached features)."""
    pending: dict[Future, tuple[Job, str]] = {}

    def submit(job: Job) -> None:
        tag = sched.tag()
        pending[executors[job.spec.is_adapter].submit(job, tag)] = (job, tag)

    for spec in sorted(specs, key=lambda s: s.is_adapter):  # the cheap head-only runs first
        for job in sched.pilot_jobs(spec):
            submit(job)
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in done:
            job, tag = pending.pop(fut)
            rec, eval_s = fut.result()
            for nxt in sched.record(job, rec, eval_s, tag):
                submit(nxt)
        on_progress()


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
        "eval_every": cfg.eval_every, "patience": cfg.patience, "min_steps": cfg.min_steps, "warmup_steps": cfg.warmup_steps,
        "lr_schedule": "linear warm-up, then constant", "batch_size": cfg.batch_size,
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
    with threads_for_run(cfg.threads) as (threads, probe):
        return _run(cfg, threads, probe, t_start)


def _run(cfg: CompareConfig, threads: int, probe: dict[int, float], t_start: float) -> dict[str, Any]:
    from asymlora.compare.report import assemble, write_reports

    specs = cfg.runs()
    phases = Phases()
    task = prepare_task(cfg)
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
         f"of batch {cfg.batch_size} until validation stops improving ({plural(cfg.patience, 'evaluation')} × "
         f"{plural(cfg.eval_every, 'step')}, at most {plural(cfg.max_steps, 'step')}); "
         + (f"{workers} worker processes × 1 thread" if workers > 1 else plural(threads, "thread")))

    def checkpoint_results() -> None:
        runs, selections = sched.ordered(specs)
        partial = assemble(cfg, settings, specs, runs, selections, phases, time.perf_counter() - t_start,
                           complete=False)
        atomic_write_text(os.path.join(cfg.output_dir, "results.json"), json.dumps(partial, indent=1))

    local = InProcess(task, cfg, features)
    pool = Pool(cfg, workers) if workers > 1 else None
    t_runs = time.perf_counter()
    try:
        _run_all(specs, cfg, sched, {False: local, True: pool or local}, checkpoint_results)
    finally:
        if pool is not None:
            pool.close()
    settings["runs_wall_s"] = round(time.perf_counter() - t_runs, 2)
    t = time.perf_counter()
    runs, selections = sched.ordered(specs)
    results = assemble(cfg, settings, specs, runs, selections, phases, time.perf_counter() - t_start, complete=True)
    write_reports(results, cfg.output_dir, plots=cfg.plots)
    phases.add("report", time.perf_counter() - t)
    results["phases_s"] = phases.to_dict()
    results["total_time_s"] = time.perf_counter() - t_start
    atomic_write_text(os.path.join(cfg.output_dir, "results.json"), json.dumps(results, indent=1))
    return results
