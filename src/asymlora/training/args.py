"""What one training run is asked and what it gives back: ``TrainArgs`` (validated before any work),
``FitResult``, and the error a diverging loss raises."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from asymlora.errors import UserError
from asymlora.training.sharding import (
    SHARDED,
    SHARDINGS,
)

MIXED = ("no", "fp16", "bf16", "auto")


SCHEDULES = ("linear", "constant", "wsd")


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss (or gradient norm) becomes NaN or infinite.

    The run stops before the optimizer applies the bad step; the last checkpoint written
    (if any) is left untouched. ``step`` is the 1-based step that failed and
    ``checkpoint`` the folder of the last good checkpoint (or ``None``).
    """

    def __init__(self, message: str, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainArgs:
    """Training settings (see module docstring for the exact semantics).

    ``batch_size`` is per process and per micro-batch; the global batch of one optimizer
    step is ``batch_size · grad_accum · world_size``. ``max_steps`` (when set) overrides
    ``epochs``; otherwise ``steps = ceil(epochs · len(train_dataset) / global_batch)``.
    ``mixed_precision``: "no", "fp16" (CUDA only), "bf16", or "auto" (bf16 on a GPU that
    supports it, else fp16 on CUDA, "no" on CPU). ``early_stopping_metric`` defaults to the
    first key returned by ``eval_fn``.

    ``lr_schedule``: "linear" (warm-up, then linear decay to 0 at ``max_steps``), "wsd" (warm-up,
    the peak rate, then a linear decay to 0 over the last quarter: ``warmup_stable_decay``) or "constant"
    (warm-up, then the peak rate until the run ends — with early stopping the run length is not
    known in advance, and a decay would flatten the curve by itself). ``warmup_steps`` overrides
    ``warmup_ratio``. ``restore_best``: keep the trainable weights of the best evaluation (by
    the early-stopping metric) and put them back at the end. Evaluations before step
    ``early_stopping_min_steps`` do not use up patience (a slow start is not a plateau).
    ``early_stopping_min_delta``: only an evaluation that beats the last one that reset the
    patience by more than this resets it again (a curve creeping down by noise-sized steps is a
    plateau); ``restore_best`` still keeps the truly best weights.
    ``group_by_length``: batches of similar length (the dataset must have ``lengths()``; see
    ``epoch_batches``).
    ``pause_at``: stop after this optimizer step with a checkpoint in ``output_dir`` (evaluated
    there when ``eval_every`` divides it), as if the run had been interrupted; ``fit`` with
    ``resume=True`` and the same settings continues it bit for bit. The schedule still runs to
    ``max_steps``: a paused run is a prefix of the full one (used by the learning-rate search
    to look at a run part-way and stop paying for it when it is clearly losing).

    ``sharding``: None (as launched: an Accelerate FSDP/DeepSpeed config is honoured, else
    none), "none", "fsdp2", "zero2" or "zero3" (see ``asymlora.training.sharding``). A sharding that
    would not be in force (one process, Accelerate's fallback to plain data parallel without a
    GPU, a conflict with the launch config) stops the run with a ``UserError`` before any work.
    """

    output_dir: str | None = None
    lr: float = 4e-4
    weight_decay: float = 0.0
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 32
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None
    lr_schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    mixed_precision: str = "no"
    seed: int = 0
    early_stopping_patience: int | None = None
    early_stopping_metric: str | None = None
    early_stopping_min_steps: int = 0
    early_stopping_min_delta: float = 0.0
    greater_is_better: bool = True
    restore_best: bool = False
    group_by_length: bool = False
    progress: bool = True
    desc: str = "train"
    sharding: str | None = None
    pause_at: int | None = None

    def validate(self) -> None:
        """Raise UserError naming the first bad field and what is valid."""

        def bad(name: str, valid: str) -> None:
            raise UserError(f"TrainArgs.{name}={getattr(self, name)!r} is invalid: {valid}")

        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "must be a finite number > 0")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            bad("weight_decay", "must be >= 0")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            bad("max_steps", "must be None or an int >= 1")
        if self.max_steps is None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            bad("epochs", "must be > 0 (or set max_steps)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad("batch_size", "must be an int >= 1")
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            bad("grad_accum", "must be an int >= 1")
        if not (0.0 <= self.warmup_ratio < 1.0):
            bad("warmup_ratio", "must be in [0, 1)")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            bad("warmup_steps", "must be None or an int >= 0")
        if self.lr_schedule not in SCHEDULES:
            bad("lr_schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad("max_grad_norm", "must be None or > 0")
        if not isinstance(self.early_stopping_min_steps, int) or self.early_stopping_min_steps < 0:
            bad("early_stopping_min_steps", "must be an int >= 0")
        if not (isinstance(self.early_stopping_min_delta, (int, float)) and self.early_stopping_min_delta >= 0):
            bad("early_stopping_min_delta", "must be a number >= 0")
        for name in ("eval_every", "checkpoint_every", "early_stopping_patience"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(name, "must be None or an int >= 1")
        if self.mixed_precision not in MIXED:
            bad("mixed_precision", f"must be one of {', '.join(MIXED)}")
        if self.checkpoint_every is not None and self.output_dir is None:
            bad("checkpoint_every", "needs output_dir to be set")
        if self.resume and self.output_dir is None:
            bad("resume", "needs output_dir (where the checkpoint lives)")
        if not isinstance(self.seed, int):
            bad("seed", "must be an int")
        if self.sharding is not None and self.sharding not in SHARDINGS:
            bad("sharding", f"must be None or one of {', '.join(SHARDINGS)}")
        if self.pause_at is not None and (not isinstance(self.pause_at, int) or self.pause_at < 1):
            bad("pause_at", "must be None or an int >= 1")
        if self.pause_at is not None and self.output_dir is None:
            bad("pause_at", "needs output_dir (the paused run is a checkpoint there)")
        if self.sharding in SHARDED and self.restore_best:
            bad("restore_best", f"is not supported with sharding={self.sharding!r} (the best weights would have to "
                "be re-sharded): keep it False and pick the best checkpoint by its evaluation")


@dataclass
class FitResult:
    """What ``fit`` returns. ``history`` has one dict per optimizer step (``step``,
    ``epoch``, ``loss`` — mean over the global batch —, ``lr``, ``grad_norm``) with the
    eval metrics merged into the steps where evaluation ran.

    ``saved_activation_bytes``: the largest total size, over micro-batches, of the tensors
    autograd saved for the backward pass (distinct storages, parameters and buffers excluded),
    tracked with ``torch.autograd.graph.saved_tensors_hooks``. Unlike the RSS peak it is exact
    and machine-independent: it shows that a frozen A keeps only ``A·x`` (r numbers per token)
    where LoRA also keeps ``x`` (d_in numbers per token) for A's gradient."""

    history: list[dict[str, float]]
    final_metrics: dict[str, float]
    steps: int
    wall_time_s: float
    peak_memory_bytes: int
    trainable_params: int
    peak_memory_kind: str = ""
    total_steps: int = 0
    stopped_early: bool = False
    best_metric: float | None = None
    best_step: int | None = None
    restored_best: bool = False
    resumed_from_step: int = 0
    checkpoint_dir: str | None = None
    world_size: int = 1
    global_batch_size: int = 0
    saved_activation_bytes: int = 0
    sharding: str = "none"
    paused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
