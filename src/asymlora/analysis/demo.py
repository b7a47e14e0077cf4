"""The Figures 1-2 experiment of the paper, small enough for a laptop CPU.

Zhu et al. (ICML 2024, arXiv 2402.16842), §3 and Figures 1-2: LoRA-train the same
pretrained model several times and compare the learned factors layer by layer
(:mod:`asymlora.analysis.similarity`).  Their finding: with the standard init (A random,
B zero) the learned A's of two runs are alike when the runs *share the initialisation*
(A barely leaves its random start), whatever the task; the learned B's are alike when the
runs *share the task*.  A extracts features, B makes the output.

Design (per init scheme, both factors trained, ``trainable="AB"``):

=====  =========  =========  ==========
run    task       init seed  data order
=====  =========  =========  ==========
0      T1         s0         0
1      T1         s0         1          (0,1): same task and init
2      T1         s1         2          (0,2),(1,2): same task only
3      T2         s0         3          (0,3),(1,3),(2,4): same init only
4      T2         s1         4          (0,4),(1,4),(2,3),(3,4): neither
=====  =========  =========  ==========

"Same init" = same adapter seed (``AsymLoraConfig.seed``); "same task" = same dataset
(same split), different data-order seed (``TrainArgs.seed``).  The classification head is
drawn from a fixed seed per task, so it is part of the task.  Init schemes:

* ``standard``: A kaiming-uniform random, B zero (LoRA's default);
* ``reversed``: A zero, B random orthonormal.

Verdict (:func:`pattern_verdict`): for each factor, the mean over layers of the subspace
similarity is averaged within each pair relation (task+init, task only, init only,
neither).  "Factor F is alike exactly when the runs share X" holds when *both* relations
that share X beat *both* relations that do not, by ``margin``:

    min(mean[shares X]) > max(mean[does not share X]) + margin.

Expected: the factor that starts random (A for standard, B for reversed) tracks the
init; the factor that starts at zero (B for standard, A for reversed) tracks the task.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from asymlora.analysis.similarity import (
    FACTORS,
    SimilarityReport,
    compare_factors,
    nanmean,
)
from asymlora.bundled import ENCODER, model_problem, resolve_model
from asymlora.core.threads import torch_threads
from asymlora.errors import UserError
from asymlora.fileio import atomic_write_text

__all__ = [
    "RELATIONS",
    "SCHEMES",
    "DemoSettings",
    "FactorCheck",
    "RunSpec",
    "SchemeVerdict",
    "design_runs",
    "format_verdict_table",
    "pattern_verdict",
    "relation",
    "run_demo",
]

RELATIONS: tuple[str, ...] = ("task+init", "task only", "init only", "neither")
# scheme -> (init_A, init_B)
SCHEMES: dict[str, tuple[str, str]] = {
    "standard": ("kaiming", "zero"),
    "reversed": ("zero", "orthogonal"),
}
# scheme -> the factor that starts random (expected to track the init)
RANDOM_START: dict[str, str] = {"standard": "A", "reversed": "B"}
SHARES: dict[str, tuple[str, str]] = {
    "init": ("task+init", "init only"),
    "task": ("task+init", "task only"),
}


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run of the design: task (dataset name), adapter seed, data-order seed."""

    task: str
    init_seed: int
    data_seed: int

    @property
    def label(self) -> str:
        return f"{self.task}/init{self.init_seed}/data{self.data_seed}"


def design_runs(tasks: Sequence[str] = ("fortunes", "tweets"), init_seeds: Sequence[int] = (0, 1)) -> list[RunSpec]:
    """The 5-run design of the module docstring: every pair relation occurs at least once."""
    if len(tasks) != 2 or tasks[0] == tasks[1]:
        raise UserError(f"need exactly two different tasks, got {list(tasks)}")
    if len(init_seeds) != 2 or init_seeds[0] == init_seeds[1]:
        raise UserError(f"need exactly two different init seeds, got {list(init_seeds)}")
    t1, t2 = tasks
    s0, s1 = init_seeds
    return [RunSpec(t1, s0, 0), RunSpec(t1, s0, 1), RunSpec(t1, s1, 2), RunSpec(t2, s0, 3), RunSpec(t2, s1, 4)]


def relation(a: RunSpec, b: RunSpec) -> str:
    """'task+init', 'task only', 'init only' or 'neither'."""
    same_task, same_init = a.task == b.task, a.init_seed == b.init_seed
    if same_task and same_init:
        return "task+init"
    if same_task:
        return "task only"
    if same_init:
        return "init only"
    return "neither"


