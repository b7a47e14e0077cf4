"""``asymlora sft``: the fair protocol of ``asymlora compare`` on a causal LM.

1. **Tuning** (``asymlora.sweep.schedule``): per strategy, one pilot run per rate of
   the grid on the first seed; the rate with the lowest validation response loss wins (ties:
   the smaller rate; an edge choice is flagged); the pilot at that rate is the first seed's
   run, the other seeds train at it. Every run stops when the validation loss has not reached
   a new minimum for ``patience`` evaluations (counted from ``min_steps``) and is scored with
   its best weights: test response loss and exact match of greedy answers.
2. **Benchmarks** (``asymlora.lmeval``): the base model and every strategy × seed's final
   adapter on the multiple-choice benchmarks of ``cfg.tasks``, so "did tuning move general
   ability, and equally for both strategies?" is answered on the same items.
3. **Verdicts**: each strategy against LoRA at the same r, paired by seed, on test exact match
   and on each benchmark's accuracy (``asymlora.sweep.stats``).
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import torch

from asymlora.fileio import atomic_write_text
from asymlora.sft.config import SFTConfig
from asymlora.sft.run import (
    LMTask,
    execute_run,
    prepare_lm_task,
    score_saved_adapter,
    score_test,
)
from asymlora.sweep.backends import InProcess, Job, adapter_backend, describe_backend, threads_for_run, worker_count
from asymlora.sweep.divergence import DIVERGED_NOTE, all_diverged_rows, diverged_cell, is_diverged, run_or_diverged
from asymlora.sweep.driver import Loaded, Sweep, SweepTask, run_sweep
from asymlora.sweep.engine import run_jobs
from asymlora.sweep.interrupt import stop_on_signals
from asymlora.sweep.run_settings import describe_precision, precision_settings
from asymlora.sweep.schedule import Schedule
from asymlora.sweep.stats import mean_std, paired_verdicts, summarize_runs
from asymlora.sweep.timing import Phases
from asymlora.text import mean_pm, plural
from asymlora.version import __version__

__all__ = ["run_sft", "score_saved_run", "format_report", "format_sft_table", "format_bench_table"]

SUMMARY_KEYS = ("test_exact_match", "test_loss", "val_loss", "lr", "best_step", "steps", "val_slope_last_quarter",
                "wall_time_s", "final_train_loss")
BASE = "base (untuned)"


def _log(msg: str) -> None:
    print(msg, flush=True)


def _report_run(tag: str, rec: dict[str, Any], pilot: bool) -> None:
    end = ("plateau" if rec["stopped_early"] else "step cap") if rec.get("stopping") != "budget" else "budget"
    test = ("test scored if its rate wins" if rec.get("test_deferred") else
            f"test loss {rec['test_loss']:.4f}  exact match {100 * rec['test_exact_match']:.1f}")
    _log(f"{tag} {rec['strategy']:<10} seed {rec['seed']} lr {rec['lr']:<7g} val loss {rec['val_loss']:.4f}  "
         f"{test}  best step {rec['best_step']}/{rec['steps']} ({end})  {rec['wall_time_s']:.0f} s"
         + ("  [pilot]" if pilot else ""))


def _execute_job(task: LMTask, cfg: SFTConfig, job: Job, tag: str) -> tuple[dict[str, Any], float]:
    desc = f"{tag} {job.spec.label} " + (f"lr {job.lr:g}" if job.pilot else f"seed {job.seed}")
    return run_or_diverged(lambda: execute_run(task, job.spec, job.seed, job.lr, cfg, desc=desc, pilot=job.pilot),
                           job)  # a non-finite loss is a result of the run, not a crash of the sweep


# ----------------------------------------------------------------------------- benchmarks


def _prepare_bench(cfg: SFTConfig) -> tuple[str, Any]:
    from transformers import AutoTokenizer

    from asymlora.bundled import CAUSAL_LM, resolve_model

    path = resolve_model(cfg.model, CAUSAL_LM)
    return path, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _execute_bench(state: tuple[str, Any], cfg: SFTConfig, job: tuple[str, str] | None,
                   tag: str) -> tuple[str | None, dict[str, Any], float]:
    """Score the base model (``job`` None) or base + one run's adapter (``(folder, strategy)``,
    loaded back by its strategy) on the benchmarks."""
    from transformers import AutoModelForCausalLM

    from asymlora.lmeval import evaluate
    from asymlora.strategies import get_strategy
    from asymlora.sweep.run_settings import resolve_precision

    path, tokenizer = state
    t = time.perf_counter()
    lm: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    adapter = None
    if job is not None:
        adapter, preset = job
        load = get_strategy(preset).load
        assert load is not None  # sft refuses a strategy that cannot load its adapter (SFTConfig.task_problems)
        lm = load(lm, adapter)
    bf16 = resolve_precision(cfg.mixed_precision) == "bf16"
    scores = {}
    for task in cfg.tasks:  # MMLU's limit counts items per subject (57 of them), the others' items per task
        mmlu = task == "mmlu"
        scores.update(evaluate(lm, tokenizer, [task], limit=cfg.mmlu_limit if mmlu else cfg.bench_limit,
                               shots=cfg.shots if mmlu else 0, bf16=bf16))
    out = {name: {"acc": s.acc, "acc_stderr": s.acc_stderr, "acc_norm": s.acc_norm,
                  "acc_norm_stderr": s.acc_norm_stderr, "n": s.n} for name, s in scores.items()}
    seconds = time.perf_counter() - t
    _log(f"{tag} benchmarks of {os.path.basename(adapter) if adapter else BASE}: "
         + "  ".join(f"{k} {100 * v['acc']:.1f}" for k, v in out.items()) + f"  {seconds:.0f} s")
    return adapter, out, seconds


def _run_benchmarks(cfg: SFTConfig, runs: list[dict[str, Any]], workers: int, state: Any) -> dict[str | None, Any]:
    """The base model and every run's adapter on the benchmarks, on the sweep's backend
    (``--backend``: worker processes, or Ray tasks)."""
    jobs: list[tuple[str, str] | None] = [None]
    jobs += [(r["adapter_dir"], r["preset"]) for r in runs if not is_diverged(r)]
    pool = adapter_backend(cfg, workers, _prepare_bench, _execute_bench, phase="benchmarks")
    executor: Any = pool if pool is not None else InProcess(state(), cfg, _execute_bench)
    out: dict[str | None, Any] = {}

    def book(_job: Any, result: tuple[str | None, dict[str, Any], float], _tag: str) -> list[Any]:
        adapter, scores, seconds = result
        out[adapter] = {"scores": scores, "seconds": seconds}
        return []

    tags = {job: f"[bench {i + 1}/{len(jobs)}]" for i, job in enumerate(jobs)}
    run_jobs(jobs, lambda _job: executor, book, tags.__getitem__, lambda: None, [executor])
    return out


# ----------------------------------------------------------------------------- the whole run


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Tune every strategy by the protocol, score the benchmarks, write the reports."""
    cfg.validate()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t_start = time.perf_counter()
    with stop_on_signals(), threads_for_run(cfg.threads) as (threads, probe):
        return run_sweep(SFTSweep(cfg), threads, probe, t_start)


