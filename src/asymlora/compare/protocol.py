"""``asymlora compare`` as a task on the sweep engine (``asymlora.sweep``; docs/design.md §4): each
strategy at its own learning rate, picked on validation accuracy; paired seeds.

1. **Learning rate** (``asymlora.sweep.schedule``): per strategy, one pilot run per rate of
   the grid on the first seed; the best validation accuracy wins (ties: the smaller rate); the
   pilot at that rate is the first seed's run. Test data is never looked at here.
2. **Runs** (``asymlora.compare.run``). Every other seed trains at the chosen rate: warm-up,
   then a constant rate (a decay would flatten the curve by itself); validation every
   ``eval_every`` steps; stop after ``patience`` evaluations without a new best, counted from
   ``min_steps`` (or at ``max_steps``); the weights of the best
   validation step are restored and scored on test. Each run records its best step, whether
   patience ran out (a plateau) or the step cap was hit, and the slope of its validation curve
   over the last quarter of the run.
3. **Pairing.** A seed fixes the data order, the head's initialisation and the seeds of the
   frozen factors for every strategy, so strategy differences are paired by seed
   (``asymlora.sweep.stats``).

The head-only baseline trains the head on features of the frozen encoder computed once (eval
mode), as a linear probe; its runs follow the same rules.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import replace
from typing import Any

import torch

from asymlora.bundled import model_title
from asymlora.compare.config import CompareConfig, StrategySpec
from asymlora.compare.run import execute_run, refuse_unfit
from asymlora.compare.task import Task, head_features, prepare_task
from asymlora.compare.workers import execute, prepare_worker
from asymlora.fileio import atomic_write_text
from asymlora.sweep.backends import (
    InProcess,
    adapter_backend,
    describe_backend,
    threads_for_run,
    worker_count,
)
from asymlora.sweep.engine import run_jobs
from asymlora.sweep.interrupt import stop_on_signals
from asymlora.sweep.outdir import RESULTS, SweepFolder, check_output_dir
from asymlora.sweep.resume import (
    Journal,
    check_fingerprints,
    data_fingerprint,
    load_partial,
    model_fingerprint,
    settings_fingerprint,
)
from asymlora.sweep.run_settings import autocast, describe_precision, precision_settings, resolve_precision
from asymlora.sweep.schedule import Schedule, grid_extension, select_lr
from asymlora.sweep.timing import Phases
from asymlora.text import plural
from asymlora.version import __version__

__all__ = ["run_compare", "select_lr", "grid_extension", "Phases", "execute_run"]


def _log(msg: str) -> None:
    print(msg, flush=True)


def _report_run(tag: str, rec: dict[str, Any], pilot: bool) -> None:
    if rec.get("stopping") == "budget":
        end = f"{rec['steps']} steps"
    else:
        end = f"best step {rec['best_step']}/{rec['steps']} ({'plateau' if rec['stopped_early'] else 'step cap'})"
    _log(f"{tag} {rec['strategy']:<18} seed {rec['seed']} lr {rec['lr']:<7g} "
         f"val {100 * rec['val_accuracy']:.2f}  test {100 * rec['test_accuracy']:.2f}  {end}  "
         f"{rec['wall_time_s']:.0f} s" + ("  [pilot]" if pilot else ""))


def _settings(cfg: CompareConfig, task: Task, specs: list[StrategySpec], threads: int,
              thread_probe: dict[int, float]) -> dict[str, Any]:
    import transformers

    from asymlora.core.inject import find_target_modules

    base = task.base
    targets = find_target_modules(base, cfg.targets, exclude=[task.head])
    k = task.num_labels
    return {
        "model": os.path.abspath(task.model_path),
        "model_name": model_title(cfg.model),
        "model_type": base.config.model_type, "model_params": sum(p.numel() for p in base.parameters()),
        "data": cfg.data, "dataset": task.data.summary(),
        "used_sizes": {"train": len(task.train), "val": len(task.val), "test": len(task.test)},
        "truncated_texts": {name: getattr(ds, "truncated", 0) for name, ds in
                            (("train", task.train_ds), ("val", task.val_ds), ("test", task.test_ds))},
        "majority_class_test_accuracy": max(task.test.class_counts(k)) / len(task.test),
        "strategies": [s.label for s in specs], "ranks": cfg.ranks, "seeds": cfg.seeds,
        "lr_grid": cfg.lr_grid(), "lr_grids": {s.label: cfg.lr_grid(s) for s in specs},
        "selects_lr": cfg.selects_lr, "max_lr_extensions": cfg.max_lr_extensions,
        "max_steps": cfg.max_steps, "stopping": cfg.stopping, "rungs": cfg.rung_steps(), "prune_z": cfg.prune_z,
        "eval_every": cfg.eval_every, "patience": cfg.patience, "min_steps": cfg.min_steps,
        "warmup_steps": cfg.warmup_steps,
        "schedule": cfg.schedule if cfg.fixed_budget else "constant",
        "lr_schedule": ({"linear": "linear warm-up, then linear decay to 0",
                         "wsd": "linear warm-up, the peak rate, then linear decay to 0 over the last quarter"
                         }[cfg.schedule]
                        if cfg.fixed_budget else "linear warm-up, then constant"),
        "batch_size": cfg.batch_size,
        "batching": "length-grouped batches (runs of 50 batches sorted by length, batches shuffled)",
        "max_length": cfg.max_length, "weight_decay": cfg.weight_decay, "margin": cfg.margin,
        "alpha": "2r (scaling alpha/r = 2)", "target_modules": cfg.target_modules or "architecture default",
        "adapted_layers": (f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in targets}))} "
                           f"({plural(len(targets), 'layer')})"),
        "head": task.head, "quick": cfg.quick, "threads": threads,
        "thread_probe_s": {str(n): round(v, 5) for n, v in thread_probe.items()},
        **precision_settings(cfg.mixed_precision),
        "peak_memory": ("CUDA max_memory_allocated" if torch.cuda.is_available() else
                        "CPU peak resident set size of the process during the run (Linux VmHWM reset per run)"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "asymlora": __version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
    }


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run the protocol for every strategy and write the reports; returns the results dict."""
    cfg.validate()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    t_start = time.perf_counter()
    with stop_on_signals(), threads_for_run(cfg.threads) as (threads, probe):
        return _run(cfg, threads, probe, t_start)


