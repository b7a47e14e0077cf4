"""Fine-tuning engine: one small, deterministic training loop on HF Accelerate.

This module is the loop itself; each other concern of a run has its own module beside it:
``args`` (TrainArgs, FitResult), ``schedules`` (the rate multipliers), ``data_order`` (the
batches as a function of seed and step), ``checkpoint_files``, ``best_weights``, ``memory``
(peak memory, saved activations), ``rng`` and ``progress``.

``fit`` trains whatever parameters of ``model`` have ``requires_grad=True`` (for an
asymlora-wrapped model: the trained adapter factors plus ``modules_to_save``) with AdamW,
a linear warm-up then linear decay of the learning rate, gradient accumulation, gradient
clipping, optional mixed precision, periodic evaluation and optional early stopping.

The same code runs in one process (the default) or data-parallel under
``accelerate launch`` / ``torchrun`` (DDP; gloo on CPU, NCCL on GPU) with no change, or
sharded (FSDP2, DeepSpeed ZeRO-2/3; ``TrainArgs.sharding`` or an Accelerate launch config):
``asymlora.training.sharding`` prepares the model, steps the optimizer and gathers full tensors for
checkpoints; the data order, the loss and the checkpoint layout below are the same.

Determinism and resumption
--------------------------
Data order is not drawn from a stateful sampler: the training stream is the concatenation
of per-epoch permutations ``perm_e = Philox(seed, e)``, and optimizer step ``k`` consumes
the global batch ``stream[k·G : (k+1)·G]`` with ``G = batch_size · grad_accum · world_size``.
Process ``p`` takes micro-batch ``m`` as the slice ``(m·P + p)·b : (m·P + p + 1)·b`` of it.
So the data order is a pure function of ``(seed, k)``: a resumed run continues with exactly
the batches the uninterrupted run would have seen, and ``P`` processes with per-process
batch ``b`` see the same global batches as one process with batch ``P·b``.

The gradient of one step is ``∇ (1/(M·P)) Σ_{m,p} L̄_{m,p}`` where ``L̄_{m,p}`` is the mean
loss of micro-batch ``(m, p)``; with equal micro-batch sizes this is the gradient of the
mean loss over the global batch, whatever ``M`` (accumulation) and ``P`` (processes) are.

A checkpoint (``output_dir/checkpoint``, written to a temporary folder then renamed) holds
the trainable weights (every ``requires_grad`` parameter, by name), the optimizer, the
scheduler, the gradient scaler (fp16), the python / numpy / torch (/ CUDA) RNG states of
every process, the step, the history and the early-stopping state. ``resume=True`` reloads
it and continues; the final weights and metrics equal those of an uninterrupted run. With no
checkpoint in ``output_dir`` (the first start of a job that always passes it) ``resume=True``
warns and starts from step 0. State files are read with ``torch.load(weights_only=True)`` only
(tensors, numbers, strings): a checkpoint folder from someone else cannot run code on resume.

Peak memory
-----------
On CUDA: ``torch.cuda.max_memory_allocated`` over the run (peak reset at the start).
On CPU: the peak resident set size of the process during the run (Linux ``VmHWM``, reset
at the start through ``/proc/self/clear_refs``); where that reset is not allowed, the
process-lifetime peak ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. ``FitResult.
peak_memory_kind`` says which. CPU numbers include the Python process, the model, the
allocator's cache and the data, so compare them between runs of the same process setup.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from asymlora.errors import UserError
from asymlora.fileio import fault_point
from asymlora.training.args import (
    FitResult,
    NonFiniteLossError,
    TrainArgs,
)
from asymlora.training.best_weights import (
    BestWeights,
    copy_into,
    storage_ptrs,
)
from asymlora.training.checkpoint_files import (
    BEST_FILE,
    CHECKPOINT_NAME,
    OPTIM_FILE,
    SCALER_FILE,
    SCHED_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    find_checkpoint,
    load_state,
    load_weights,
    refuse_everywhere,
)
from asymlora.training.data_order import (
    GroupedStream,
    stream_indices,
)
from asymlora.training.memory import (
    SavedTensorBytes,
    peak_memory_end,
    peak_memory_start,
)
from asymlora.training.progress import (
    Progress,
)
from asymlora.training.rng import (
    keeps_caller_rng,
    rng_state,
    set_rng_state,
)
from asymlora.training.schedules import (
    constant_after_warmup,
    linear_warmup_decay,
    lr_schedule,
)
from asymlora.training.sharding import (
    check_in_force,
    gathered_trainable,
    make_backend,
    resolve_sharding,
)

__all__ = [
    "TrainArgs",
    "FitResult",
    "fit",
    "NonFiniteLossError",
    "linear_warmup_decay",
    "constant_after_warmup",
    "CHECKPOINT_NAME",
]


# ----------------------------------------------------------------------------- helpers


def _make_accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    on_gpu = torch.cuda.is_available()
    mp = mixed_precision
    if mp == "auto":
        if on_gpu:
            mp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            mp = "no"
    if mp == "fp16" and not on_gpu:
        raise UserError(
            "TrainArgs.mixed_precision='fp16' needs a CUDA GPU; on CPU use 'bf16', 'no' or 'auto'"
        )
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mp) and not PartialState().use_distributed:
        # One process may run several fits with different precisions (tests, sweeps);
        # Accelerate keeps one global state, so drop it (the device part is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
    # Without a GPU, Accelerate only recognises a torchrun/`accelerate launch` process group
    # (gloo) when told to run on CPU.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("LOCAL_RANK") is not None
    cpu = (not on_gpu) and launched
    return Accelerator(mixed_precision=mp, step_scheduler_with_optimizer=False, cpu=cpu), mp


def _finite(x: float) -> bool:
    return math.isfinite(x)


# ----------------------------------------------------------------------------- one run, in pieces


@dataclass
class _Plan:
    """The fixed numbers of one run (module docstring): ``n`` examples, ``world`` processes,
    this process's ``rank``, micro-batch ``b`` and ``accum`` micro-batches per process and step,
    ``global_batch = b·accum·world``, ``total`` optimizer steps of which ``warmup`` warm up."""

    n: int
    world: int
    rank: int
    is_main: bool
    b: int
    accum: int
    global_batch: int
    total: int
    warmup: int

    @classmethod
    def make(cls, args: TrainArgs, n: int, world: int, rank: int, is_main: bool) -> _Plan:
        global_batch = args.batch_size * args.grad_accum * world
        total = args.max_steps if args.max_steps is not None else max(1, math.ceil(args.epochs * n / global_batch))
        warmup = args.warmup_steps if args.warmup_steps is not None else int(math.ceil(args.warmup_ratio * total))
        return cls(n=n, world=world, rank=rank, is_main=is_main, b=args.batch_size, accum=args.grad_accum,
                   global_batch=global_batch, total=total, warmup=min(warmup, total))


@dataclass
class _TrainState:
    """What changes while training runs, and what a checkpoint records besides the tensors:
    the step, the history, the early-stopping state (``best``, ``bad_evals``, the best weights)
    and the last evaluation."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: float | None = None
    bad_evals: int = 0
    plateau_ref: float | None = None  # the value of the evaluation that last reset the patience
    stopped_early: bool = False
    last_eval: dict[str, float] = field(default_factory=dict)
    last_ckpt: str | None = None
    resumed_from: int = 0
    best_weights: BestWeights = field(default_factory=BestWeights)

    def observe_eval(self, metrics: dict[str, float], args: TrainArgs,
                     named_trainable: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Early stopping: an evaluation better than ``best`` resets the patience (and captures
        the weights for ``restore_best``); a worse one at or after ``early_stopping_min_steps``
        uses one unit of it, and the run stops when ``early_stopping_patience`` are used."""
        val = _metric_of(metrics, args.early_stopping_metric)
        sign = 1.0 if args.greater_is_better else -1.0
        if self.best is None or sign * (val - self.best) > 0:
            self.best = val
            if args.restore_best:
                self.best_weights.capture(named_trainable, self.step)
        if self.plateau_ref is None or sign * (val - self.plateau_ref) > args.early_stopping_min_delta:
            self.plateau_ref, self.bad_evals = val, 0
        elif self.step >= args.early_stopping_min_steps:
            self.bad_evals += 1
            if args.early_stopping_patience is not None and self.bad_evals >= args.early_stopping_patience:
                self.stopped_early = True

    def to_json(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best, "best_step": self.best_weights.step,
                "bad_evals": self.bad_evals, "plateau_ref": self.plateau_ref, "last_eval": self.last_eval,
                "stopped_early": self.stopped_early}

    def load_json(self, st: dict[str, Any]) -> None:
        self.step = self.resumed_from = int(st["step"])
        self.history = st["history"]
        self.best, self.bad_evals = st["best"], int(st["bad_evals"])
        self.plateau_ref = st.get("plateau_ref", st["best"])
        self.last_eval = st.get("last_eval", {})
        self.stopped_early = bool(st.get("stopped_early", False))


def _metric_of(metrics: dict[str, float], key: str | None) -> float:
    """The early-stopping metric: ``key``, or the first metric ``eval_fn`` returned."""
    key = key or next(iter(metrics))
    if key not in metrics:
        raise UserError(f"early_stopping_metric={key!r} is not among the eval metrics {sorted(metrics)}")
    return metrics[key]


def _adamw(named_trainable: Sequence[tuple[str, nn.Parameter]], args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (1-d tensors)."""
    decay = [p for _, p in named_trainable if p.ndim >= 2]
    no_decay = [p for _, p in named_trainable if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": args.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


class _Run:
    """One call of ``fit``: the prepared model and optimizer, the data stream, the state, and
    the pieces of the loop — ``train_step`` (one optimizer step), ``evaluate``,
    ``save_checkpoint`` / ``restore`` — that ``run`` strings together."""

    def __init__(self, model: nn.Module, train_dataset: Sequence[Any], collate_fn: Callable[[list[Any]], dict],
                 args: TrainArgs, eval_fn: Callable[[nn.Module], dict[str, float]] | None,
                 loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None,
                 make_optimizer: Callable[[Sequence[tuple[str, nn.Parameter]]], torch.optim.Optimizer] | None = None
                 ) -> None:
        self.model, self.data, self.collate_fn = model, train_dataset, collate_fn
        self.args, self.eval_fn, self.loss_fn = args, eval_fn, loss_fn
        self.named_trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if not self.named_trainable:
            raise UserError("model has no trainable parameters (requires_grad=True): nothing to train")
        self.trainable_params = sum(p.numel() for _, p in self.named_trainable)
        self.accelerator, self.mp = _make_accelerator(args.mixed_precision)
        acc = self.accelerator
        self.backend = make_backend(resolve_sharding(args.sharding, acc), acc, args, self.mp)
        self.plan = _Plan.make(args, len(train_dataset), acc.num_processes, acc.process_index, acc.is_main_process)
        self.device = acc.device
        self.orig_device = next(model.parameters()).device
        # Seed everything first so that a fresh run and a resumed one start from the same place.
        random.seed(args.seed)
        np.random.seed(args.seed % (2**32))
        torch.manual_seed(args.seed)
        self.grouped = self._grouped_stream()
        self.state = _TrainState()
        self.track_best = args.restore_best or args.early_stopping_patience is not None
        self.ckpt_root = args.output_dir
        if self.ckpt_root is not None and self.plan.is_main:
            os.makedirs(self.ckpt_root, exist_ok=True)
        resume = self._read_resume()  # the trainable weights go in before the model is sharded
        self.was_training = model.training
        factory = make_optimizer or (lambda named: _adamw(named, args))
        self.pmodel, self.optimizer, inner = self.backend.prepare(model, factory)
        self.raw = self.backend.unwrap(self.pmodel)
        check_in_force(self.backend, self.raw, self.plan.world)
        self.named_trainable = [(k, p) for k, p in self.raw.named_parameters() if p.requires_grad]
        schedule = lr_schedule(args.lr_schedule, self.plan.total, self.plan.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(inner, schedule)
        if resume is not None:
            self._apply_resume(resume)

    def _grouped_stream(self) -> GroupedStream | None:
        if not self.args.group_by_length:
            return None
        lengths = getattr(self.data, "lengths", None)
        if not callable(lengths):
            raise UserError("group_by_length=True needs a dataset with a lengths() method")
        return GroupedStream(lengths(), self.args.seed, self.plan.global_batch)

    # ------------------------------------------------------------------ one optimisation step

    def _global_batch(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch of optimizer step ``step`` (0-based)."""
        if self.grouped is not None:
            return self.grouped(step)
        return stream_indices(self.plan.n, self.args.seed, step * self.plan.global_batch, self.plan.global_batch)

    def _accumulate(self, gidx: np.ndarray) -> float:
        """Forward and backward of this process's micro-batches of the global batch ``gidx``
        (gradients of ``L̄_{m,p} / M`` summed; DDP averages over ``p``); returns the mean loss
        over the global batch."""
        from accelerate.utils import send_to_device

        acc, plan = self.accelerator, self.plan
        loss_sum = torch.zeros((), device=self.device)
        for m in range(plan.accum):
            lo = (m * plan.world + plan.rank) * plan.b
            batch = send_to_device(self.collate_fn([self.data[int(i)] for i in gidx[lo: lo + plan.b]]), self.device)
            sync = m == plan.accum - 1
            with contextlib.nullcontext() if sync or plan.world == 1 else self.backend.no_sync(self.pmodel):
                with torch.autograd.graph.saved_tensors_hooks(self.tracker.pack, self.tracker.unpack):
                    loss = self.loss_fn(self.pmodel, batch) if self.loss_fn is not None else self.pmodel(**batch).loss
                self.tracker.reset()
                if loss.ndim != 0:
                    raise UserError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
                self.backend.backward(loss / plan.accum, last=sync)
            loss_sum += loss.detach().float() / plan.accum
        if plan.world > 1:
            loss_sum = acc.reduce(loss_sum, reduction="mean")
        return float(loss_sum)

    def _non_finite(self, what: str, value: float, ckpt_hint: str) -> NonFiniteLossError:
        step, total = self.state.step + 1, self.plan.total
        return NonFiniteLossError(
            f"non-finite {what} ({value}) at step {step}/{total}; stopped before the update. "
            f"Last good checkpoint: {self.state.last_ckpt or ckpt_hint}", step, self.state.last_ckpt)

    def _update(self, loss_val: float) -> tuple[float, float]:
        """Clip and apply the accumulated gradient; returns (gradient norm, lr of this step).
        Without clipping the norm is still computed (max_norm=inf scales by 1): a finite loss
        can have a NaN gradient, which must not reach the weights or a checkpoint."""
        if not _finite(loss_val):
            raise self._non_finite("training loss", loss_val, "none written (set output_dir and checkpoint_every)")
        acc = self.accelerator
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else math.inf
        grad_norm = self.backend.clip_grad_norm([p for _, p in self.named_trainable], max_norm)
        if not _finite(grad_norm) and acc.scaler is None:
            raise self._non_finite("gradient norm", grad_norm, "none written")
        lr_now = float(self.scheduler.get_last_lr()[0])  # torch types it float | Tensor; LambdaLR's are floats
        self.backend.step(self.optimizer)
        self.scheduler.step()
        return grad_norm, lr_now

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its history record."""
        st, plan = self.state, self.plan
        loss_val = self._accumulate(self._global_batch(st.step))
        grad_norm, lr_now = self._update(loss_val)
        st.step += 1
        return {"step": st.step, "epoch": st.step * plan.global_batch / plan.n,
                "loss": loss_val, "lr": lr_now, "grad_norm": grad_norm}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """``eval_fn`` on the main process (eval mode, no grad, autocast), shared with all."""
        from accelerate.utils import broadcast_object_list

        assert self.eval_fn is not None  # callers evaluate only a run that has an eval_fn
        metrics: list[Any] = [None]
        if self.plan.is_main or self.backend.eval_everywhere:  # a sharded forward needs every process
            self.raw.eval()
            with torch.no_grad(), self.accelerator.autocast():
                metrics[0] = {k: float(v) for k, v in self.eval_fn(self.raw).items()}
            self.raw.train()
        if self.plan.world > 1:
            broadcast_object_list(metrics, from_process=0)
        return metrics[0]

    def _eval_due(self) -> bool:
        step, every = self.state.step, self.args.eval_every
        return self.eval_fn is not None and (step == self.plan.total or (every is not None and step % every == 0))

    def _checkpoint_due(self) -> bool:
        step, every = self.state.step, self.args.checkpoint_every
        return self.ckpt_root is not None and (
            (every is not None and step % every == 0) or step == self.plan.total or self.state.stopped_early
            or step == self.args.pause_at)

    def _paused(self) -> bool:
        """Stopped at ``pause_at`` short of the end (a run that reaches ``max_steps`` has finished)."""
        return self.args.pause_at is not None and self.args.pause_at <= self.state.step < self.plan.total

    # ------------------------------------------------------------------ checkpoint

    def _state_json(self) -> dict[str, Any]:
        args, plan, st = self.args, self.plan, self.state
        saved = st.to_json()
        return {
            "step": st.step, "total_steps": plan.total, "world_size": plan.world,
            "global_batch_size": plan.global_batch, "seed": args.seed,
            "data_order": {"kind": "philox_epoch_permutations", "seed": args.seed,
                           "consumed": st.step * plan.global_batch, "dataset_size": plan.n},
            "trainable_names": [k for k, _ in self.named_trainable],
            "history": saved["history"], "best": saved["best"], "best_step": saved["best_step"],
            "bad_evals": saved["bad_evals"], "plateau_ref": saved["plateau_ref"], "last_eval": saved["last_eval"],
            "stopped_early": saved["stopped_early"], "args": asdict(args), "mixed_precision": self.mp,
            "sharding": self.backend.name,
        }

    def _write_main_files(self, tmp: str, opt_state: dict, full: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({k: t.to("cpu").contiguous() for k, t in full.items()}, os.path.join(tmp, WEIGHTS_FILE))
        torch.save(opt_state, os.path.join(tmp, OPTIM_FILE))
        fault_point("checkpoint.writing")  # kill tests: half the files are in the new folder
        torch.save(self.scheduler.state_dict(), os.path.join(tmp, SCHED_FILE))
        if self.accelerator.scaler is not None:
            torch.save(self.accelerator.scaler.state_dict(), os.path.join(tmp, SCALER_FILE))
        _maybe_save_adapter(self.raw, os.path.join(tmp, "adapter"))
        if self.state.best_weights.tensors:
            save_file(self.state.best_weights.tensors, os.path.join(tmp, BEST_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as fh:
            json.dump(self._state_json(), fh, indent=1)

    def save_checkpoint(self) -> str:
        """Write ``output_dir/checkpoint`` through ``.checkpoint.tmp`` and two renames (the
        previous one is kept as ``.checkpoint.old`` in between); returns its path."""
        root, acc, is_main = self.ckpt_root, self.accelerator, self.plan.is_main
        assert root is not None  # _checkpoint_due is False without output_dir
        final = os.path.join(root, CHECKPOINT_NAME)
        tmp = os.path.join(root, "." + CHECKPOINT_NAME + ".tmp")
        old = os.path.join(root, "." + CHECKPOINT_NAME + ".old")
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        torch.save(rng_state(), os.path.join(tmp, f"rng_state_{self.plan.rank}.pt"))
        opt_state = self.backend.optimizer_state(self.pmodel, self.optimizer)  # gathered when sharded
        with gathered_trainable(self.raw, self.backend) as full:  # full tensors in the model while it is saved
            if is_main:
                self._write_main_files(tmp, opt_state, full)
        acc.wait_for_everyone()
        if is_main:
            if os.path.isdir(final):
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                fault_point("checkpoint.between_renames")  # kill tests: only .checkpoint.old is complete
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            fault_point("checkpoint.written")  # kill tests: between two checkpoints
        acc.wait_for_everyone()
        return final

    def _check_resumable(self, found: str, st: dict[str, Any]) -> None:
        names = [k for k, _ in self.named_trainable]
        if st["trainable_names"] != names:
            raise UserError(
                f"checkpoint {found} holds trainable parameters {st['trainable_names'][:3]}... "
                f"({len(st['trainable_names'])}) that do not match the model's ({len(names)}); "
                "resume needs the same model, adapter config and modules_to_save"
            )
        if st.get("sharding", "none") != self.backend.name:
            raise UserError(f"checkpoint {found} was written with sharding {st.get('sharding', 'none')!r}; this run "
                             f"uses {self.backend.name!r}: resume under the same sharding")
        plan = self.plan
        if st["world_size"] != plan.world or st["global_batch_size"] != plan.global_batch \
                or st["total_steps"] != plan.total:
            raise UserError(
                f"checkpoint {found} was written with world_size={st['world_size']}, "
                f"global batch {st['global_batch_size']}, {st['total_steps']} steps; this run has "
                f"world_size={plan.world}, global batch {plan.global_batch}, {plan.total} steps: "
                "they must match to resume"
            )

    def _read_resume(self) -> dict[str, Any] | None:
        """With ``resume``: read the checkpoint (every file read, and refused, before any state
        is set, so a refused file changes nothing) and copy its trainable weights into the
        model, which is not prepared (sharded) yet. Returns the rest for ``_apply_resume``."""
        if not self.args.resume:
            return None
        assert self.ckpt_root is not None  # TrainArgs refuses resume without output_dir
        found = find_checkpoint(self.ckpt_root)
        if found is None:
            if self.plan.is_main:  # the first start of a job that always passes resume=True
                # stacklevel: _read_resume <- _Run.__init__ <- fit <- keeps_caller_rng <- the caller
                warnings.warn(f"resume=True but {self.ckpt_root!r} holds no complete checkpoint "
                              f"({CHECKPOINT_NAME}/{STATE_FILE}): starting from step 0", UserWarning, stacklevel=5)
            return None
        with open(os.path.join(found, STATE_FILE)) as fh:
            st = json.load(fh)
        self._check_resumable(found, st)
        scaler_path = os.path.join(found, SCALER_FILE)
        refused: UserError | None = None
        try:  # a scaler.pt is read whenever present, so that no state file is left unchecked
            loaded = {
                "found": found, "json": st,
                "optimizer": load_state(os.path.join(found, OPTIM_FILE)),
                "scheduler": load_state(os.path.join(found, SCHED_FILE)),
                "rng": load_state(os.path.join(found, f"rng_state_{self.plan.rank}.pt")),
                "scaler": load_state(scaler_path) if os.path.isfile(scaler_path) else None,
                "best": (load_weights(os.path.join(found, BEST_FILE), self.named_trainable)
                         if os.path.isfile(os.path.join(found, BEST_FILE)) else None),
            }
            weights = load_weights(os.path.join(found, WEIGHTS_FILE), self.named_trainable)
            saved_scaler, scales = loaded["scaler"] is not None, self.accelerator.scaler is not None
            if saved_scaler != scales:  # a fresh or a dropped loss scale would not continue the run exactly
                raise UserError(f"refusing to resume from {found}: it {'has' if saved_scaler else 'has no'} "
                                f"{SCALER_FILE} (fp16 loss scaling) but this run (mixed_precision={self.mp!r}) "
                                f"{'has none' if saved_scaler else 'scales the loss'}: resume with the precision "
                                "it was written with")
        except UserError as err:
            refused = err
        refuse_everywhere(refused, found, self.device)  # a refusal on one process stops them all
        copy_into(self.model, weights)
        return loaded

    def _apply_resume(self, loaded: dict[str, Any]) -> None:
        """Optimizer, schedule, scaler, RNG and training state of a checkpoint read by ``_read_resume``."""
        self.backend.load_optimizer_state(self.pmodel, self.optimizer, loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["scheduler"])
        if loaded["scaler"] is not None:
            self.accelerator.scaler.load_state_dict(loaded["scaler"])
        set_rng_state(loaded["rng"])
        st = loaded["json"]
        self.state.load_json(st)
        if loaded["best"] is not None:
            self.state.best_weights.tensors, self.state.best_weights.step = loaded["best"], st["best_step"]
        self.state.last_ckpt = loaded["found"]

    # ------------------------------------------------------------------ the loop

    def _loop(self, progress: Progress) -> None:
        st = self.state
        while st.step < self.plan.total and not st.stopped_early and not self._paused():
            rec = self.train_step()
            if self._eval_due():
                st.last_eval = self.evaluate()
                rec.update(st.last_eval)
                if self.track_best:
                    st.observe_eval(st.last_eval, self.args, self.named_trainable)
            st.history.append(rec)
            progress.log(rec, st.last_eval)
            if self._checkpoint_due():
                st.last_ckpt = self.save_checkpoint()

    def _finish(self) -> bool:
        """A run that stops early (or resumes a finished checkpoint) ends with its last eval;
        a run without eval_every still gets one final evaluation. Returns whether the best
        weights were put back (``restore_best``)."""
        st = self.state
        if self._paused():
            return False  # a paused run is a prefix: no final evaluation, nothing restored
        if self.eval_fn is not None and not st.last_eval:
            st.last_eval = self.evaluate()
            if st.history:
                st.history[-1].update(st.last_eval)
        best_step = st.best_weights.step
        restored = self.args.restore_best and best_step is not None and best_step != st.step
        if restored:
            st.best_weights.restore(self.raw)
            # The final metrics are those of the restored weights: the best evaluation's.
            st.last_eval = next((dict((k, h[k]) for k in st.last_eval) for h in st.history if h["step"] == best_step),
                                st.last_eval)
        return restored

    def _release(self) -> None:
        """Undo what prepare() did to the caller's model (autocast wrapper, device); a sharded
        model stays sharded (``asymlora.training.sharding.save_adapter_gathered`` saves it)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = self.backend.release(self.pmodel, self.orig_device)
        model.train(self.was_training)
        acc.free_memory()

    def run(self) -> FitResult:
        kind = peak_memory_start(self.device)
        t0 = time.perf_counter()
        progress = Progress(self.args, self.plan.total, self.state.step, self.plan.is_main)
        self.pmodel.train()
        self.tracker = SavedTensorBytes(storage_ptrs(self.raw))
        try:
            self._loop(progress)
            restored = self._finish()
        finally:
            progress.close()
            wall = time.perf_counter() - t0
            peak = peak_memory_end(self.device, kind)
            self._release()
        return self._result(wall, peak, kind, restored)

    def _result(self, wall: float, peak: int, kind: str, restored: bool) -> FitResult:
        st, plan = self.state, self.plan
        final = dict(st.last_eval)
        tail = [h["loss"] for h in st.history[-max(1, min(10, len(st.history))):]] if st.history else []
        if tail:
            final["train_loss"] = float(np.mean(tail))
        return FitResult(
            history=st.history, final_metrics=final, steps=st.step, wall_time_s=wall,
            peak_memory_bytes=peak, trainable_params=self.trainable_params, peak_memory_kind=kind,
            total_steps=plan.total, stopped_early=st.stopped_early, best_metric=st.best,
            best_step=st.best_weights.step if self.args.restore_best else None, restored_best=restored,
            resumed_from_step=st.resumed_from, checkpoint_dir=st.last_ckpt, world_size=plan.world,
            global_batch_size=plan.global_batch, saved_activation_bytes=self.tracker.peak,
            sharding=self.backend.name, paused=self._paused(),
        )


# ----------------------------------------------------------------------------- fit


@keeps_caller_rng
def fit(
    model: nn.Module,
    train_dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    args: TrainArgs,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    make_optimizer: Callable[[Sequence[tuple[str, nn.Parameter]]], torch.optim.Optimizer] | None = None,
) -> FitResult:
    """Train the ``requires_grad`` parameters of ``model`` on ``train_dataset``.

    ``collate_fn`` turns a list of examples into a dict of tensors; the default loss is
    ``model(**batch).loss`` (a mean over the micro-batch). ``eval_fn(model)`` returns a
    dict of floats; it runs on the main process in eval mode under ``torch.no_grad`` every
    ``eval_every`` steps and at the end, and its results are shared with all processes.
    The model is trained in place; on return it is back on its original device. The global
    RNG states are seeded from ``args.seed`` during the run and restored on return.
    ``make_optimizer(named_trainable)`` replaces the default AdamW (e.g. PEFT's LoRA-FA
    optimizer); the lr schedule drives whatever it returns.
    """
    if not isinstance(args, TrainArgs):
        raise UserError(f"args must be a TrainArgs, got {type(args).__name__}")
    args.validate()
    if len(train_dataset) == 0:
        raise UserError("train_dataset is empty: need at least one example")
    return _Run(model, train_dataset, collate_fn, args, eval_fn, loss_fn, make_optimizer).run()


def _maybe_save_adapter(model: nn.Module, path: str) -> None:
    """Also store the asymlora adapter files (usable with ``load_adapter``) when the model
    is wrapped. Silently skipped when the core is unavailable or nothing is wrapped."""
    try:
        from asymlora.core.inject import lora_layers
        from asymlora.formats.native import save_adapter

        layers = lora_layers(model)
    except (ImportError, AttributeError):
        return
    if layers:
        save_adapter(model, path)