def _too_long_line(cfg: SFTConfig, task: LMTask) -> str:
    """A second line of the intro when exchanges were longer than --max-length (empty otherwise)."""
    too_long: dict[str, dict[str, int]] = task.sizes.get("too_long", {})
    if not any(v for part in too_long.values() for v in part.values()):
        return ""
    return (f"\nexchanges longer than --max-length {cfg.max_length} tokens: "
            + ", ".join(f"{name} {part['questions_dropped']} dropped (question too long), {part['answers_cut']} "
                        "with the answer cut (its end not learnt)" for name, part in too_long.items()))


class SFTSweep(SweepTask):
    """sft as a task of the sweep driver (``asymlora.sweep.driver``)."""

    prepare_worker = staticmethod(prepare_lm_task)
    execute = staticmethod(_execute_job)

    def load(self) -> Loaded:
        task = prepare_lm_task(self.cfg)
        return Loaded.fingerprinted(task, task.model_path, (task.train, task.val_batches, task.test_batches),
                                    task.timings)

    def settings(self, state: LMTask, specs: list[Any], threads: int, probe: dict[int, float],
                 workers: int) -> dict[str, Any]:
        return _settings(self.cfg, state, threads, workers)

    def before_runs(self, state: LMTask, specs: list[Any], settings: dict[str, Any], phases: Phases) -> LMTask:
        t = time.perf_counter()
        settings["base_model_test"] = score_test(state.lm, state, self.cfg)  # the "before" of every run's "after"
        phases.add("eval", time.perf_counter() - t)
        _log(f"untuned: test loss {settings['base_model_test']['test_loss']:.4f}  exact match "
             f"{100 * settings['base_model_test']['test_exact_match']:.1f}")
        return state

    def report_run(self, tag: str, rec: dict[str, Any], pilot: bool) -> None:
        _report_run(tag, rec, pilot)

    def intro(self, state: LMTask, specs: list[Any], settings: dict[str, Any], sched: Schedule, workers: int,
              threads: int) -> str:
        cfg, task = self.cfg, state
        return (f"asymlora sft: {settings['model_name']} ({settings['model_params'] / 1e6:.0f}M params) on "
                f"{cfg.data} question→answer pairs: train {task.sizes['train']} / val {task.sizes['val']} / test "
                f"{task.sizes['test']}; {', '.join(s.label for s in specs)}; lr grid "
                f"{', '.join(f'{x:g}' for x in cfg.lr_grid())}; seeds {', '.join(map(str, cfg.seeds))}: "
                f"{plural(sched.total, 'run')} of batch {cfg.batch_size} until the validation loss stops falling "
                f"(at most {plural(cfg.max_steps, 'step')}); " + describe_backend(cfg, workers, threads)
                + "; " + describe_precision(cfg.mixed_precision) + _too_long_line(cfg, task))

    def finish_runs(self, state: LMTask, sweep: Sweep) -> None:
        """The winning pilots' test scores, from their saved adapters."""
        t = time.perf_counter()
        for key, rec in list(sweep.sched.runs.items()):
            if rec.get("test_deferred"):
                sweep.sched.runs[key] = score_saved_adapter(state, self.cfg, rec)
                _report_run("[test]", sweep.sched.runs[key], False)
        sweep.phases.add("eval", time.perf_counter() - t)

    def last_phase(self, state: LMTask, sweep: Sweep) -> None:
        self.bench: dict[str | None, Any] = {}
        if self.cfg.tasks:
            t = time.perf_counter()
            runs, _ = sweep.sched.ordered(sweep.specs)
            self.bench = _run_benchmarks(self.cfg, runs, sweep.workers, lambda: (state.model_path, state.tokenizer))
            sweep.phases.add("benchmarks", time.perf_counter() - t)

    def assemble(self, sweep: Sweep, complete: bool) -> dict[str, Any]:
        runs, selections = sweep.sched.ordered(sweep.specs)
        return _assemble(self.cfg, sweep.settings, sweep.specs, runs, selections,
                         getattr(self, "bench", {}) if complete else {}, sweep.phases, sweep.t_start,
                         complete=complete)

    def write(self, results: dict[str, Any], sweep: Sweep) -> dict[str, Any]:
        _write_reports(results, self.cfg.output_dir)
        return results


