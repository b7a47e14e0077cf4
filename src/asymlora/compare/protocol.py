"""The protocol of ``asymlora compare`` (DESIGN.md §8): each strategy at its own learning rate,
picked on validation; every run trained until its validation curve stops improving; paired seeds.

1. **Learning rate.** For each strategy, one run per rate of the grid on the first seed (the
   pilot). The rate whose run reaches the best validation accuracy wins (ties: the smaller
   rate). When it is the grid's smallest or largest, the optimum may lie beyond: with
   ``max_lr_extensions`` > 0 the next rate beyond it is tried too (that many times at most);
   otherwise the selection records and prints that the choice sits on an edge. The pilot run at that rate *is* the first seed's run — it was trained under exactly
   the rules of step 2, so nothing is trained twice. Test data is never looked at here.
2. **Runs.** Every other seed trains at the chosen rate: warm-up, then a constant rate (a decay
   would flatten the curve by itself); validation every ``eval_every`` steps; stop after
   ``patience`` evaluations without a new best (or at ``max_steps``); the weights of the best
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

import copy
import json
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from asymlora.compare.config import HEAD_ONLY, CompareConfig, StrategySpec
from asymlora.compare.stats import curve_slope
from asymlora.compare.task import HeadFeatures, Task, head_features, prepare_task, reinit_head, set_threads
from asymlora.fileio import atomic_write_text

__all__ = ["run_compare", "train_one", "select_lr", "Phases", "RunResult", "FeatureHead"]


def _log(msg: str) -> None:
    print(msg, flush=True)


class Phases:
    """Wall-clock seconds per phase of the protocol (load, tokenise, features, pilot, train,
    eval, report); ``eval`` is validation and test scoring inside the runs, which ``pilot``
    and ``train`` do not count."""

    NAMES = ("load", "tokenise", "features", "pilot", "train", "eval", "report")

    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k in self.NAMES}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}


class _Timed:
    """Wraps an eval function and adds up the seconds spent in it."""

    def __init__(self, fn: Callable[[Any], dict[str, float]]) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, model: Any) -> dict[str, float]:
        t = time.perf_counter()
        try:
            return self.fn(model)
        finally:
            self.seconds += time.perf_counter() - t


@dataclass
class RunResult:
    """One strategy × seed × learning rate, scored at its best validation step."""

    record: dict[str, Any]
    eval_seconds: float
    model: Any = field(default=None, repr=False)


# ----------------------------------------------------------------------------- one run


class FeatureHead(nn.Module):
    """The head-only model on cached features: ``dropout`` then the base model's head, with
    the same cross-entropy as ``*ForSequenceClassification``."""

    def __init__(self, head: nn.Module, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.head = head

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.head(self.dropout(features))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def _stack_features(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"features": torch.stack([it["features"] for it in items]),
            "labels": torch.as_tensor([it["labels"] for it in items], dtype=torch.long)}


def _feature_metrics(model: Any, data: HeadFeatures, num_labels: int, prefix: str) -> dict[str, float]:
    from asymlora.tasks.text_classification import classification_metrics

    was = model.training
    model.eval()
    with torch.inference_mode():
        pred = model(data.features).logits.argmax(-1).tolist()
    model.train(was)
    return {prefix + k: v for k, v in classification_metrics(data.labels, pred, num_labels).items()}


def _head_dropout(config: Any) -> float:
    p = getattr(config, "classifier_dropout", None)
    if p is None:
        p = getattr(config, "hidden_dropout_prob", 0.0)
    return float(p or 0.0)


def _build(task: Task, spec: StrategySpec, seed: int, cfg: CompareConfig,
           features: dict[str, HeadFeatures] | None) -> tuple[Any, Any, Any, Callable, Callable, int]:
    """The model of one run and how to feed and score it:
    (model, train data, collate, val scorer, test scorer, adapter parameters)."""
    import asymlora
    from asymlora.tasks.text_classification import evaluate_classifier

    k = task.num_labels
    if spec.preset is None and features is not None:
        head = copy.deepcopy(getattr(task.base, task.head))
        shell = SimpleNamespace(config=task.base.config, h=head)
        reinit_head(shell, seed, "h")
        model = FeatureHead(head, _head_dropout(task.base.config))
        return (model, features["train"], _stack_features,
                lambda m: _feature_metrics(m, features["val"], k, "val_"),
                lambda m: _feature_metrics(m, features["test"], k, "test_"), 0)
    model = copy.deepcopy(task.base)
    reinit_head(model, seed, task.head)
    if spec.preset is None:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in getattr(model, task.head).parameters():
            p.requires_grad_(True)
        adapter = 0
    else:
        acfg = asymlora.AsymLoraConfig.preset(spec.preset, r=spec.rank, seed=seed,
                                              target_modules=cfg.targets, modules_to_save=[task.head])
        asymlora.wrap(model, acfg)
        adapter = asymlora.parameter_report(model).adapter_trainable
    return (model, task.train_ds, task.collate,
            lambda m: evaluate_classifier(m, task.val_ds, task.collate, k, prefix="val_"),
            lambda m: evaluate_classifier(m, task.test_ds, task.collate, k, prefix="test_"), adapter)


def train_one(task: Task, spec: StrategySpec, seed: int, lr: float, cfg: CompareConfig, *, desc: str,
              features: dict[str, HeadFeatures] | None = None, output_dir: str | None = None,
              checkpoint_every: int | None = None, resume: bool = False) -> RunResult:
    """One strategy × seed at learning rate ``lr``, by the rules of step 2 of the protocol."""
    from asymlora.train import TrainArgs, fit

    model, train_data, collate, score_val, score_test, adapter_params = _build(task, spec, seed, cfg, features)
    precision = resolve_precision(cfg.mixed_precision)
    if torch.cuda.is_available():  # fit() returns the model on the device it was given
        model.to("cuda")
    timed_val = _Timed(score_val)
    args = TrainArgs(lr=lr, max_steps=cfg.max_steps, batch_size=cfg.batch_size, seed=seed,
                     eval_every=cfg.eval_every, warmup_steps=min(cfg.warmup_steps, cfg.max_steps - 1),
                     lr_schedule="constant", early_stopping_patience=cfg.patience,
                     early_stopping_min_steps=min(cfg.min_steps, cfg.max_steps),
                     early_stopping_metric="val_accuracy", restore_best=True,
                     group_by_length=callable(getattr(train_data, "lengths", None)),
                     weight_decay=cfg.weight_decay, mixed_precision=precision,
                     progress=cfg.progress, desc=desc, output_dir=output_dir,
                     checkpoint_every=checkpoint_every, resume=resume)
    res = fit(model, train_data, collate, args, eval_fn=timed_val)
    t = time.perf_counter()
    with _autocast(precision):  # test is scored at the precision validation was
        test_m = score_test(model)
    eval_s = timed_val.seconds + time.perf_counter() - t
    evals = [(h["step"], h["val_accuracy"]) for h in res.history if "val_accuracy" in h]
    record = {
        "strategy": spec.label, "preset": spec.preset or HEAD_ONLY, "rank": spec.rank, "seed": seed, "lr": lr,
        "trainable_params": res.trainable_params, "adapter_params": adapter_params,
        **test_m,
        "val_accuracy": res.final_metrics.get("val_accuracy"),
        "val_macro_f1": res.final_metrics.get("val_macro_f1"),
        "best_step": res.best_step if res.best_step is not None else res.steps,
        "steps": res.steps, "max_steps": cfg.max_steps,
        "stopped_early": res.stopped_early,
        "val_slope_last_quarter": curve_slope([s for s, _ in evals], [v for _, v in evals]),
        "final_train_loss": res.final_metrics.get("train_loss"),
        "wall_time_s": res.wall_time_s + (time.perf_counter() - t), "eval_time_s": eval_s,
        "peak_memory_bytes": res.peak_memory_bytes, "peak_memory_kind": res.peak_memory_kind,
        "saved_activation_bytes": res.saved_activation_bytes,
        "head_on_cached_features": spec.preset is None and features is not None,
        "history": res.history,
    }
    return RunResult(record, eval_s, model)


def resolve_precision(mode: str) -> str:
    """compare's "auto": bf16 autocast on a GPU that has it (else fp16) and on CPUs with native
    bf16 matrix instructions (``asymlora.train.cpu_has_native_bf16``), else full fp32. The
    trained factors and the optimizer stay fp32 either way."""
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "auto"  # fit() picks bf16 or fp16 on the GPU
    from asymlora.train import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "no"


def _autocast(precision: str) -> Any:
    import contextlib

    if precision == "bf16" and not torch.cuda.is_available():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the protocol


def select_lr(pilots: dict[float, dict[str, Any]]) -> float:
    """The rate whose pilot run reached the best validation accuracy; ties go to the smaller
    rate (the more conservative choice)."""
    if not pilots:
        raise ValueError("no pilot runs to choose a learning rate from")
    return min(pilots, key=lambda lr: (-pilots[lr]["val_accuracy"], lr))


@dataclass(frozen=True)
class Job:
    """One run to do: ``pilot`` runs try a rate of the grid on the first seed."""

    spec: StrategySpec
    seed: int
    lr: float
    pilot: bool


class _InProcess:
    """Runs each job at once in this process; ``submit`` returns a finished future, so the
    scheduler below serves the in-process and the worker-pool cases alike."""

    def __init__(self, task: Task, cfg: CompareConfig, features: dict[str, HeadFeatures] | None) -> None:
        self.task, self.cfg, self.features = task, cfg, features

    def submit(self, job: Job, tag: str) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(_execute(self.task, self.cfg, job, tag, self.features))
        except BaseException as err:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(err)
        return fut


_WORKER: dict[str, Any] = {}


def _worker_init(cfg: CompareConfig) -> None:
    """Each worker process loads the task once and computes with one thread."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _WORKER["task"], _WORKER["cfg"] = prepare_task(cfg), cfg


