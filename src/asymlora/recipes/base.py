"""Recipes: one YAML file per table of the paper, and the runner that executes one.

A recipe names the model, the tasks (table columns), the adapter strategies and
ranks (table rows), the seeds and the training settings. Every run
(task × strategy × rank × seed) builds a fresh model, wraps it with the
asymmetric adapter (``alpha = 2r`` as in the paper), trains it with
:func:`asymlora.training.loop.fit`, evaluates the paper's metric and writes
``<out>/<task>/<strategy>-r<r>/seed<seed>/result.json`` (atomically).
``asymlora results`` turns a tree of those files into the paper's table.

Schema (keys not listed are rejected)::

    name: glue-roberta-large          # defaults to the file name
    family: glue                      # glue | summarization | instruct | domainbed
    table: "Table 2 ..."              # free text, the table this reproduces
    model: roberta-large              # hub id or local dir (overridden by --model)
    model_hint: "..."                 # how to get the weights (printed when missing)
    data: null                        # local path (overridden by --data)
    data_hint: "..."                  # how to get the data (printed when missing)
    tasks: [mnli, sst2, ...]
    strategies: [b-only, a-only, lora, {name: a-kaiming, preset: a-only, init_B: kaiming}]
    ranks: [8, 16]
    alpha: 2r                         # "<k>r" (alpha = k·r) or a number
    target_modules: [query, value]
    modules_to_save: [classifier]
    seeds: [0, 1, 2]
    dtype: float32                    # float32 | bfloat16 | float16 (model weights)
    quantize: nf4                     # optional: none | nf4 | fp4 | int8 | torchao-int8 (asymlora.core.quant):
                                      # the frozen base's linear layers, not modules_to_save (--quantize)
    train: {lr: 4e-4, epochs: 20, batch_size: 16, ...}   # TrainArgs fields
    data_args: {max_length: 128, ...} # family-specific preprocessing
    eval_args: {...}                  # family-specific evaluation
    task_overrides: {rte: {train: {...}, data_args: {...}, eval_args: {...}}}
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asymlora.errors import MissingFileError, UserError

FAMILIES: dict[str, str] = {
    "glue": "asymlora.recipes.glue",
    "summarization": "asymlora.recipes.summarization",
    "instruct": "asymlora.recipes.instruct",
    "domainbed": "asymlora.recipes.domainbed",
}

# TrainArgs fields a recipe may set (the engine contract); output_dir/seed/max_steps are set by the runner.
TRAIN_KEYS = {
    "lr", "weight_decay", "epochs", "batch_size", "grad_accum", "warmup_ratio", "max_grad_norm",
    "eval_every", "checkpoint_every", "mixed_precision", "early_stopping_patience",
    "early_stopping_metric", "greater_is_better", "progress", "max_steps",
}
STRATEGY_KEYS = {"name", "preset", "ranks", "r", "alpha", "scaling", "dropout", "trainable", "init_A", "init_B",
                 "target_modules", "rank_pattern", "alpha_pattern"}
RECIPE_KEYS = {
    "name", "family", "table", "model", "model_hint", "data", "data_hint", "tasks", "strategies", "ranks",
    "alpha", "target_modules", "modules_to_save", "seeds", "dtype", "train", "data_args", "eval_args",
    "task_overrides", "notes", "quantize",
}
DTYPES = ("float32", "bfloat16", "float16")
_ALPHA_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*r\s*$")


@dataclass
class Strategy:
    """A table row family: a core preset plus config overrides (e.g. a kaiming frozen factor)."""

    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    ranks: list[int] | None = None


@dataclass
class Recipe:
    name: str
    family: str
    model: str
    tasks: list[str]
    strategies: list[Strategy]
    ranks: list[int]
    seeds: list[int]
    alpha: str | float = "2r"
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    dtype: str = "float32"
    quantize: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    data_args: dict[str, Any] = field(default_factory=dict)
    eval_args: dict[str, Any] = field(default_factory=dict)
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    table: str = ""
    model_hint: str = ""
    data: str | None = None
    data_hint: str = ""
    notes: str = ""
    path: str | None = None

    def alpha_for(self, r: int, strategy: Strategy | None = None) -> float:
        """alpha for rank r: "<k>r" → k·r (the paper uses alpha = 2r), or a fixed number."""
        spec = strategy.overrides.get("alpha", self.alpha) if strategy else self.alpha
        return alpha_value(spec, r)

    def for_task(self, task: str) -> Recipe:
        """A copy with the task's overrides applied to train/data_args/eval_args."""
        out = copy.deepcopy(self)
        for section, values in self.task_overrides.get(task, {}).items():
            getattr(out, section).update(values)
        return out

    def family_module(self):
        return importlib.import_module(FAMILIES[self.family])


