"""``asymlora compare``: fine-tune one pretrained classifier with every adapter strategy
over several seeds, and report the metric, the trainable budget, time and memory.

Strategies (DESIGN.md §1): ``lora`` (A kaiming, B zero, both trained), ``b-only`` (A random
orthonormal frozen, B zero trained — the paper's recommendation), ``a-only`` (A zero trained,
B random orthonormal frozen), and the head-only baseline (no adapter). A suffix ``@Kr``
multiplies the rank: ``b-only@2r`` trains r·2·Σd_out parameters per adapted layer set, the
same as ``lora`` at r (r·Σ(d_in+d_out)) when d_in = d_out, as for BERT's query/value.
Scaling is alpha/r with alpha = 2r (the paper's choice), so every strategy uses s = 2.

Every run of a seed shares the data order, the classification-head initialisation and the
adapter's frozen factors' seed; runs differ only in the strategy. Reported: mean ± sample
standard deviation (ddof = 1) over seeds of test accuracy and macro-F1.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from asymlora.errors import UserError
from asymlora.fileio import atomic_write_bytes, atomic_write_text
from asymlora.tasks.default import DEFAULT, DEFAULT_STRATEGIES

__all__ = ["CompareConfig", "StrategySpec", "parse_strategy", "run_compare", "write_reports",
           "format_table", "summarize", "ADAPTER_PRESETS"]

ADAPTER_PRESETS = ("lora", "b-only", "a-only")
HEAD_ONLY = "head-only"
_STRATEGY_RE = re.compile(r"^(?P<name>[a-z-]+?)(?:@(?P<mult>\d+)r)?$")


@dataclass(frozen=True)
class StrategySpec:
    """One strategy: ``preset`` is None for head-only; ``rank`` the adapter rank used."""

    label: str
    preset: str | None
    rank: int
    base_rank: int


def parse_strategy(spec: str, r: int) -> StrategySpec:
    """``lora``, ``b-only``, ``a-only``, ``head-only``, optionally with ``@Kr`` (rank K·r)."""
    m = _STRATEGY_RE.match(spec.strip())
    valid = f"{', '.join(ADAPTER_PRESETS + (HEAD_ONLY,))}, optionally suffixed @Kr (e.g. b-only@2r)"
    if not m:
        raise UserError(f"strategy {spec!r} is not valid; use {valid}")
    name, mult = m.group("name"), m.group("mult")
    if name == HEAD_ONLY:
        if mult:
            raise UserError(f"strategy {spec!r}: head-only has no rank; use {valid}")
        return StrategySpec(HEAD_ONLY, None, 0, r)
    if name not in ADAPTER_PRESETS:
        raise UserError(f"strategy {spec!r} is not valid; use {valid}")
    k = int(mult) if mult else 1
    if k < 1:
        raise UserError(f"strategy {spec!r}: the rank multiplier must be >= 1")
    label = f"{name} r={k * r}" + (f" (@{k}r)" if k > 1 else "")
    return StrategySpec(label, name, k * r, r)


@dataclass
class CompareConfig:
    """Everything a compare run needs; defaults are the embedded default experiment."""

    model: str | None = None                 # None = bundled all-MiniLM-L6-v2
    data: str = "fortunes"
    text_column: str = "text"
    label_column: str = "label"
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    ranks: list[int] = field(default_factory=lambda: [DEFAULT.r])
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT.seeds))
    steps: int = DEFAULT.steps
    lr: float = DEFAULT.lr
    batch_size: int = DEFAULT.batch_size
    max_length: int = DEFAULT.max_length
    eval_every: int | None = DEFAULT.eval_every
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_train: int | None = DEFAULT.max_train
    max_val: int | None = DEFAULT.max_val
    max_test: int | None = DEFAULT.max_test
    split_seed: int = 0
    output_dir: str = "asymlora-compare"
    threads: int | None = None
    mixed_precision: str = "auto"
    target_modules: list[str] | None = None
    quick: bool = False
    progress: bool = True
    plots: bool = True

    def validate(self) -> None:
        """Check every setting before any work; one UserError lists all the bad ones."""
        bad: list[str] = []
        if not self.strategies:
            bad.append("strategies is empty: give at least one of lora, b-only, a-only, head-only")
        for s in self.strategies:
            try:
                parse_strategy(s, 1)
            except UserError as err:
                bad.append(str(err))
        if not self.ranks or any((not isinstance(r, int)) or r < 1 for r in self.ranks):
            bad.append(f"ranks={self.ranks!r}: need one or more integers >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            bad.append(f"seeds={self.seeds!r}: need one or more distinct integers")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                bad.append(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.max_length < 8:
            bad.append(f"max_length={self.max_length!r}: must be >= 8 tokens")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad.append(f"lr={self.lr!r}: must be a finite number > 0")
        for name in ("max_train", "max_val", "max_test"):
            v = getattr(self, name)
            if v is not None and v < 2:
                bad.append(f"{name}={v!r}: must be None (all) or >= 2")
        if self.eval_every is not None and self.eval_every < 1:
            bad.append(f"eval_every={self.eval_every!r}: must be None or >= 1")
        if self.threads is not None and self.threads < 1:
            bad.append(f"threads={self.threads!r}: must be >= 1")
        if self.model is not None and not os.path.isfile(os.path.join(self.model, "config.json")):
            bad.append(f"--model {self.model!r} is not a folder with a transformers model (config.json)")
        if self.data not in ("fortunes", "tweets") and not os.path.exists(self.data):
            bad.append(f"--data {self.data!r} is neither a named dataset (fortunes, tweets) nor an existing path")
        if self.mixed_precision == "fp16" and not _cuda_available():
            bad.append("--mixed-precision fp16 needs a CUDA GPU; on CPU use bf16, no or auto")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            bad.append(f"--output-dir {self.output_dir!r} exists and is not a folder")
        if bad:
            raise UserError("; ".join(bad))

    def runs(self) -> list[StrategySpec]:
        """The distinct strategies to run (head-only once, adapters once per rank)."""
        out: list[StrategySpec] = []
        seen: set[tuple[str | None, int]] = set()
        for r in self.ranks:
            for s in self.strategies:
                spec = parse_strategy(s, r)
                key = (spec.preset, spec.rank)
                if key not in seen:
                    seen.add(key)
                    out.append(spec)
        return out


# ----------------------------------------------------------------------------- atomic IO


_atomic_write_bytes = atomic_write_bytes
_atomic_write_text = atomic_write_text


# ----------------------------------------------------------------------------- statistics


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(runs: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Per strategy label: mean and std over seeds of the run metrics."""
    rows = []
    for label in order:
        rs = [r for r in runs if r["strategy"] == label]
        if not rs:
            continue
        row: dict[str, Any] = {"strategy": label, "preset": rs[0]["preset"], "rank": rs[0]["rank"],
                               "seeds": [r["seed"] for r in rs], "n": len(rs),
                               "trainable_params": rs[0]["trainable_params"],
                               "adapter_params": rs[0]["adapter_params"]}
        for key in ("test_accuracy", "test_macro_f1", "val_accuracy", "val_macro_f1",
                    "wall_time_s", "peak_memory_bytes", "saved_activation_bytes", "final_train_loss"):
            m, s = _mean_std([r[key] for r in rs if r.get(key) is not None])
            row[key + "_mean"], row[key + "_std"] = m, s
        rows.append(row)
    return rows