def _worker_job(job: Job, tag: str) -> tuple[dict[str, Any], float]:
    return _execute(_WORKER["task"], _WORKER["cfg"], job, tag, None)


class _Pool:
    """``workers`` processes with one thread each: on CPUs, two single-thread runs side by side
    do ~1.25x the work of one run on two threads (small matrices, Python overhead)."""

    def __init__(self, cfg: CompareConfig, workers: int) -> None:
        import multiprocessing

        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init, initargs=(replace(cfg, progress=False),))

    def submit(self, job: Job, tag: str) -> Future:
        return self.pool.submit(_worker_job, job, tag)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _execute(task: Task, cfg: CompareConfig, job: Job, tag: str,
             features: dict[str, HeadFeatures] | None) -> tuple[dict[str, Any], float]:
    desc = f"{tag} {job.spec.label} " + (f"lr {job.lr:g}" if job.pilot else f"seed {job.seed}")
    out = train_one(task, job.spec, job.seed, job.lr, cfg, desc=desc, features=features)
    return out.record, out.eval_seconds


def _report_run(tag: str, rec: dict[str, Any], pilot: bool) -> None:
    end = "plateau" if rec["stopped_early"] else "step cap"
    _log(f"{tag} {rec['strategy']:<18} seed {rec['seed']} lr {rec['lr']:<7g} "
         f"val {100 * rec['val_accuracy']:.2f}  test {100 * rec['test_accuracy']:.2f}  best step "
         f"{rec['best_step']}/{rec['steps']} ({end})  {rec['wall_time_s']:.0f} s" + ("  [pilot]" if pilot else ""))