def score_saved_run(cfg: SFTConfig) -> dict[str, Any]:
    """Score the benchmarks of a finished run in ``cfg.output_dir`` (one made with ``--benchmarks
    none``, or to score other benchmarks): the base model and every seed's final adapter, then
    the reports are rewritten with the benchmark table and verdicts."""
    from asymlora.errors import UserError

    path = os.path.join(cfg.output_dir, "results.json")
    if not os.path.isfile(path):
        raise UserError(f"--benchmarks-only: {path} does not exist; run `asymlora sft -o {cfg.output_dir}` first")
    saved = json.loads(open(path, encoding="utf-8").read())
    if not saved.get("complete"):
        raise UserError(f"--benchmarks-only: the run in {cfg.output_dir} did not finish (results.json is partial)")
    if not cfg.tasks:
        raise UserError("--benchmarks-only with --benchmarks none: nothing to score")
    t_start = time.perf_counter()
    runs, settings = saved["runs"], saved["settings"]
    missing = [r["adapter_dir"] for r in runs if not os.path.isdir(r["adapter_dir"])]
    if missing:
        raise UserError(f"--benchmarks-only: adapter folder(s) missing: {', '.join(missing)}")
    names = settings.get("strategy_names") or [s.split(" r=")[0] for s in settings["strategies"]]
    specs = SFTConfig(strategies=names, ranks=settings["ranks"]).runs()
    with threads_for_run(cfg.threads):
        bench = _run_benchmarks(cfg, runs, worker_count(cfg, specs), lambda: _prepare_bench(cfg))
    phases = Phases()
    for name, seconds in saved["phases_s"].items():
        phases.add(name, seconds)
    phases.add("benchmarks", time.perf_counter() - t_start)
    settings.update(tasks=cfg.tasks, bench_limit=cfg.bench_limit, mmlu_limit=cfg.mmlu_limit, shots=cfg.shots)
    # the total counts the saved run's time plus this scoring
    results = _assemble(cfg, settings, specs, runs, saved["lr_selection"], bench, phases,
                        t_start - saved["total_time_s"], complete=True)
    _write_reports(results, cfg.output_dir)
    return results