@dataclass
class FactorCheck:
    """Whether ``factor`` is alike exactly when the runs share ``shares`` ("init"/"task")."""

    factor: str
    shares: str
    means: dict[str, float]
    margin: float
    passed: bool

    @property
    def gap(self) -> float:
        """min over the sharing relations minus max over the others."""
        yes = [self.means[r] for r in SHARES[self.shares]]
        no = [self.means[r] for r in RELATIONS if r not in SHARES[self.shares]]
        return float(min(yes) - max(no))


@dataclass
class SchemeVerdict:
    scheme: str
    checks: list[FactorCheck]
    chance: dict[str, float] = field(default_factory=dict)

    @property
    def holds(self) -> bool:
        return all(c.passed for c in self.checks)


def _pair_means(sims: np.ndarray) -> np.ndarray:
    s = np.asarray(sims, dtype=float)
    if s.ndim == 1:
        return s
    if s.ndim != 2:
        raise ValueError(f"similarities must be 1-D (pairs) or 2-D (layers × pairs), got shape {s.shape}")
    out = np.full(s.shape[1], np.nan)
    for j in range(s.shape[1]):
        col = s[:, j][np.isfinite(s[:, j])]
        if col.size:
            out[j] = col.mean()
    return out


def pattern_verdict(
    specs: Sequence[RunSpec],
    pairs: Sequence[tuple[int, int]],
    sims: Mapping[str, np.ndarray],
    scheme: str,
    *,
    margin: float = 0.02,
    chance: Mapping[str, float] | None = None,
) -> SchemeVerdict:
    """Does the paper's pattern appear in these similarities?

    ``sims[factor]`` ("A" and "B"): per pair (1-D) or per layer and pair (2-D, averaged
    over layers ignoring NaN).  ``scheme`` ("standard"/"reversed") says which factor
    started random: that one must track the init, the other the task (see module
    docstring for the rule).  Every relation must occur among ``pairs``.
    """
    if scheme not in SCHEMES:
        raise UserError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    if margin < 0:
        raise UserError(f"margin must be >= 0, got {margin}")
    missing_f = [f for f in FACTORS if f not in sims]
    if missing_f:
        raise UserError(f"sims lacks factor(s) {missing_f}; need both 'A' and 'B'")
    rels = []
    for i, k in pairs:
        if not (0 <= i < len(specs) and 0 <= k < len(specs)) or i == k:
            raise UserError(f"bad pair {(i, k)} for {len(specs)} runs")
        rels.append(relation(specs[i], specs[k]))
    absent = [r for r in RELATIONS if r not in rels]
    if absent:
        raise UserError(f"the design has no pair with relation(s) {absent}; see design_runs()")
    checks = []
    for factor in FACTORS:
        m = _pair_means(sims[factor])
        if m.shape[0] != len(pairs):
            raise UserError(f"sims[{factor!r}] has {m.shape[0]} pairs, expected {len(pairs)}")
        means = {}
        for r in RELATIONS:
            vals = np.array([m[j] for j, rr in enumerate(rels) if rr == r])
            vals = vals[np.isfinite(vals)]
            means[r] = float(vals.mean()) if vals.size else float("nan")
        shares = "init" if factor == RANDOM_START[scheme] else "task"
        yes = [means[r] for r in SHARES[shares]]
        no = [means[r] for r in RELATIONS if r not in SHARES[shares]]
        ok = all(math.isfinite(v) for v in yes + no) and min(yes) > max(no) + margin
        checks.append(FactorCheck(factor=factor, shares=shares, means=means, margin=margin, passed=bool(ok)))
    return SchemeVerdict(scheme=scheme, checks=checks, chance=dict(chance or {}))