class _Schedule:
    """Pilots of every strategy first; a strategy's other seeds as soon as its pilots are in."""

    def __init__(self, specs: list[StrategySpec], cfg: CompareConfig, phases: Phases) -> None:
        self.cfg, self.phases = cfg, phases
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
        _report_run(tag, rec, pilot=job.pilot and self.cfg.selects_lr)
        if not job.pilot:
            self.runs[(job.spec.label, job.seed)] = dict(rec, role="run")
            return []
        pilots = self.pilots[job.spec.label]
        pilots[job.lr] = rec
        if len(pilots) < len(self.cfg.lr_grid()) + self.extensions.get(job.spec.label, 0):
            return []
        chosen = select_lr(pilots)
        beyond = grid_extension(sorted(pilots), chosen)
        if beyond is not None and self.extensions.get(job.spec.label, 0) < self.cfg.max_lr_extensions:
            # The best rate is at the edge of what was tried: the optimum may lie beyond it.
            self.extensions[job.spec.label] = self.extensions.get(job.spec.label, 0) + 1
            self.total += 1
            return [Job(job.spec, job.seed, beyond, True)]
        self.selections[job.spec.label] = _selection(job.spec, self.cfg, pilots, chosen)
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
               chosen: float) -> dict[str, Any]:
    tried = sorted(pilots)
    edge = None if grid_extension(tried, chosen) is None else ("lower" if chosen == tried[0] else "upper")
    return {
        "strategy": spec.label, "chosen_lr": chosen, "selected_on": f"validation accuracy, seed {cfg.seeds[0]}",
        "at_edge": edge,
        "grid": [{"lr": lr, "val_accuracy": r["val_accuracy"], "best_step": r["best_step"], "steps": r["steps"],
                  "stopped_early": r["stopped_early"],
                  "curve": [(h["step"], h["val_accuracy"]) for h in r["history"] if "val_accuracy" in h]}
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
        "adapted_layers": f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in targets}))} ({len(targets)} layers)",
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
    prev_threads = torch.get_num_threads()
    threads, probe = set_threads(cfg.threads)
    try:
        return _run(cfg, threads, probe, t_start)
    finally:
        torch.set_num_threads(prev_threads)