def _write_reports(results: dict[str, Any], out_dir: str) -> None:
    """results.json, results.md and verdicts.png (each paired difference with its interval)."""
    from asymlora.sweep.plots import write_verdict_plot

    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
    atomic_write_text(os.path.join(out_dir, "results.md"), format_sft_markdown(results))
    settings = results["settings"]
    write_verdict_plot(results["paired_verdicts"], os.path.join(out_dir, "verdicts.png"),
                       f"{settings['model_name']}: paired differences over seeds {settings['seeds']}")


def _settings(cfg: SFTConfig, task: LMTask, threads: int, workers: int) -> dict[str, Any]:
    import transformers



    return {
        "model": task.model_path, "model_name": os.path.basename(os.path.normpath(task.model_path)),
        "model_params": sum(p.numel() for p in task.lm.parameters()), "data": cfg.sources, "sizes": task.sizes,
        "strategies": [s.label for s in cfg.runs()], "strategy_names": cfg.strategies, "ranks": cfg.ranks,
        "seeds": cfg.seeds, "lr_grid": cfg.lr_grid(),
        "selected_on": "validation response loss (lowest)", "max_steps": cfg.max_steps, "eval_every": cfg.eval_every,
        "patience": cfg.patience, "min_steps": cfg.min_steps, "warmup_steps": cfg.warmup_steps,
        "stopping": cfg.stopping, "max_lr_extensions": cfg.max_lr_extensions,
        "lr_schedule": ("linear warm-up, then linear decay to 0" if cfg.fixed_budget
                        else "linear warm-up, then constant"),
        "batch_size": cfg.batch_size, "max_length": cfg.max_length,
        "alpha": "2r (scaling alpha/r = 2)", "target_modules": cfg.target_modules,
        "loss": "response-only (assistant tokens of the model's chat template)",
        "tasks": cfg.tasks, "bench_limit": cfg.bench_limit, "mmlu_limit": cfg.mmlu_limit, "shots": cfg.shots,
        "max_new_tokens": cfg.max_new_tokens, "margin": cfg.margin, "min_delta": cfg.min_delta,
        "threads": threads, "workers": workers,
        **precision_settings(cfg.mixed_precision),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "asymlora": __version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }


def _verdict_line(v: Any) -> str:
    """Accuracies in points; the log-likelihood per token in nats (higher is better)."""
    if v.metric.endswith("loglik"):
        return f"{v.metric}: {v.line(scale=1.0, unit='nats/token', digits=3)} (margin ±{v.margin:g})"
    return f"{v.metric}: {v.line()}"


def _bench_rows(runs: list[dict[str, Any]], bench: dict[str | None, Any], order: list[str],
                tasks: list[str]) -> list[dict[str, Any]]:
    """Benchmark accuracy per strategy (mean ± std over seeds) and of the base model."""
    if not bench:
        return []
    rows = [{"strategy": BASE, "n_models": 1,
             **{f"{t}_{k}": bench[None]["scores"][t][k]
                for t in tasks for k in ("acc", "acc_norm", "acc_stderr", "n")}}]
    for label in order:
        rs = [r for r in runs if r["strategy"] == label and r.get("adapter_dir") in bench]
        if not rs:
            continue
        row: dict[str, Any] = {"strategy": label, "n_models": len(rs)}
        for t in tasks:
            for k in ("acc", "acc_norm"):
                row[f"{t}_{k}"], row[f"{t}_{k}_std"] = mean_std([bench[r["adapter_dir"]]["scores"][t][k] for r in rs])
        rows.append(row)
    return rows


def _assemble(cfg: SFTConfig, settings: dict[str, Any], specs: list[Any], runs: list[dict[str, Any]],
              selections: list[dict[str, Any]], bench: dict[str | None, Any], phases: Phases, t_start: float,
              complete: bool) -> dict[str, Any]:
    order = [s.label for s in specs]
    for r in runs:  # each run's benchmark scores, for the paired verdicts
        for t, s in (bench.get(r.get("adapter_dir"), {}).get("scores") or {}).items():
            r[f"{t}_acc"] = s["acc"]
    verdicts = []
    if complete:  # exact match in points (margin: cfg.margin), log-likelihood per token in nats (margin 0.01)
        verdicts += paired_verdicts(runs, specs, cfg.margin, metric="test_exact_match")
        verdicts += paired_verdicts(runs, specs, 0.01, metric="test_loglik")
    for t in cfg.tasks if bench else []:
        verdicts += paired_verdicts(runs, specs, cfg.margin, metric=f"{t}_acc")
    return {
        "complete": complete, "settings": settings, "lr_selection": selections,
        "summary": all_diverged_rows(summarize_runs(runs, order, SUMMARY_KEYS), selections, order),
        "benchmarks": _bench_rows(runs, bench, order, cfg.tasks),
        "paired_verdicts": [v.to_dict() for v in verdicts], "verdict_lines": [_verdict_line(v) for v in verdicts],
        "runs": runs, "phases_s": phases.to_dict(), "total_time_s": round(time.perf_counter() - t_start, 1),
    }


# ----------------------------------------------------------------------------- reports


def format_sft_table(results: dict[str, Any]) -> str:
    """Tuning results per strategy: test exact match and losses (mean ± std over seeds)."""
    lines = [f"{'strategy':<12} {'lr':>7} {'exact match %':>15} {'test loss':>15} {'val loss':>9} "
             f"{'steps (best)':>13} {'trainable':>10}"]
    for row in results["summary"]:
        if row.get("all_diverged"):
            lines.append(f"{row['strategy']:<12} {'-':>7} {diverged_cell(row)}")
            continue
        exact = mean_pm(row["test_exact_match_mean"], row["test_exact_match_std"], scale=100)
        loss = mean_pm(row["test_loss_mean"], row["test_loss_std"], digits=4)
        lines.append(f"{row['strategy']:<12} {row['lr_mean']:>7g} {exact:>15} {loss:>15}"
                     f"{row['val_loss_mean']:>9.4f} {row['steps_mean']:>7.0f} "
                     f"({row['best_step_mean']:.0f}) {row['adapter_params']:>10,}"
                     + (f"  ({row['diverged']} diverged)" if row.get("diverged") else ""))
    base = results["settings"].get("base_model_test")
    if base:
        lines.append(f"{'untuned':<12} {'':>7} {100 * base['test_exact_match']:>8.2f}{'':7} {base['test_loss']:>8.4f}")
    return "\n".join(lines)