def _mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def format_table(summary: list[dict[str, Any]], markdown: bool = False) -> str:
    """Results table: mean ± std over seeds."""
    head = ["strategy", "trainable", "test acc", "test macro-F1", "val acc", "time/run (s)", "peak RSS (MiB)",
            "saved activations (MiB)"]
    body = []
    for r in summary:
        body.append([
            r["strategy"],
            f"{r['trainable_params']:,}",
            f"{100 * r['test_accuracy_mean']:.2f} ± {100 * r['test_accuracy_std']:.2f}",
            f"{100 * r['test_macro_f1_mean']:.2f} ± {100 * r['test_macro_f1_std']:.2f}",
            f"{100 * r['val_accuracy_mean']:.2f} ± {100 * r['val_accuracy_std']:.2f}",
            f"{r['wall_time_s_mean']:.1f} ± {r['wall_time_s_std']:.1f}",
            f"{_mib(r['peak_memory_bytes_mean'])}",
            f"{r.get('saved_activation_bytes_mean', float('nan')) / 2**20:,.1f}",
        ])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep] + [fmt(row) for row in body])


# ----------------------------------------------------------------------------- running


def _probe_threads(candidates: list[int]) -> tuple[int, dict[int, float]]:
    """Time a transformer-sized matmul at each thread count and keep the fastest.

    On a busy machine, OpenMP threads that wait for a core can make 2 threads 10-20x slower
    than 1 (measured here: 22 ms vs 1.1 ms for 256x384 @ 384x384 at load 6 on 2 cores)."""
    import torch

    x, w = torch.randn(512, 384), torch.randn(1536, 384)
    times: dict[int, float] = {}
    for n in candidates:
        torch.set_num_threads(n)
        torch.nn.functional.linear(x, w)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(4):
                torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t)
        times[n] = best
    return min(times, key=times.get), times