def _run(cfg: CompareConfig, threads: int, probe: dict[int, float], t_start: float) -> dict[str, Any]:
    from asymlora.compare.report import assemble, write_reports

    specs = cfg.runs()
    phases = Phases()
    check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)  # an earlier sweep is never lost by accident
    saved = load_partial(cfg.output_dir) if cfg.resume else None
    fingerprints = {"settings": settings_fingerprint(cfg, cfg.NOT_IN_FINGERPRINT)}
    if saved:  # refused before anything is loaded when the settings differ
        check_fingerprints(saved["fingerprints"], fingerprints, cfg.output_dir)
    folder = SweepFolder(cfg.output_dir, saved)
    cfg = replace(cfg, checkpoint_dir=folder.checkpoints)  # this sweep's own: no earlier checkpoint is taken
    task = prepare_task(cfg)
    refuse_unfit(task, specs, cfg)  # a method that cannot adapt this model: one line, before any run
    fingerprints.update(data=data_fingerprint(task.train_ds, task.val_ds, task.test_ds),
                        model=model_fingerprint(task.model_path))
    if saved:
        check_fingerprints(saved["fingerprints"], fingerprints, cfg.output_dir)
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
    sched = Schedule(specs, cfg, phases, report_run=_report_run)
    grid = ", ".join(f"{x:g}" for x in cfg.lr_grid()) + "".join(
        f" ({s.label}: ×{s.lr_scale:g})" for s in specs if s.lr_scale != 1 and cfg.lr is None)
    _log(f"asymlora compare: {settings['model_name']} ({settings['model_params'] / 1e6:.1f}M params) on "
         f"{task.data.name} ({task.num_labels} classes); train {len(task.train)} / val {len(task.val)} / test "
         f"{len(task.test)}; {plural(len(specs), 'strategy', 'strategies')}, lr {'grid ' if cfg.selects_lr else ''}"
         f"{grid}, {plural(len(cfg.seeds), 'seed')} ({', '.join(map(str, cfg.seeds))}): {plural(sched.total, 'run')} "
         f"of batch {cfg.batch_size}, " + (f"{plural(cfg.max_steps, 'step')} each with a decaying rate"
                                            + (f" (pilots clearly losing at step {' or '.join(map(str, sched.rungs))} "
                                               "are pruned)" if sched.rungs else "")
                                            if cfg.fixed_budget else
                                            f"until validation stops improving ({plural(cfg.patience, 'evaluation')} × "
                                            f"{plural(cfg.eval_every, 'step')}, "
                                            f"at most {plural(cfg.max_steps, 'step')})")
         + "; "
         + describe_backend(cfg, workers, threads) + "; " + describe_precision(cfg.mixed_precision))

    cut = settings["truncated_texts"]
    if any(cut.values()):
        _log(f"texts longer than --max-length {cfg.max_length} tokens were cut to it: "
             + ", ".join(f"{name} {n} of {settings['used_sizes'][name]}" for name, n in cut.items()))

    def checkpoint_results() -> None:
        runs, selections = sched.ordered(specs)
        partial = assemble(cfg, settings, specs, runs, selections, phases, time.perf_counter() - t_start,
                           complete=False)
        partial.update(fingerprints=fingerprints, journal=journal.to_json(), **folder.state())  # what --resume reads
        atomic_write_text(folder.partial_path, json.dumps(partial, indent=1))

    local = InProcess((task, features), cfg, execute)
    pool = adapter_backend(cfg, workers, prepare_worker, execute)
    t_runs = time.perf_counter()
    first = [job for spec in sorted(specs, key=lambda s: s.is_adapter) for job in sched.pilot_jobs(spec)]
    if saved:
        _log(f"resuming the sweep in {cfg.output_dir}: {plural(len(journal.entries), 'finished job')} kept "
             "(runs, and pilots' segments up to a rung); the others run now")
    run_jobs(first, lambda job: pool if (pool is not None and job.spec.is_adapter) else local,
             sched.book, sched.tag, checkpoint_results, [local, pool or local], journal=journal)
    settings["runs_wall_s"] = round(time.perf_counter() - t_runs, 2)
    t = time.perf_counter()
    runs, selections = sched.ordered(specs)
    results = assemble(cfg, settings, specs, runs, selections, phases, time.perf_counter() - t_start, complete=True)
    write_reports(results, cfg.output_dir, plots=cfg.plots)
    phases.add("report", time.perf_counter() - t)
    results["phases_s"] = phases.to_dict()
    results["total_time_s"] = time.perf_counter() - t_start
    atomic_write_text(os.path.join(cfg.output_dir, RESULTS), json.dumps(results, indent=1))
    folder.finish()  # the paused pilots' checkpoints, and the partial results of an --overwrite
    return results