def format_report(results: dict[str, Any], cfg: SFTConfig) -> str:
    """What ``asymlora sft`` prints at the end: the tuning table, the chosen rates, the benchmark
    table, the verdicts, the time and the files written (``asymlora.sweep.report``)."""
    from asymlora.sweep.report import SelectionMetric, format_sweep_report

    bench = format_bench_table(results, cfg.tasks)
    sections = [f"benchmarks (accuracy %; {cfg.bench_limit or 'all'} items each, MMLU {cfg.mmlu_limit or 'all'} per "
                f"subject):\n{bench}"] if bench else []
    return format_sweep_report(
        results, tables=[format_sft_table(results)],
        metric=SelectionMetric("validation loss", "val_loss", lambda v: f"{v:.4f}"), first_seed=cfg.seeds[0],
        margin=cfg.margin, verdicts_on="", output_dir=cfg.output_dir,
        files=["results.json", "results.md", "verdicts.png", "adapters/"], sections=sections)


def format_bench_table(results: dict[str, Any], tasks: list[str]) -> str:
    rows = results.get("benchmarks") or []
    if not rows:
        return ""
    head = f"{'model':<16}" + "".join(f" {t + ' acc / acc_norm':>28}" for t in tasks)
    lines = [head]
    for row in rows:
        cells = "".join(f" {100 * row[t + '_acc']:>12.1f} / {100 * row[t + '_acc_norm']:<13.1f}" for t in tasks)
        lines.append(f"{row['strategy']:<16}{cells}")
    return "\n".join(lines)


def _bench_sizes(s: dict[str, Any]) -> str:
    per = s.get("bench_limit") or "all"
    mmlu = s.get("mmlu_limit")
    return (f"first {per} items of each task" + (f"; MMLU {mmlu} per subject, {s.get('shots', 0)}-shot"
                                                  if "mmlu" in s["tasks"] else ""))


def format_sft_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    out = [f"# asymlora sft: {s['model_name']} on {', '.join(s['data'])}", "",
           f"Sizes: {s['sizes']}. Strategies {', '.join(s['strategies'])}; lr grid "
           f"{', '.join(f'{x:g}' for x in s['lr_grid'])} selected on {s['selected_on']}; seeds {s['seeds']}; "
           f"batch {s['batch_size']}, ≤{s['max_steps']} steps, validation every {s['eval_every']} steps, patience "
           f"{s['patience']} from step {s['min_steps']}; {s['loss']}; targets {s['target_modules']}, {s['alpha']}.",
           "", "```", format_sft_table(results), "```", ""]
    for sel in results["lr_selection"]:
        grid = ", ".join(f"{g['lr']:g}: " + (f"diverged at step {g['diverged_at_step']}"
                                              if g.get("diverged_at_step") is not None else f"{g['val_loss']:.4f}")
                         for g in sel["grid"])
        edge = f" (on the {sel['at_edge']} edge of the grid)" if sel.get("at_edge") else ""
        chosen = DIVERGED_NOTE if sel["chosen_lr"] is None else f"{sel['chosen_lr']:g}"
        out.append(f"- lr for {sel['strategy']}: {chosen}{edge} — validation loss by lr: {grid}")
    bench = format_bench_table(results, s["tasks"])
    if bench:
        out += ["", f"Benchmarks ({_bench_sizes(s)}; accuracy %, mean over seeds):", "",
                "```", bench, "```"]
    if results["verdict_lines"]:
        out += ["", "Paired differences against LoRA, 95 % t-interval over seeds:", ""]
        out += [f"- {line}" for line in results["verdict_lines"]]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in results["phases_s"].items())
    out += ["", f"Total {results['total_time_s']:.0f} s ({phases}).", ""]
    return "\n".join(out)
