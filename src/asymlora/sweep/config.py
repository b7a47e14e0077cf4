"""What a sweep is: the protocol's settings and their validation (docs/design.md).

The strategies a sweep runs are named in the registry (``asymlora.strategies``); this layer
reads them through it and names none. A strategy may bring its own place on the rate axis
(``Strategy.lr_scale``: VeRA's rates live about 10× higher), so the grid is asked per row
(``SweepConfig.lr_grid(spec)``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from asymlora.errors import UserError
from asymlora.strategies import DEFAULT_STRATEGIES, HEAD_ONLY, StrategySpec, parse_strategy
from asymlora.sweep.backends import backend_problems
from asymlora.sweep.budget import DEFAULT

__all__ = ["STOPPING_RULES", "HEAD_ONLY", "StrategySpec", "parse_strategy", "target_spec", "SweepConfig"]

STOPPING_RULES = ("budget", "plateau")


def target_spec(names: list[str] | None) -> list[str] | str | None:
    """A ``--target-modules`` list as the adapter core takes it: one entry is passed as a string,
    so that it may be a regex (``.*layer\\.\\d+\\.(intermediate|output)\\.dense`` picks BERT's FFN)
    or ``all-linear``; several stay a list of names."""
    return names[0] if names and len(names) == 1 else names


@dataclass
class SweepConfig:
    """The protocol's settings, shared by every task of the sweep (compare, sft); the defaults
    are the embedded default experiment's (``asymlora.sweep.budget.DEFAULT``).

    For each strategy the learning rate is picked from ``lrs`` by the validation score of runs
    on the first seed (the pilots; a best rate on an edge of the grid gets up to
    ``max_lr_extensions`` more rates beyond it; with ``prune`` a pilot that is clearly losing at
    a rung, a fraction ``rungs`` of the budget, stops there — ``asymlora.sweep.pruning``);
    every seed then trains at that rate.

    ``stopping="budget"``: every run trains ``max_steps`` steps, warm-up then (``schedule``) a linear decay to
    0, and is scored with its final weights; pilots validate every ``eval_every`` steps, seed
    runs at the end only. ``stopping="plateau"``: a constant rate after warm-up, validation
    every ``eval_every`` steps, stop after ``patience`` evaluations without a new best counted
    from ``min_steps`` (or at ``max_steps``), scored with the best validation step's weights.
    ``lr`` set: one rate for every strategy, no selection. A task adds its own fields (model,
    data) and checks them in ``task_problems``."""

    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    ranks: list[int] = field(default_factory=lambda: [DEFAULT.r])
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT.seeds))
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT.lrs))
    lr: float | None = None
    max_lr_extensions: int = DEFAULT.max_lr_extensions  # extra pilot rates beyond an edge of the grid
    max_steps: int = DEFAULT.max_steps
    eval_every: int = DEFAULT.eval_every
    patience: int = DEFAULT.patience
    min_steps: int = DEFAULT.min_steps
    warmup_steps: int = DEFAULT.warmup_steps
    stopping: str = "budget"
    schedule: str = "linear"                 # budget: "linear" decay from warm-up, or "wsd" (decay in the last quarter)
    prune: bool = True
    rungs: list[float] = field(default_factory=lambda: [0.25, 0.5])
    prune_z: float = 2.0                     # noise allowance of the pruning rule, in standard errors
    batch_size: int = DEFAULT.batch_size
    max_length: int = DEFAULT.max_length
    weight_decay: float = 0.0
    max_train: int | None = DEFAULT.max_train
    max_val: int | None = DEFAULT.max_val
    max_test: int | None = DEFAULT.max_test
    split_seed: int = 0
    margin: float = 0.01                     # equivalence margin of the verdicts (0.01 = 1 point)
    output_dir: str = "asymlora-sweep"
    threads: int | None = None
    workers: int | None = None               # None = one per core (at most 2) on CPU, 1 on GPU
    mixed_precision: str = "auto"
    target_modules: list[str] | None = None
    quick: bool = False
    progress: bool = True
    resume: bool = False                     # go on with the interrupted sweep in output_dir
    overwrite: bool = False                  # replace an earlier sweep in output_dir once this one completes
    checkpoint_dir: str | None = None        # paused runs' checkpoints (set by the sweep: asymlora.sweep.outdir)
    backend: str = "local"                   # where runs execute: a name of asymlora.sweep.backends.BACKENDS
    ray_address: str | None = None           # ray: "auto" or HOST:PORT of a running cluster; None = a local one
    cpus_per_run: float = 1                  # ray: CPUs a run asks for (its torch threads)
    gpus_per_run: float = 0                  # ray: GPUs a run asks for

    # fields that do not change a run's record: left out of the settings' fingerprint (--resume)
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("output_dir", "threads", "workers", "progress", "plots",
                                                     "resume", "overwrite", "checkpoint_dir", "backend",
                                                     "ray_address", "cpus_per_run", "gpus_per_run")

    # how the protocol ranks the pilot runs of the lr grid (asymlora.sweep.schedule.Schedule)
    selection_metric: ClassVar[str] = "val_accuracy"
    selection_higher_is_better: ClassVar[bool] = True

    @property
    def targets(self) -> list[str] | str | None:
        """``target_modules`` as the adapter core takes it (``target_spec``)."""
        return target_spec(self.target_modules)

    @property
    def selects_lr(self) -> bool:
        return self.lr is None and len(self.lrs) > 1

    def lr_grid(self, spec: Any = None) -> list[float]:
        """The rates tried for ``spec`` (None: the protocol's grid): the grid times the
        strategy's ``lr_scale``; ``lr`` set: that one rate for every strategy."""
        if self.lr is not None:
            return [self.lr]
        scale = getattr(spec, "lr_scale", 1.0) if spec is not None else 1.0
        return [float(f"{x * scale:.6g}") for x in self.lrs]

    @property
    def fixed_budget(self) -> bool:
        return self.stopping == "budget"

    def rung_steps(self) -> list[int]:
        """The steps at which pilots may be pruned: each fraction of ``rungs`` of the budget,
        moved down to a multiple of ``eval_every`` (an evaluation happens there), strictly
        inside the run and after at least three evaluations. Empty when pruning is off, nothing is selected,
        or under ``plateau`` (a run's length is not known in advance), and for a selection metric other than an
        accuracy."""
        if not (self.prune and self.fixed_budget and self.selects_lr and self.selection_metric == "val_accuracy"):
            return []  # the rule's noise allowance is the binomial one of an accuracy
        out = sorted({int(f * self.max_steps) // self.eval_every * self.eval_every for f in self.rungs})
        # a rung needs three evaluations before it: the rule reads the steepest climb between two
        # of them, and one pair alone cannot tell a dip from a stall
        return [s for s in out if 3 * self.eval_every <= s < self.max_steps]

    def problems(self) -> list[str]:
        """Every invalid setting, one message each (empty when the config is valid)."""
        out: list[str] = []
        if not self.strategies:
            out.append("--strategies is empty: give at least one (`asymlora compare --help` lists them)")
        for s in self.strategies:
            try:
                parse_strategy(s, 1)
            except UserError as err:
                out.append(str(err))
        if not self.ranks or any(not isinstance(r, int) or r < 1 for r in self.ranks):
            out.append(f"--rank {self.ranks!r}: need one or more integers >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            out.append(f"--seeds {self.seeds!r}: need one or more distinct integers")
        for name in ("max_steps", "batch_size", "eval_every", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                out.append(f"--{name.replace('_', '-')} {v!r}: must be an integer >= 1")
        if not isinstance(self.min_steps, int) or self.min_steps < 0:
            out.append(f"--min-steps {self.min_steps!r}: must be an integer >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            out.append(f"--warmup-steps {self.warmup_steps!r}: must be an integer >= 0")
        if self.schedule not in ("linear", "wsd"):
            out.append(f"--schedule {self.schedule!r}: use linear or wsd")
        if self.stopping not in STOPPING_RULES:
            out.append(f"--stopping {self.stopping!r}: use one of {', '.join(STOPPING_RULES)}")
        if not self.rungs or any(not (isinstance(f, (int, float)) and 0 < f < 1) for f in self.rungs):
            out.append(f"--rungs {self.rungs!r}: need one or more fractions of the budget strictly between 0 and 1")
        if not (isinstance(self.prune_z, (int, float)) and math.isfinite(self.prune_z) and self.prune_z >= 0):
            out.append(f"prune_z {self.prune_z!r}: must be a finite number >= 0")
        if self.max_length < 8:
            out.append(f"--max-length {self.max_length!r}: must be >= 8 tokens")
        rates = ([] if self.lr is None else [("--lr", self.lr)]) + [("--lrs", x) for x in self.lrs]
        for flag, x in rates:
            if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
                out.append(f"{flag} {x!r}: a learning rate must be a finite number > 0")
        if not isinstance(self.max_lr_extensions, int) or self.max_lr_extensions < 0:
            out.append(f"--max-lr-extensions {self.max_lr_extensions!r}: must be an integer >= 0")
        if self.lr is None and not self.lrs:
            out.append("--lrs is empty: give one or more learning rates (or --lr for a single one)")
        if len(set(self.lrs)) != len(self.lrs):
            out.append(f"--lrs {self.lrs!r}: the rates must be distinct")
        for name in ("max_train", "max_val", "max_test"):
            v = getattr(self, name)
            if v is not None and v < 2:
                out.append(f"--{name.replace('_', '-')} {v!r}: must be >= 2 (or unset for all)")
        if self.threads is not None and self.threads < 1:
            out.append(f"--threads {self.threads!r}: must be >= 1")
        if self.workers is not None and self.workers < 1:
            out.append(f"--workers {self.workers!r}: must be >= 1")
        if not (0 <= self.margin < 1):
            out.append(f"--margin {self.margin!r}: must be in [0, 1) (a fraction: 0.01 = 1 point)")
        if self.weight_decay < 0:
            out.append(f"--weight-decay {self.weight_decay!r}: must be >= 0")
        out += backend_problems(self)
        if not (isinstance(self.cpus_per_run, (int, float)) and self.cpus_per_run >= 1):
            out.append(f"--cpus-per-run {self.cpus_per_run!r}: must be a number >= 1")
        if not (isinstance(self.gpus_per_run, (int, float)) and self.gpus_per_run >= 0):
            out.append(f"--gpus-per-run {self.gpus_per_run!r}: must be a number >= 0")
        if self.mixed_precision == "fp16" and not _cuda_available():
            out.append("--mixed-precision fp16 needs a CUDA GPU; on CPU use bf16, no or auto")
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            out.append(f"--output-dir {self.output_dir!r} exists and is not a folder")
        return out + self.task_problems()

    def task_problems(self) -> list[str]:
        """The task's own settings (model, data); none here."""
        return []

    def validate(self) -> None:
        """Raise UserError naming every bad setting before any work is done."""
        bad = self.problems()
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


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