def alpha_value(spec: str | float | int, r: int) -> float:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return float(spec)
    m = _ALPHA_RE.match(str(spec))
    if not m:
        raise UserError(f"alpha must be a number or '<k>r' (e.g. '2r'), got {spec!r}")
    return float(m.group(1)) * r


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _int_list(name: str, value: Any, minimum: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    _require(isinstance(value, list) and len(value) > 0,
             f"recipe field {name!r} must be a non-empty list of integers, got {value!r}")
    for v in value:
        _require(isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                 f"recipe field {name!r}: {v!r} is not an integer >= {minimum}")
    return list(value)


def _parse_strategy(item: Any) -> Strategy:
    if isinstance(item, str):
        return Strategy(name=item, preset=item)
    _require(isinstance(item, dict), f"a strategy must be a preset name or a mapping, got {item!r}")
    unknown = set(item) - STRATEGY_KEYS
    _require(not unknown, f"unknown strategy keys {sorted(unknown)}; valid: {sorted(STRATEGY_KEYS)}")
    _require("preset" in item or "name" in item, f"strategy {item!r} needs 'preset' (or a 'name' that is a preset)")
    preset = item.get("preset", item.get("name"))
    name = item.get("name", preset)
    ranks = _int_list(f"strategies[{name}].ranks", item["ranks"], 1) if "ranks" in item else None
    overrides = {k: v for k, v in item.items() if k not in ("name", "preset", "ranks")}
    return Strategy(name=str(name), preset=str(preset), overrides=overrides, ranks=ranks)


def adapter_config(recipe: Recipe, strategy: Strategy, r: int, seed: int):
    """The core AsymLoraConfig of one run (validated by the core)."""
    from asymlora.core.config import AsymLoraConfig

    kwargs: dict[str, Any] = {k: v for k, v in strategy.overrides.items() if k not in ("alpha", "r")}
    kwargs.setdefault("target_modules", recipe.target_modules)
    cfg = AsymLoraConfig.preset(
        strategy.preset, r=r, alpha=recipe.alpha_for(r, strategy), seed=seed,
        modules_to_save=list(recipe.modules_to_save), **kwargs,
    )
    return cfg


def validate(recipe: Recipe) -> Recipe:
    """Check every field (names, types, known strategies/tasks); raise UserError naming the bad value."""
    _require(recipe.family in FAMILIES, f"unknown family {recipe.family!r}; valid: {', '.join(FAMILIES)}")
    fam = recipe.family_module()
    _require(isinstance(recipe.model, str) and recipe.model != "", "recipe field 'model' must be a model id or path")
    _require(isinstance(recipe.tasks, list) and len(recipe.tasks) > 0, "recipe field 'tasks' must be a non-empty list")
    for t in recipe.tasks:
        _require(t in fam.TASKS, f"unknown {recipe.family} task {t!r}; valid: {', '.join(fam.TASKS)}")
    for t in recipe.task_overrides:
        _require(t in recipe.tasks, f"task_overrides names {t!r}, which is not in tasks {recipe.tasks}")
        bad = set(recipe.task_overrides[t]) - {"train", "data_args", "eval_args"}
        _require(not bad, f"task_overrides[{t}] may only hold train/data_args/eval_args, got {sorted(bad)}")
    _require(recipe.dtype in DTYPES, f"dtype {recipe.dtype!r} is not one of {DTYPES}")
    from asymlora.core.quant import check_scheme

    check_scheme(recipe.quantize, "recipe field 'quantize':")
    for section in [recipe.train] + [o.get("train", {}) for o in recipe.task_overrides.values()]:
        bad = set(section) - TRAIN_KEYS
        _require(not bad, f"unknown train settings {sorted(bad)}; valid: {sorted(TRAIN_KEYS)}")
    for key in ("data_args", "eval_args"):
        allowed = getattr(fam, key.upper())
        for section in [getattr(recipe, key)] + [o.get(key, {}) for o in recipe.task_overrides.values()]:
            bad = set(section) - set(allowed)
            _require(not bad, f"unknown {key} {sorted(bad)} for family {recipe.family}; valid: {sorted(allowed)}")
    names = [s.name for s in recipe.strategies]
    _require(len(set(names)) == len(names), f"duplicate strategy names in {names}")
    for s in recipe.strategies:
        for r in (s.ranks or recipe.ranks):
            try:
                adapter_config(recipe, s, r, recipe.seeds[0])
            except (ValueError, TypeError) as err:
                raise UserError(f"strategy {s.name!r} at r={r}: {err}") from err
    return recipe


def recipe_from_dict(data: Mapping[str, Any], name: str | None = None, path: str | None = None) -> Recipe:
    _require(isinstance(data, Mapping), f"a recipe must be a mapping, got {type(data).__name__}")
    unknown = set(data) - RECIPE_KEYS
    _require(not unknown, f"unknown recipe keys {sorted(unknown)}; valid: {sorted(RECIPE_KEYS)}")
    for req in ("family", "model", "tasks", "strategies", "ranks", "seeds"):
        _require(req in data, f"recipe is missing required field {req!r}")
    strategies = data["strategies"]
    _require(isinstance(strategies, list) and len(strategies) > 0,
             "recipe field 'strategies' must be a non-empty list")
    tasks = data["tasks"]
    if isinstance(tasks, str):
        tasks = [tasks]
    recipe = Recipe(
        name=str(data.get("name") or name or "recipe"),
        family=str(data["family"]),
        model=str(data["model"]),
        tasks=list(tasks),
        strategies=[_parse_strategy(s) for s in strategies],
        ranks=_int_list("ranks", data["ranks"], 1),
        seeds=_int_list("seeds", data["seeds"], 0),
        alpha=data.get("alpha", "2r"),
        target_modules=data.get("target_modules"),
        modules_to_save=list(data.get("modules_to_save") or []),
        dtype=str(data.get("dtype", "float32")),
        quantize=data.get("quantize"),
        train=_coerce_train(data.get("train") or {}, "train"),
        data_args=dict(data.get("data_args") or {}),
        eval_args=dict(data.get("eval_args") or {}),
        task_overrides={k: ({**v, "train": _coerce_train(v["train"], f"task_overrides.{k}.train")}
                            if isinstance(v, dict) and "train" in v else dict(v or {}))
                        for k, v in (data.get("task_overrides") or {}).items()},
        table=str(data.get("table", "")),
        model_hint=str(data.get("model_hint", "")),
        data=data.get("data"),
        data_hint=str(data.get("data_hint", "")),
        notes=str(data.get("notes", "")),
        path=path,
    )
    alpha_value(recipe.alpha, 1)
    return validate(recipe)


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: ./recipes, then the recipes shipped in the package
    (``asymlora/recipes``; the repository's top-level ``recipes`` links there)."""
    return [Path.cwd() / "recipes", Path(__file__).resolve().parent]


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    for d in recipe_dirs():
        for cand in (d / f"{stem}.yaml", d / f"{stem}.yml"):
            if cand.is_file():
                return cand
    known = sorted({c.stem for d in recipe_dirs() if d.is_dir() for c in d.glob("*.y*ml")})
    raise MissingFileError(f"no recipe {name_or_path!r}: not a file, and not one of the known recipes {known}")


def apply_sets(data: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """Apply ``KEY.SUB=VALUE`` overrides (VALUE parsed as YAML) to a raw recipe mapping."""
    import yaml

    data = copy.deepcopy(data)
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE (e.g. eval_args.num_beams=2), got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"--set: empty key in {item!r}")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {p!r} is not a mapping in the recipe")
        value = yaml.safe_load(raw)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node[parts[-1]] = value
    return data


_FLOAT_TRAIN = ("lr", "weight_decay", "epochs", "warmup_ratio", "max_grad_norm")


def _coerce_train(section: dict[str, Any], where: str) -> dict[str, Any]:
    """Numbers written as '4e-4' (a string to YAML 1.1) become floats; other non-numbers are rejected."""
    out = dict(section)
    for k in _FLOAT_TRAIN:
        v = out.get(k)
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise UserError(f"{where}.{k} must be a number, got {v!r}") from None
        if not isinstance(v, (int, float)):
            raise UserError(f"{where}.{k} must be a number, got {v!r}")
        out[k] = v
    return out


def load_recipe(name_or_path: str | os.PathLike, sets: Sequence[str] = ()) -> Recipe:
    """Load and validate a recipe from a YAML path or a name in recipes/ (``sets``: KEY=VALUE overrides)."""
    import yaml

    path = find_recipe(str(name_or_path))
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"recipe {str(path)!r} is not valid YAML: {err}") from err
    if sets:
        data = apply_sets(data, sets)
    return recipe_from_dict(data, name=path.stem, path=str(path))


# --------------------------------------------------------------------------- family interface

@dataclass
class Prepared:
    """What a family's ``prepare`` returns for one task (data and tokenizer loaded once)."""

    train_dataset: Sequence[Any]
    collate_fn: Callable[[list[Any]], dict]
    build_model: Callable[[], Any]
    evaluate: Callable[[Any], dict[str, float]]
    loss_fn: Callable | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunOptions:
    model: str | None = None
    data: str | None = None
    out: str | None = None
    seeds: list[int] | None = None
    tasks: list[str] | None = None
    strategies: list[str] | None = None
    ranks: list[int] | None = None
    max_steps: int | None = None
    epochs: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    dtype: str | None = None
    quantize: str | None = None  # overrides the recipe's quantize ("none" turns it off)
    mixed_precision: str | None = None
    save_adapter: bool = True
    force: bool = False
    device: str | None = None
    progress: bool = True


def model_ready(model: str) -> bool:
    """True if `model` is a local dir with config.json, or a hub id already in the local cache."""
    p = Path(model)
    if p.is_dir():
        return (p / "config.json").is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model, "config.json")
        return isinstance(hit, str)
    except Exception:  # noqa: BLE001 - invalid repo id etc.
        return False