def _run(cfg: CompareConfig, threads: int, probe: dict[int, float], t_start: float) -> dict[str, Any]:
    from asymlora.compare.report import assemble, write_reports

    specs = cfg.runs()
    phases = Phases()
    task = prepare_task(cfg)
    phases.add("load", task.timings["load"])
    phases.add("tokenise", task.timings["tokenise"])
    workers = _workers(cfg, specs)
    settings = _settings(cfg, task, specs, threads, probe)
    settings["workers"] = workers
    os.makedirs(cfg.output_dir, exist_ok=True)
    features = None
    if any(s.preset is None for s in specs):
        t = time.perf_counter()
        with _autocast(resolve_precision(cfg.mixed_precision)):
            feats = {name: head_features(task.base, task.head, ds, task.collate)
                     for name, ds in (("train", task.train_ds), ("val", task.val_ds), ("test", task.test_ds))}
        features = None if any(f is None for f in feats.values()) else feats
        phases.add("features", time.perf_counter() - t)
    sched = _Schedule(specs, cfg, phases)
    grid = ", ".join(f"{x:g}" for x in cfg.lr_grid())
    _log(f"asymlora compare: {settings['model_name']} ({settings['model_params'] / 1e6:.1f}M params) on "
         f"{task.data.name} ({task.num_labels} classes); train {len(task.train)} / val {len(task.val)} / test "
         f"{len(task.test)}; {len(specs)} strategies, lr {'grid ' if cfg.selects_lr else ''}{grid}, seeds "
         f"{', '.join(map(str, cfg.seeds))}: {sched.total} runs of batch {cfg.batch_size} until validation stops "
         f"improving ({cfg.patience} evaluations × {cfg.eval_every} steps, at most {cfg.max_steps} steps); "
         + (f"{workers} worker processes × 1 thread" if workers > 1 else
            f"{threads} thread{'s' if threads != 1 else ''}"))

    def checkpoint_results() -> None:
        runs, selections = sched.ordered(specs)
        partial = assemble(cfg, settings, specs, runs, selections, phases, time.perf_counter() - t_start,
                           complete=False)
        atomic_write_text(os.path.join(cfg.output_dir, "results.json"), json.dumps(partial, indent=1))

    local = _InProcess(task, cfg, features)
    pool = _Pool(cfg, workers) if workers > 1 else None
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


def _workers(cfg: CompareConfig, specs: list[StrategySpec]) -> int:
    """Worker processes for the adapter runs: ``cfg.workers``, or on a CPU-only machine one
    per available core (at most 2 — beyond that, memory bandwidth, not cores, limits a 22M
    model), one when there is a GPU."""
    if cfg.workers is not None:
        return cfg.workers
    if torch.cuda.is_available() or not any(s.is_adapter for s in specs):
        return 1
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        avail = os.cpu_count() or 1
    return max(1, min(2, avail))