def format_verdict_table(verdicts: Sequence[SchemeVerdict]) -> str:
    """A plain-text table: one row per (scheme, factor), the relation means, the verdict."""
    head = ["scheme", "init A/B", "factor", "expected: alike iff same", *RELATIONS, "chance", "gap", "pattern"]
    rows = []
    for v in verdicts:
        ia, ib = SCHEMES[v.scheme]
        for c in v.checks:
            rows.append([
                v.scheme, f"{ia}/{ib}", c.factor, c.shares,
                *[f"{c.means[r]:.3f}" for r in RELATIONS],
                f"{v.chance.get(c.factor, float('nan')):.3f}",
                f"{c.gap:+.3f}",
                "YES" if c.passed else "no",
            ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    lines = [fmt(head), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]
    for v in verdicts:
        lines.append(
            f"{v.scheme} init: the paper's pattern "
            + ("APPEARS" if v.holds else "does NOT fully appear")
            + f" ({RANDOM_START[v.scheme]} tracks the init, "
            + f"{'B' if RANDOM_START[v.scheme] == 'A' else 'A'} tracks the task; "
            + "rule: min(shared) > max(unshared) + margin)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# the real experiment
# ---------------------------------------------------------------------------
@dataclass
class DemoSettings:
    """Sizes of the --demo run. Defaults take ~3-5 min on 2 CPU cores (10 runs)."""

    tasks: tuple[str, str] = ("fortunes", "tweets")
    init_seeds: tuple[int, int] = (0, 1)
    schemes: tuple[str, ...] = ("standard", "reversed")
    steps: int = 60
    batch_size: int = 16
    max_length: int = 40
    r: int = 8
    lr: float = 1e-3
    eval_examples: int = 200
    margin: float = 0.02
    head_seed: int = 1234
    model_path: str | None = None
    threads: int | None = None  # torch.set_num_threads; None = leave as is

    def validate(self) -> None:
        """Check every setting; one UserError names all the bad ones."""
        problems: list[str] = []

        def bad(name: str, valid: str) -> None:
            problems.append(f"demo setting {name}={getattr(self, name)!r} is invalid: {valid}")

        for name in ("steps", "batch_size", "r"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(name, "must be an int >= 1")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            bad("max_length", "must be an int >= 8")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "must be a finite number > 0")
        if not isinstance(self.eval_examples, int) or self.eval_examples < 0:
            bad("eval_examples", "must be an int >= 0 (0 = no evaluation)")
        if self.margin < 0:
            bad("margin", "must be >= 0")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            bad("threads", "must be None or an int >= 1")
        unknown = [s for s in self.schemes if s not in SCHEMES]
        if unknown or not self.schemes:
            bad("schemes", f"must be a non-empty subset of {list(SCHEMES)}")
        if self.model_path is not None and (problem := model_problem(self.model_path, ENCODER)):
            problems.append(problem)
        if problems:
            raise UserError("; ".join(problems))
        design_runs(self.tasks, self.init_seeds)  # validates tasks and seeds


@dataclass
class DemoResult:
    settings: DemoSettings
    specs: list[RunSpec]
    reports: dict[str, SimilarityReport]
    verdicts: list[SchemeVerdict]
    runs: list[dict]
    wall_time_s: float


def _factors(model) -> dict:
    from asymlora.core.inject import lora_layers

    return {
        name: (layer.lora_A.detach().float().cpu().clone(), layer.lora_B.detach().float().cpu().clone())
        for name, layer in lora_layers(model).items()
    }


def run_demo(
    settings: DemoSettings | None = None,
    out_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train the 5-run design for each init scheme on the embedded default model, compare
    the learned factors and judge the pattern.  With ``out_dir``: per scheme the adapters,
    heatmaps and CSV, plus ``verdict.txt`` / ``verdict.json``. Torch's thread count
    (``settings.threads``) and global RNG (the head seed) are as before when it returns."""
    import torch

    settings = settings or DemoSettings()
    with torch.random.fork_rng(), torch_threads(settings.threads):
        return _run_demo(settings, out_dir, log)


def _run_demo(settings: DemoSettings, out_dir: str | os.PathLike | None,
              log: Callable[[str], None]) -> DemoResult:
    settings.validate()
    model_path = resolve_model(settings.model_path)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from asymlora.compare.data import (
        PadCollator,
        TokenizedDataset,
        evaluate_classifier,
        load_named_dataset,
        subsample_stratified,
    )
    from asymlora.core.config import AsymLoraConfig
    from asymlora.core.inject import wrap
    from asymlora.formats.native import save_adapter
    from asymlora.training.loop import TrainArgs, fit

    t0 = time.time()
    hf_logging.set_verbosity_error()
    specs = design_runs(settings.tasks, settings.init_seeds)
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    collate = PadCollator(tok.pad_token_id or 0)
    n_train = settings.steps * settings.batch_size

    # per task: data (split seed 0 for every run: same dataset) and a base model whose
    # classification head is drawn from a fixed seed (the head belongs to the task)
    tasks: dict[str, dict] = {}
    for task in settings.tasks:
        ds = load_named_dataset(task, seed=0)
        train = subsample_stratified(ds.train, n_train, seed=0)
        val = subsample_stratified(ds.val, settings.eval_examples, seed=0) if settings.eval_examples else None
        torch.manual_seed(settings.head_seed)
        base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=ds.num_labels,
                                                                  local_files_only=True)
        tasks[task] = {
            "num_labels": ds.num_labels,
            "train": TokenizedDataset(train, tok, settings.max_length),
            "val": TokenizedDataset(val, tok, settings.max_length) if val is not None and len(val) else None,
            "base": base,
            "majority": max(np.bincount(val.labels)) / len(val) if val is not None and len(val) else float("nan"),
        }
        log(f"[data] {task}: {ds.num_labels} classes {ds.label_names}; {len(train)} training examples used "
            f"({settings.steps} steps × {settings.batch_size}), max {settings.max_length} tokens")

    out = Path(out_dir) if out_dir is not None else None
    reports: dict[str, SimilarityReport] = {}
    verdicts: list[SchemeVerdict] = []
    run_log: list[dict] = []
    for scheme in settings.schemes:
        init_a, init_b = SCHEMES[scheme]
        factors = []
        for spec in specs:
            t = tasks[spec.task]
            model = copy.deepcopy(t["base"])
            cfg = AsymLoraConfig(
                r=settings.r, alpha=2.0 * settings.r, trainable="AB", init_A=init_a, init_B=init_b,
                seed=spec.init_seed, modules_to_save=["classifier"],
            )
            wrap(model, cfg)
            res = fit(model, t["train"], collate, TrainArgs(
                lr=settings.lr, max_steps=settings.steps, batch_size=settings.batch_size,
                seed=spec.data_seed, progress=False, desc=spec.label))
            metrics = {}
            if t["val"] is not None:
                metrics = evaluate_classifier(model, t["val"], collate, t["num_labels"], prefix="val_")
            losses = [h["loss"] for h in res.history if "loss" in h]
            tail = losses[-max(1, len(losses) // 5):]
            entry = {"scheme": scheme, "run": spec.label, "steps": res.steps, "wall_s": round(res.wall_time_s, 1),
                     "loss_first": losses[0] if losses else float("nan"),
                     "loss_last20pct": float(np.mean(tail)) if tail else float("nan"), **metrics,
                     "val_majority": t["majority"]}
            run_log.append(entry)
            acc = metrics.get("val_accuracy", float("nan"))
            log(f"[{scheme}] {spec.label:<24} {res.steps} steps {res.wall_time_s:5.1f}s  loss "
                f"{entry['loss_first']:.3f} -> {entry['loss_last20pct']:.3f}  val acc {acc:.3f} "
                f"(majority {t['majority']:.3f})")
            if out is not None:
                save_adapter(model, out / scheme / spec.label.replace("/", "_"))
            factors.append(_factors(model))
            del model
        report = compare_factors(factors, [s.label for s in specs])
        reports[scheme] = report
        chance = {f: nanmean(report.chance[f]) for f in FACTORS}
        verdict = pattern_verdict(
            specs, report.pairs, {f: report.get(f) for f in FACTORS}, scheme, margin=settings.margin, chance=chance
        )
        verdicts.append(verdict)
        for line in report.summary_lines():
            log(f"[{scheme}] {line}")
        if out is not None:
            from asymlora.analysis.plots import save_report_heatmaps

            report.to_csv(out / scheme / "similarity.csv")
            save_report_heatmaps(report, out / scheme)

    table = format_verdict_table(verdicts)
    wall = time.time() - t0
    log("")
    log("Paper Figures 1-2 pattern — mean over layers of the subspace similarity, averaged per pair relation:")
    log(table)
    log(f"(total {wall:.0f} s)")
    if out is not None:
        atomic_write_text(out / "verdict.txt", table + "\n")
        atomic_write_text(out / "verdict.json", json.dumps({
            "settings": asdict(settings),
            "runs": run_log,
            "verdicts": [{"scheme": v.scheme, "holds": v.holds, "chance": v.chance,
                          "checks": [{**asdict(c), "gap": c.gap} for c in v.checks]} for v in verdicts],
            "wall_time_s": wall,
        }, indent=2, default=float) + "\n")
    return DemoResult(settings=settings, specs=specs, reports=reports, verdicts=verdicts, runs=run_log,
                      wall_time_s=wall)
