"""``asymlora compare`` as a task of the sweep driver (``asymlora.sweep.driver``; docs/design.md §4): each
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
from typing import Any

import torch

from asymlora.bundled import model_title
from asymlora.compare.config import CompareConfig, StrategySpec
from asymlora.compare.run import execute_run, refuse_unfit
from asymlora.compare.task import HeadFeatures, Task, head_features, prepare_task
from asymlora.compare.workers import execute, prepare_worker
from asymlora.fileio import atomic_write_text
from asymlora.sweep.backends import Job, describe_backend, threads_for_run
from asymlora.sweep.driver import Loaded, Sweep, SweepTask, run_sweep
from asymlora.sweep.interrupt import stop_on_signals
from asymlora.sweep.outdir import RESULTS
from asymlora.sweep.run_settings import autocast, describe_precision, precision_settings, resolve_precision
from asymlora.sweep.schedule import Schedule, grid_extension, select_lr
from asymlora.sweep.timing import Phases
from asymlora.text import plural
from asymlora.version import __version__

__all__ = ["run_compare", "CompareSweep", "select_lr", "grid_extension", "Phases", "execute_run"]


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
        "used_sizes": {"train": len(task.train), "val": len(task.val), "test": len(task.test),
                       "train_sample": len(task.train_sample_ds)},
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
        return run_sweep(CompareSweep(cfg), threads, probe, t_start)


def _truncation_line(cfg: CompareConfig, settings: dict[str, Any]) -> str:
    """A second line of the intro when texts were cut to --max-length (empty otherwise)."""
    cut = settings["truncated_texts"]
    if not any(cut.values()):
        return ""
    return (f"\ntexts longer than --max-length {cfg.max_length} tokens were cut to it: "
            + ", ".join(f"{name} {n} of {settings['used_sizes'][name]}" for name, n in cut.items()))


class CompareSweep(SweepTask):
    """compare as a task of the sweep driver (``asymlora.sweep.driver``)."""

    prepare_worker = staticmethod(prepare_worker)
    execute = staticmethod(execute)

    def load(self) -> Loaded:
        task = prepare_task(self.cfg)
        return Loaded.fingerprinted(task, task.model_path, (task.train_ds, task.val_ds, task.test_ds), task.timings)

    def refuse_unfit(self, state: Task, specs: list[StrategySpec]) -> None:
        refuse_unfit(state, specs, self.cfg)

    def settings(self, state: Task, specs: list[StrategySpec], threads: int, probe: dict[int, float],
                 workers: int) -> dict[str, Any]:
        return dict(_settings(self.cfg, state, specs, threads, probe), workers=workers)

    def before_runs(self, state: Task, specs: list[StrategySpec], settings: dict[str, Any],
                    phases: Phases) -> tuple[Task, dict[str, HeadFeatures] | None]:
        """The head-only runs' features of the frozen encoder, computed once here."""
        cfg, task = self.cfg, state
        features: dict[str, HeadFeatures] | None = None
        if any(not s.is_adapter for s in specs):
            t = time.perf_counter()
            with autocast(resolve_precision(cfg.mixed_precision)):
                feats = {name: head_features(task.base, task.head, ds, task.collate)
                         for name, ds in (("train", task.train_ds), ("val", task.val_ds), ("test", task.test_ds),
                                          ("train_sample", task.train_sample_ds))}
            if all(f is not None for f in feats.values()):
                features = {k: f for k, f in feats.items() if f is not None}
            phases.add("features", time.perf_counter() - t)
        return task, features

    def runs_here(self, job: Job) -> bool:
        return not job.spec.is_adapter  # head-only: on the features computed here

    def first_jobs(self, sched: Schedule, specs: list[StrategySpec]) -> list[Job]:
        return [job for spec in sorted(specs, key=lambda s: s.is_adapter) for job in sched.pilot_jobs(spec)]

    def report_run(self, tag: str, rec: dict[str, Any], pilot: bool) -> None:
        _report_run(tag, rec, pilot)

    def intro(self, state: Task, specs: list[StrategySpec], settings: dict[str, Any], sched: Schedule,
              workers: int, threads: int) -> str:
        cfg, task = self.cfg, state
        grid = ", ".join(f"{x:g}" for x in cfg.lr_grid()) + "".join(
            f" ({s.label}: ×{s.lr_scale:g})" for s in specs if s.lr_scale != 1 and cfg.lr is None)
        if cfg.fixed_budget:
            budget = f"{plural(cfg.max_steps, 'step')} each with a decaying rate" + (
                f" (pilots clearly losing at step {' or '.join(map(str, sched.rungs))} are pruned)"
                if sched.rungs else "")
        else:
            budget = (f"until validation stops improving ({plural(cfg.patience, 'evaluation')} × "
                      f"{plural(cfg.eval_every, 'step')}, at most {plural(cfg.max_steps, 'step')})")
        return (f"asymlora compare: {settings['model_name']} ({settings['model_params'] / 1e6:.1f}M params) on "
                f"{task.data.name} ({task.num_labels} classes); train {len(task.train)} / val {len(task.val)} / "
                f"test {len(task.test)}; {plural(len(specs), 'strategy', 'strategies')}, lr "
                f"{'grid ' if cfg.selects_lr else ''}{grid}, {plural(len(cfg.seeds), 'seed')} "
                f"({', '.join(map(str, cfg.seeds))}): {plural(sched.total, 'run')} of batch {cfg.batch_size}, "
                f"{budget}; " + describe_backend(cfg, workers, threads)
                + "; " + describe_precision(cfg.mixed_precision) + _truncation_line(cfg, settings))

    def assemble(self, sweep: Sweep, complete: bool) -> dict[str, Any]:
        from asymlora.compare.report import assemble

        runs, selections = sweep.sched.ordered(sweep.specs)
        return assemble(self.cfg, sweep.settings, sweep.specs, runs, selections, sweep.phases,
                        time.perf_counter() - sweep.t_start, complete=complete)

    def write(self, results: dict[str, Any], sweep: Sweep) -> dict[str, Any]:
        from asymlora.compare.report import write_reports

        t = time.perf_counter()
        write_reports(results, self.cfg.output_dir, plots=self.cfg.plots)
        sweep.phases.add("report", time.perf_counter() - t)
        results["phases_s"] = sweep.phases.to_dict()
        results["total_time_s"] = time.perf_counter() - sweep.t_start
        atomic_write_text(os.path.join(self.cfg.output_dir, RESULTS), json.dumps(results, indent=1))
        return results