def check_model(model: str, recipe: Recipe) -> None:
    if model_ready(model):
        return
    hint = recipe.model_hint or (
        f"on a machine with internet: `hf download {recipe.model} --local-dir models/{recipe.model.split('/')[-1]}`")
    raise MissingFileError(
        f"model {model!r} not found: no local directory with config.json and not in the Hugging Face cache "
        f"(this tool never downloads). Get it {hint}, then pass --model <that dir>.")


def plan(recipe: Recipe, opts: RunOptions) -> list[tuple[str, Strategy, int, int]]:
    """All runs as (task, strategy, rank, seed), filtered by the options."""
    tasks = opts.tasks or recipe.tasks
    for t in tasks:
        _require(t in recipe.tasks, f"--tasks: {t!r} is not in the recipe's tasks {recipe.tasks}")
    strategies = recipe.strategies
    if opts.strategies:
        names = [s.name for s in recipe.strategies]
        for wanted in opts.strategies:
            _require(wanted in names, f"--strategies: {wanted!r} is not in the recipe's strategies {names}")
        strategies = [s for s in recipe.strategies if s.name in opts.strategies]
    seeds = opts.seeds if opts.seeds is not None else recipe.seeds
    runs = []
    for t in tasks:
        for s in strategies:
            ranks = opts.ranks or s.ranks or recipe.ranks
            for r in ranks:
                for seed in seeds:
                    runs.append((t, s, r, seed))
    return runs