def _set_threads(threads: int | None) -> tuple[int, dict[int, float]]:
    """``threads`` or, when None, the faster of all available CPUs and 1 (see ``_probe_threads``)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        return threads, {}
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        avail = os.cpu_count() or 1
    if avail == 1:
        torch.set_num_threads(1)
        return 1, {}
    n, times = _probe_threads([avail, 1])
    torch.set_num_threads(n)
    return n, times


def _reinit_head(model: Any, seed: int, head: str = "classifier") -> None:
    """Draw the new classification head from a generator seeded with ``seed`` (BERT's own
    init: weights N(0, initializer_range²), bias 0), so every strategy of a seed starts from
    the same head."""
    import torch

    std = float(getattr(model.config, "initializer_range", 0.02))
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for mod in getattr(model, head).modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if mod.bias is not None:
                    mod.bias.zero_()


def _head_name(model: Any) -> str:
    for name in ("classifier", "score", "classification_head"):
        if hasattr(model, name):
            return name
    raise UserError(f"{type(model).__name__} has no classifier/score head; cannot run a classification compare")


def _log(msg: str) -> None:
    print(msg, flush=True)


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every strategy × seed and write the reports; returns the results dict."""
    cfg.validate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    t_start = time.perf_counter()
    specs = cfg.runs()
    prev_threads = torch.get_num_threads()
    threads, thread_probe = _set_threads(cfg.threads)
    try:
        return _run(cfg, specs, threads, thread_probe, t_start)
    finally:
        torch.set_num_threads(prev_threads)


@dataclass
class Task:
    """Everything shared by the runs of one compare: data, tokenized splits, base model."""

    model_path: str
    data: Any
    train: Any
    val: Any
    test: Any
    train_ds: Any
    val_ds: Any
    test_ds: Any
    collate: Any
    base: Any
    head: str

    @property
    def num_labels(self) -> int:
        return self.data.num_labels


def prepare_task(cfg: CompareConfig) -> Task:
    """Load the dataset (seeded split, capped subsets), tokenize once, load the base model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from asymlora.tasks.default import default_model_path
    from asymlora.tasks.text_classification import (
        PadCollator, TokenizedDataset, load_text_dataset, subsample_stratified)

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_path = cfg.model or default_model_path()
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise UserError(f"--model {model_path!r} is not a folder with a transformers model (config.json)")
    data = load_text_dataset(cfg.data, cfg.split_seed, text_column=cfg.text_column, label_column=cfg.label_column)
    train = subsample_stratified(data.train, cfg.max_train, cfg.split_seed)
    val = subsample_stratified(data.val, cfg.max_val, cfg.split_seed)
    test = subsample_stratified(data.test, cfg.max_test, cfg.split_seed)
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise UserError(f"dataset {cfg.data!r} is too small: an empty train, validation or test split")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=data.num_labels, id2label=dict(enumerate(data.label_names)),
        label2id={n: i for i, n in enumerate(data.label_names)})
    if cfg.target_modules is not None:
        from asymlora import find_target_modules

        try:  # the user's --target-modules must name layers of this model
            find_target_modules(base, cfg.target_modules, exclude=[_head_name(base)])
        except ValueError as err:
            raise UserError(f"--target-modules {','.join(cfg.target_modules)}: {err}") from err
    return Task(model_path=model_path, data=data, train=train, val=val, test=test,
                train_ds=TokenizedDataset(train, tokenizer, cfg.max_length),
                val_ds=TokenizedDataset(val, tokenizer, cfg.max_length),
                test_ds=TokenizedDataset(test, tokenizer, cfg.max_length),
                collate=PadCollator(tokenizer.pad_token_id or 0), base=base, head=_head_name(base))


def _run(cfg: CompareConfig, specs: list[StrategySpec], threads: int, thread_probe: dict[int, float],
         t_start: float) -> dict[str, Any]:
    import torch
    import transformers

    import asymlora

    task = prepare_task(cfg)
    data, train, val, test = task.data, task.train, task.val, task.test
    train_ds, val_ds, test_ds, collate = task.train_ds, task.val_ds, task.test_ds, task.collate
    base, head, k, model_path = task.base, task.head, task.num_labels, task.model_path
    base_params = sum(p.numel() for p in base.parameters())
    model_name = "all-MiniLM-L6-v2" if cfg.model is None else os.path.basename(os.path.normpath(model_path))
    targets = asymlora.find_target_modules(base, cfg.target_modules, exclude=[head])
    target_desc = f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in targets}))} ({len(targets)} layer{'' if len(targets) == 1 else 's'})"

    os.makedirs(cfg.output_dir, exist_ok=True)
    settings = {
        "model": os.path.abspath(model_path), "model_name": model_name, "model_type": base.config.model_type, "model_params": base_params,
        "data": cfg.data, "dataset": data.summary(),
        "used_sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "majority_class_test_accuracy": max(test.class_counts(k)) / len(test),
        "strategies": [s.label for s in specs], "ranks": cfg.ranks, "seeds": cfg.seeds,
        "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "max_length": cfg.max_length,
        "eval_every": cfg.eval_every, "warmup_ratio": cfg.warmup_ratio, "weight_decay": cfg.weight_decay,
        "alpha": "2r (scaling alpha/r = 2)", "target_modules": cfg.target_modules or "architecture default",
        "adapted_layers": target_desc,
        "head": head, "quick": cfg.quick, "threads": threads,
        "thread_probe_s": {str(k): round(v, 5) for k, v in thread_probe.items()}, "mixed_precision": cfg.mixed_precision,
        "examples_seen_per_run": cfg.steps * cfg.batch_size,
        "peak_memory": ("CUDA max_memory_allocated" if torch.cuda.is_available() else
                        "CPU peak resident set size of the process during the run (Linux VmHWM reset per run)"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "asymlora": asymlora.__version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
    }
    _log(f"asymlora compare: {model_name} ({base_params / 1e6:.1f}M params) on "
         f"{data.name} ({k} classes: {', '.join(data.label_names)}); train {len(train)} / val {len(val)} / "
         f"test {len(test)}; {len(specs)} strateg{'y' if len(specs) == 1 else 'ies'} × {len(cfg.seeds)} seed{'' if len(cfg.seeds) == 1 else 's'}, {cfg.steps} step{'' if cfg.steps == 1 else 's'} × batch "
         f"{cfg.batch_size}, max {cfg.max_length} tokens, lr {cfg.lr:g}, {threads} thread{'' if threads == 1 else 's'}")

    runs: list[dict[str, Any]] = []
    total_runs = len(specs) * len(cfg.seeds)
    i = 0
    for seed in cfg.seeds:
        for spec in specs:
            i += 1
            run, model = train_one(base, head, spec, seed, cfg, train_ds, val_ds, test_ds, collate, k,
                                   desc=f"[{i}/{total_runs}] {spec.label} seed {seed}")
            res_t, res_mem, test_m = run["wall_time_s"], run["peak_memory_bytes"], run
            runs.append(run)
            _log(f"[{i}/{total_runs}] {spec.label:<22} seed {seed}: test acc {100 * test_m['test_accuracy']:.2f}  "
                 f"macro-F1 {100 * test_m['test_macro_f1']:.2f}  trainable {run['trainable_params']:,}  "
                 f"{res_t:.1f} s  peak {_mib(res_mem)} MiB")
            del model
            partial = _results(cfg, settings, specs, runs, time.perf_counter() - t_start, complete=False)
            _atomic_write_text(os.path.join(cfg.output_dir, "results.json"), json.dumps(partial, indent=1))

    results = _results(cfg, settings, specs, runs, time.perf_counter() - t_start, complete=True)
    write_reports(results, cfg.output_dir, plots=cfg.plots)
    results["total_time_s"] = time.perf_counter() - t_start
    _atomic_write_text(os.path.join(cfg.output_dir, "results.json"), json.dumps(results, indent=1))
    return results


def train_one(base: Any, head: str, spec: StrategySpec, seed: int, cfg: CompareConfig, train_ds: Any,
              val_ds: Any, test_ds: Any, collate: Any, num_labels: int, desc: str,
              output_dir: str | None = None, checkpoint_every: int | None = None,
              resume: bool = False) -> tuple[dict[str, Any], Any]:
    """One strategy × seed: copy the base model, draw the head from ``seed``, wrap (or
    freeze all but the head), train with ``asymlora.train.fit``, score the test split."""
    import asymlora
    from asymlora.tasks.text_classification import evaluate_classifier
    from asymlora.train import TrainArgs, fit

    model = copy.deepcopy(base)
    _reinit_head(model, seed, head)
    if spec.preset is None:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in getattr(model, head).parameters():
            p.requires_grad_(True)
    else:
        acfg = asymlora.AsymLoraConfig.preset(
            spec.preset, r=spec.rank, seed=seed, target_modules=cfg.target_modules, modules_to_save=[head])
        asymlora.wrap(model, acfg)
    rep = asymlora.parameter_report(model)
    import torch

    if torch.cuda.is_available():  # fit() returns the model on the device it was given
        model.to("cuda")
    args = TrainArgs(lr=cfg.lr, max_steps=cfg.steps, batch_size=cfg.batch_size, seed=seed,
                     eval_every=cfg.eval_every, warmup_ratio=cfg.warmup_ratio,
                     weight_decay=cfg.weight_decay, mixed_precision=cfg.mixed_precision,
                     progress=cfg.progress, desc=desc, output_dir=output_dir,
                     checkpoint_every=checkpoint_every, resume=resume)
    res = fit(model, train_ds, collate, args,
              eval_fn=lambda m: evaluate_classifier(m, val_ds, collate, num_labels, prefix="val_"))
    test_m = evaluate_classifier(model, test_ds, collate, num_labels, prefix="test_")
    run = {
        "strategy": spec.label, "preset": spec.preset or HEAD_ONLY, "rank": spec.rank, "seed": seed,
        "trainable_params": res.trainable_params, "adapter_params": rep.adapter_trainable,
        **test_m,
        "val_accuracy": res.final_metrics.get("val_accuracy"),
        "val_macro_f1": res.final_metrics.get("val_macro_f1"),
        "final_train_loss": res.final_metrics.get("train_loss"),
        "wall_time_s": res.wall_time_s, "peak_memory_bytes": res.peak_memory_bytes,
        "peak_memory_kind": res.peak_memory_kind, "saved_activation_bytes": res.saved_activation_bytes,
        "steps": res.steps,
        "history": res.history,
    }
    return run, model


def _results(cfg: CompareConfig, settings: dict, specs: list[StrategySpec], runs: list[dict],
             elapsed: float, complete: bool) -> dict[str, Any]:
    return {"complete": complete, "settings": settings, "total_time_s": elapsed,
            "summary": summarize(runs, [s.label for s in specs]), "runs": runs}


# ----------------------------------------------------------------------------- reports


def write_reports(results: dict[str, Any], out_dir: str, plots: bool = True) -> list[str]:
    """results.json, results.csv (one row per run), results.md and the PNG plots."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, "results.json")
    _atomic_write_text(path, json.dumps(results, indent=1))
    written.append(path)

    cols = ["strategy", "preset", "rank", "seed", "trainable_params", "adapter_params", "test_accuracy",
            "test_macro_f1", "val_accuracy", "val_macro_f1", "final_train_loss", "wall_time_s",
            "peak_memory_bytes", "saved_activation_bytes", "steps"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in results["runs"]:
        w.writerow([r.get(c) for c in cols])
    path = os.path.join(out_dir, "results.csv")
    _atomic_write_text(path, buf.getvalue())
    written.append(path)

    s = results["settings"]
    md = [
        "# asymlora compare", "",
        f"Model `{s.get('model_name', os.path.basename(s['model']))}` ({s['model_params'] / 1e6:.1f}M parameters, "
        f"{s['model_type']}), data `{s['data']}` ({len(s['dataset']['label_names'])} classes: "
        f"{', '.join(s['dataset']['label_names'])}); train {s['used_sizes']['train']}, "
        f"val {s['used_sizes']['val']}, test {s['used_sizes']['test']}.",
        f"{s['steps']} step{'' if s['steps'] == 1 else 's'} × batch {s['batch_size']} ({s['examples_seen_per_run']} examples seen), lr {s['lr']:g}, "
        f"max {s['max_length']} tokens, alpha = 2r, adapters on {s.get('adapted_layers', s['target_modules'])}, head `{s['head']}` trained "
        f"in every run; seeds {s['seeds']}; {s['threads']} thread(s) on {s['machine']['device']}.",
        "",
        f"Mean ± sample std over seeds; majority-class test accuracy "
        f"{100 * s.get('majority_class_test_accuracy', float('nan')):.2f}%. Peak RSS: {s['peak_memory']}. "
        "Saved activations: the largest total size of the tensors autograd kept for backward in one "
        "step (parameters and buffers excluded).", "",
        format_table(results["summary"], markdown=True), "",
        f"Total time {results['total_time_s']:.0f} s.", "",
    ]
    path = os.path.join(out_dir, "results.md")
    _atomic_write_text(path, "\n".join(md))
    written.append(path)
    if plots:
        written += _plots(results, out_dir)
    return written


def _save_fig(fig: Any, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _atomic_write_bytes(path, buf.getvalue())


def _plots(results: dict[str, Any], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    out = []
    labels = [r["strategy"] for r in summary]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(labels)), 4))
    wd = 0.38
    for j, (key, name) in enumerate((("test_accuracy", "accuracy"), ("test_macro_f1", "macro-F1"))):
        means = [100 * r[key + "_mean"] for r in summary]
        stds = [100 * r[key + "_std"] for r in summary]
        ax.bar(x + (j - 0.5) * wd, means, wd, yerr=stds, capsize=4, label=name)
        for run in results["runs"]:  # individual seeds as dots
            k = labels.index(run["strategy"])
            ax.plot(k + (j - 0.5) * wd, 100 * run[key], "k.", ms=4, alpha=0.6)
    ax.set_xticks(x, [f"{lab}\n{r['trainable_params']:,} params" for lab, r in zip(labels, summary)], fontsize=8)
    ax.set_ylabel("test metric (%)")
    lo = min(100 * r["test_macro_f1_mean"] - 100 * r["test_macro_f1_std"] for r in summary)
    ax.set_ylim(max(0, lo - 10), 112)
    maj = results["settings"].get("majority_class_test_accuracy")
    if maj is not None:
        ax.axhline(100 * maj, color="gray", ls="--", lw=1, label="majority class")
    ax.set_title(f"{results['settings']['data']}: mean ± std over seeds {results['settings']['seeds']}")
    ax.legend(loc="upper right", ncol=3, fontsize=8)
    path = os.path.join(out_dir, "metric_by_strategy.png")
    _save_fig(fig, path)
    plt.close(fig)
    out.append(path)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, lab in enumerate(labels):
        rs = [r for r in results["runs"] if r["strategy"] == lab]
        col = colors[c % len(colors)]
        steps = [h["step"] for h in rs[0]["history"]]
        losses = np.array([[h["loss"] for h in r["history"]] for r in rs])
        m = losses.mean(0)
        win = max(1, len(m) // 20)
        sm = np.convolve(m, np.ones(win) / win, mode="valid")
        a1.plot(steps[win - 1:], sm, color=col, label=lab)
        ev = [(h["step"], h["val_accuracy"]) for h in rs[0]["history"] if "val_accuracy" in h]
        if ev:
            es = [e[0] for e in ev]
            vals = np.array([[h["val_accuracy"] for h in r["history"] if "val_accuracy" in h] for r in rs]) * 100
            a2.errorbar(es, vals.mean(0), yerr=vals.std(0, ddof=1) if len(rs) > 1 else None,
                        color=col, marker="o", capsize=3, label=lab)
    a1.set_xlabel("step"), a1.set_ylabel("training loss (mean over seeds, smoothed)")
    a2.set_xlabel("step"), a2.set_ylabel("validation accuracy (%)")
    a1.legend(fontsize=8), a2.legend(fontsize=8)
    a1.set_title("training loss"), a2.set_title("validation accuracy")
    path = os.path.join(out_dir, "training_curves.png")
    _save_fig(fig, path)
    plt.close(fig)
    out.append(path)
    return out