def run_dir(out: str | os.PathLike, task: str, strategy: Strategy, r: int, seed: int) -> Path:
    return Path(out) / task / f"{strategy.name}-r{r}" / f"seed{seed}"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then os.replace)."""
    from asymlora.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _train_args(recipe: Recipe, opts: RunOptions, seed: int, out_dir: Path):
    from asymlora.training.loop import TrainArgs

    kw = dict(recipe.train)
    if opts.epochs is not None:
        kw["epochs"] = opts.epochs
    if opts.lr is not None:
        kw["lr"] = opts.lr
    if opts.batch_size is not None:
        kw["batch_size"] = opts.batch_size
    if opts.mixed_precision is not None:
        kw["mixed_precision"] = opts.mixed_precision
    if opts.max_steps is not None:
        kw["max_steps"] = opts.max_steps
    kw.setdefault("progress", opts.progress)
    kw.setdefault("desc", "/".join(out_dir.parts[-3:]))
    ckpt = bool(kw.get("checkpoint_every"))
    # an interrupted run with checkpoints continues where it stopped
    resume = ckpt and (out_dir / "checkpoint").is_dir()
    return TrainArgs(output_dir=str(out_dir) if ckpt else None, seed=seed, resume=resume, **kw)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_recipe(recipe: Recipe, opts: RunOptions) -> list[dict[str, Any]]:
    """Execute every run of the recipe; returns the result records (also written to disk).

    All inputs are checked first (model, every task's data), so a missing file fails
    before any training starts.
    """
    import torch

    fam = recipe.family_module()
    model = opts.model or recipe.model
    data = opts.data or recipe.data
    if opts.dtype is not None:
        _require(opts.dtype in DTYPES, f"--dtype {opts.dtype!r} is not one of {DTYPES}")
    runs = plan(recipe, opts)
    check_model(model, recipe)
    if data is None:
        raise MissingFileError(
            f"recipe {recipe.name!r} needs a dataset: pass --data PATH. {recipe.data_hint}".strip())
    for task in dict.fromkeys(t for t, *_ in runs):
        fam.check_data(task, data, recipe.for_task(task))
    out = Path(opts.out or Path("runs") / recipe.name)
    try:
        from asymlora.training.loop import fit
    except ImportError as err:
        raise ImportError(f"the training engine asymlora.training.loop is not available: {err}") from err
    from asymlora.core.inject import parameter_report, wrap
    from asymlora.core.quant import check_scheme, quantize_model
    from asymlora.fileio import atomic_folder
    from asymlora.formats.native import save_adapter

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scheme = check_scheme(opts.quantize if opts.quantize is not None else recipe.quantize, "--quantize")
    records: list[dict[str, Any]] = []
    prepared: dict[str, Prepared] = {}
    for task, strategy, r, seed in runs:
        rdir = run_dir(out, task, strategy, r, seed)
        result_path = rdir / "result.json"
        if result_path.is_file() and not opts.force:
            _log(f"[skip] {result_path} exists (use --overwrite to re-run)")
            with open(result_path, encoding="utf-8") as fh:
                records.append(json.load(fh))
            continue
        trecipe = recipe.for_task(task)
        if task not in prepared:
            prepared.clear()  # one task's data in memory at a time
            prepared[task] = fam.prepare(task, model, data, trecipe, opts)
        prep = prepared[task]
        _log(f"[run] {recipe.name} task={task} strategy={strategy.name} r={r} seed={seed} -> {rdir}")
        torch.manual_seed(seed)
        net = prep.build_model()
        if scheme:  # quantized layer by layer on the training device: the float model need not fit there
            quantize_model(net, scheme, skip=trecipe.modules_to_save, device=device)
        cfg = adapter_config(trecipe, strategy, r, seed)
        wrap(net, cfg)
        net.to(device)
        report = parameter_report(net)
        args = _train_args(trecipe, opts, seed, rdir)
        t0 = time.time()
        fitres = fit(net, prep.train_dataset, prep.collate_fn, args, loss_fn=prep.loss_fn)
        train_time = time.time() - t0
        t0 = time.time()
        net.eval()
        with torch.no_grad():
            metrics = prep.evaluate(net)
        eval_time = time.time() - t0
        record = {
            "recipe": recipe.name,
            "family": recipe.family,
            "table": recipe.table,
            "task": task,
            "task_index": recipe.tasks.index(task),
            "strategy": strategy.name,
            "strategy_index": [x.name for x in recipe.strategies].index(strategy.name),
            "preset": strategy.preset,
            "r": r,
            "alpha": cfg.alpha,
            "quantize": scheme,
            "seed": seed,
            "model": model,
            "metrics": metrics,
            "columns": fam.columns(task, metrics),
            "avg_columns": fam.avg_columns(task),
            "adapter_config": cfg.to_dict(),
            "trainable_params": int(getattr(report, "trainable", 0)),
            "adapter_trainable_params": int(getattr(report, "adapter_trainable", 0)),
            "steps": int(getattr(fitres, "steps", 0)),
            "first_train_loss": _last_loss(list(reversed(getattr(fitres, "history", []) or []))),
            "final_train_loss": _last_loss(getattr(fitres, "history", [])),
            "train_time_s": train_time,
            "eval_time_s": eval_time,
            "peak_memory_bytes": int(getattr(fitres, "peak_memory_bytes", 0) or 0),
            "train_args": {k: v for k, v in dataclasses.asdict(args).items() if _jsonable(v)},
            "info": prep.info,
        }
        # the run's adapter and result replace an earlier run's (--overwrite) together, in one step
        with atomic_folder(rdir, owned=("result.json", "adapter") if opts.save_adapter else ("result.json",)) as tmp:
            if opts.save_adapter:
                save_adapter(net, Path(tmp) / "adapter")
            atomic_write_json(Path(tmp) / "result.json", record)
        _log(f"[done] {task} {strategy.name} r={r} seed={seed}: "
             + ", ".join(f"{k}={v:.4f}" for k, v in record["columns"].items()))
        records.append(record)
        del net
    return records


def _last_loss(history: list[dict]) -> float | None:
    for h in reversed(history or []):
        if "loss" in h and h["loss"] is not None and not (isinstance(h["loss"], float) and math.isnan(h["loss"])):
            return float(h["loss"])
    return None


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def limit(items: list, n: int | None) -> list:
    """The first n items (all when n is None); used for --max-train/eval-samples."""
    if n is None:
        return items
    _require(n > 0, f"sample limit must be positive, got {n}")
    return items[:n]


def model_device(model) -> Any:
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")
