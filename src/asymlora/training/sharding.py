"""Sharded training for ``asymlora.training.loop.fit``: FSDP2 and DeepSpeed ZeRO-2/3.

What a sharded run asks of the engine, and how this module answers it:

* **Which sharding.** ``TrainArgs.sharding`` ("fsdp2", "zero2", "zero3"), or an Accelerate
  launch configured for FSDP (``fsdp_version: 2``) or DeepSpeed (``zero_stage: 2|3``), read from
  the environment that ``accelerate launch`` sets. ``resolve_sharding`` refuses, with a
  ``UserError``, every case where the sharding asked for would not be in force: a conflict
  between the two, FSDP1 or ZeRO-0/1, a single process, and Accelerate's own silent fallback
  (with an FSDP or DeepSpeed config but no GPU, Accelerate runs plain data parallel:
  ``is_fsdp2`` False, nothing sharded). ``check_in_force`` verifies the result after the model
  is prepared (every trainable parameter sharded over all processes).
* **Who shards.** The engine itself, the same way on CPU (gloo) and GPU (NCCL):
  ``torch.distributed.fsdp.fully_shard`` on every transformer block (the classes named in
  ``model._no_split_modules``, else the children of each ``nn.ModuleList``) and on the root, over
  a 1-d device mesh of all processes; or ``deepspeed.initialize`` with a ZeRO config built from
  ``TrainArgs``. Accelerate's ``prepare`` is not used for sharded runs.
* **Frozen factors stay out of the optimizer.** The optimizer is built from the
  ``requires_grad`` parameters only (after sharding, from the sharded parameters): a frozen
  A is a buffer (replicated, never sharded, never optimised) and a frozen base weight is a
  parameter with ``requires_grad=False`` (sharded to save memory, never optimised).
* **Full tensors on save.** ``gathered_trainable`` collects every trainable parameter as one
  full tensor (``DTensor.full_tensor()``; ``deepspeed.zero.GatheredParameters`` under ZeRO-3)
  and puts them in the model for the time of a save, so that ``asymlora.save_adapter`` (on
  rank 0) writes the same unsharded file as a one-process run: seed-only frozen factors,
  fingerprints and all. ``save_adapter_gathered`` does that for a caller after ``fit``.
* **Optimizer state** is saved gathered as well, keyed by parameter name (FSDP2 through
  ``torch.distributed.checkpoint.state_dict``; ZeRO through ``deepspeed.utils.safe_get_full_*``),
  and read back with ``torch.load(weights_only=True)`` on resume under the same sharding.

Only what runs on CPU was tested here (2 processes, gloo): the engine's FSDP2 and ZeRO-2/3 paths.
The NCCL/GPU launch is the same code on another device type.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from asymlora.errors import UserError

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

SHARDINGS = ("none", "fsdp2", "zero2", "zero3")
SHARDED = SHARDINGS[1:]

OptimizerFactory = Callable[[Sequence[tuple[str, nn.Parameter]]], torch.optim.Optimizer]


# ----------------------------------------------------------------------------- what was asked


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launcher_request() -> str | None:
    """The sharding an ``accelerate launch`` config asked for, from the environment it sets:
    ``ACCELERATE_USE_FSDP`` with ``FSDP_VERSION`` → "fsdp1"/"fsdp2"; ``ACCELERATE_USE_DEEPSPEED``
    with ``ACCELERATE_DEEPSPEED_ZERO_STAGE`` (or the stage in ``ACCELERATE_DEEPSPEED_CONFIG_FILE``)
    → "zero<stage>"; else None."""
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp" + os.environ.get("FSDP_VERSION", "1").strip()
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if stage is None and path not in ("", "none") and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                stage = str(json.load(fh).get("zero_optimization", {}).get("stage", ""))
        return "zero" + (stage or "?").strip()
    return None


# Accelerate launch settings the engine does not apply: asking for one is refused, not ignored.
_UNAPPLIED = {"FSDP_OFFLOAD_PARAMS": "fsdp_offload_params",
              "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing",
              "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "offload_optimizer_device",
              "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "offload_param_device"}


def _unapplied_settings() -> list[str]:
    return [f"{key}: {os.environ[env]}" for env, key in _UNAPPLIED.items()
            if os.environ.get(env, "").strip().lower() not in ("", "false", "none", "0")]


def accelerate_in_force(accelerator: Any) -> str | None:
    """The sharding Accelerate's own state realises ("fsdp1", "fsdp2", "zero<stage>") or None."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return None


def resolve_sharding(asked: str | None, accelerator: Any) -> str:
    """The sharding this run uses ("none", "fsdp2", "zero2", "zero3"), or a ``UserError`` when
    what was asked for would not be in force (see the module docstring)."""
    launcher = launcher_request()
    realised = accelerate_in_force(accelerator)
    if asked is not None and launcher is not None and asked != launcher:
        raise UserError(f"TrainArgs.sharding={asked!r} but the Accelerate launch config asks for {launcher!r}: "
                        "ask for one sharding (drop one of the two)")
    unapplied = _unapplied_settings() if launcher is not None else []
    if unapplied:
        raise UserError(f"the Accelerate launch config sets {', '.join(unapplied)}, which asymlora's sharding does "
                        "not apply (it takes only the FSDP version or ZeRO stage): remove it from the config")
    if asked is None and launcher is not None and realised != launcher:
        raise UserError(
            f"the Accelerate launch config asks for {launcher!r} but Accelerate runs "
            f"{accelerator.distributed_type} ({accelerator.num_processes} process(es), device "
            f"{accelerator.device.type}): without a GPU Accelerate falls back to plain data parallel and would "
            f"shard nothing. Set TrainArgs.sharding={launcher!r} to let asymlora shard "
            "the model itself over these processes, or launch on GPUs")
    want = asked or launcher or realised or "none"
    if want not in SHARDINGS:
        raise UserError(f"sharding {want!r} is not supported: use one of {', '.join(SHARDED)} "
                        "(Accelerate config: fsdp_version: 2, or a DeepSpeed zero_stage of 2 or 3)")
    if want != "none" and accelerator.num_processes < 2:
        raise UserError(f"sharding {want!r} needs at least 2 processes (launch with `accelerate launch` or "
                        "`torchrun --nproc_per_node N`); this is a single process, so nothing would be sharded")
    return want


# ----------------------------------------------------------------------------- backends


class Replicated:
    """One process, or data parallel through Accelerate (DDP): every process holds everything."""

    name = "none"
    eval_everywhere = False  # eval_fn on the main process only

    def __init__(self, accelerator: Any, args: Any, mixed_precision: str = "no") -> None:
        self.accelerator, self.args, self.mp = accelerator, args, mixed_precision

    def prepare(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
        """(model to call, optimizer to step, the torch optimizer its lr schedule drives)."""
        optimizer = make_optimizer(_named_trainable(model))
        pmodel, poptimizer = self.accelerator.prepare(model, optimizer)
        return pmodel, poptimizer, optimizer

    def unwrap(self, pmodel: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(pmodel)

    def no_sync(self, pmodel: nn.Module) -> Any:
        return self.accelerator.no_sync(pmodel)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def step(self, optimizer: Any) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def full_tensor(self, p: torch.Tensor) -> torch.Tensor:
        return p.detach()

    def release(self, pmodel: nn.Module, device: torch.device) -> nn.Module:
        """Undo what prepare() did to the caller's model (autocast wrapper, device)."""
        model = self.accelerator.unwrap_model(pmodel, keep_fp32_wrapper=False)
        model.to(device)
        return model


class FSDP2(Replicated):
    """``fully_shard`` on each transformer block and on the root, over all processes."""

    name = "fsdp2"
    eval_everywhere = True  # a sharded forward needs every process (all-gathers)

    def prepare(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = self.accelerator.device
        model.to(device)
        mesh = init_device_mesh(device.type, (self.accelerator.num_processes,))
        kw: dict[str, Any] = {"mesh": mesh}
        if self.mp == "bf16":  # bf16 compute, fp32 master weights and reductions
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in shard_units(model):
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        optimizer = make_optimizer(_named_trainable(model))  # over the sharded (DTensor) parameters
        return model, optimizer, optimizer

    def unwrap(self, pmodel: nn.Module) -> nn.Module:
        return pmodel

    @contextlib.contextmanager
    def no_sync(self, pmodel: nn.Module) -> Iterator[None]:
        fsdp_model = cast("FSDPModule", pmodel)  # fully_shard made it one; nn.Module does not say so
        fsdp_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            fsdp_model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def clip_grad_norm(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))

    def full_tensor(self, p: torch.Tensor) -> torch.Tensor:
        # a sharded parameter is a DTensor (torch types detach() as returning a plain Tensor)
        return cast(Any, p.detach()).full_tensor() if hasattr(p, "full_tensor") else p.detach()

    def release(self, pmodel: nn.Module, device: torch.device) -> nn.Module:
        return pmodel  # stays sharded: save with save_adapter_gathered


class DeepSpeedZero(Replicated):
    """``deepspeed.initialize`` with ZeRO stage 2 (optimizer state and gradients partitioned)
    or 3 (parameters too). Accumulation: the engine's boundary is set per micro-batch and the
    loss passed in is already divided by the number of micro-batches; clipping is DeepSpeed's
    (``gradient_clipping`` = ``max_grad_norm``), and the norm is computed from the full
    gradients before the step, so that a non-finite one stops the run before the update."""

    eval_everywhere = True

    def __init__(self, accelerator: Any, args: Any, stage: int, mixed_precision: str = "no") -> None:
        super().__init__(accelerator, args, mixed_precision)
        self.stage = stage
        self.name = f"zero{stage}"
        self.engine: Any = None

    def config(self) -> dict[str, Any]:
        a, world = self.args, self.accelerator.num_processes
        return {
            "train_micro_batch_size_per_gpu": a.batch_size,
            "gradient_accumulation_steps": a.grad_accum,
            "train_batch_size": a.batch_size * a.grad_accum * world,
            "gradient_clipping": a.max_grad_norm or 0.0,
            "zero_optimization": {"stage": self.stage},
            "bf16": {"enabled": self.mp == "bf16"},
            "fp16": {"enabled": self.mp == "fp16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def prepare(
        self, model: nn.Module, make_optimizer: OptimizerFactory
    ) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
        import deepspeed

        model.to(self.accelerator.device)
        optimizer = make_optimizer(_named_trainable(model))
        engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config(),
                                                            dist_init_required=False)
        self.engine = engine
        return engine, zero_optimizer, optimizer

    def unwrap(self, pmodel: nn.Module) -> nn.Module:
        return cast(nn.Module, pmodel.module)  # the DeepSpeed engine's wrapped model

    def no_sync(self, pmodel: nn.Module) -> Any:
        return contextlib.nullcontext()  # ZeRO-2/3 reduce every micro-batch; the boundary says when to step

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        from deepspeed.utils import safe_get_full_grad

        total = torch.zeros((), dtype=torch.float64)
        for p in params:
            g = safe_get_full_grad(p)
            if g is not None:
                total += g.detach().double().pow(2).sum().cpu()
        return float(total.sqrt())  # the clipping itself happens in engine.step()

    def step(self, optimizer: Any) -> None:
        self.engine.step()  # clip, update, zero the gradients

    def _named(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(k, p) for k, p in self.unwrap(model).named_parameters() if p.requires_grad]

    def optimizer_state(self, model: nn.Module, optimizer: Any) -> dict[str, Any]:
        from deepspeed.utils import safe_get_full_optimizer_state

        state = {}
        for name, p in self._named(model):
            state[name] = {key: safe_get_full_optimizer_state(p, key).detach().cpu().clone()
                           for key in ("exp_avg", "exp_avg_sq")}
        lrs = [g["lr"] for g in optimizer.optimizer.param_groups]
        return {"state": state, "step": _adam_step(optimizer), "lrs": lrs}

    def load_optimizer_state(self, model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        _ensure_adam_state(optimizer)
        for name, p in self._named(model):
            for key, value in state["state"][name].items():
                safe_set_full_optimizer_state(p, value.to(self.accelerator.device), key)
        _set_adam_step(optimizer, int(state["step"]))
        for group, lr in zip(optimizer.optimizer.param_groups, state["lrs"]):  # the rate of the next step
            group["lr"] = lr

    def full_tensor(self, p: torch.Tensor) -> torch.Tensor:
        if hasattr(p, "ds_id"):  # ZeRO-3: partitioned
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.detach().clone()
        return p.detach()

    def release(self, pmodel: nn.Module, device: torch.device) -> nn.Module:
        return cast(nn.Module, pmodel.module)  # the DeepSpeed engine's wrapped model


def _adam_step(optimizer: Any) -> int:
    """The number of steps the (inner) Adam optimizer of a ZeRO optimizer has taken."""
    inner = getattr(optimizer, "optimizer", optimizer)
    steps = [int(s["step"]) for s in inner.state.values() if "step" in s]
    return max(steps) if steps else 0


def _ensure_adam_state(optimizer: Any) -> None:
    """torch's AdamW creates its state at the first step; a resume before any step of this
    process needs it to exist (zeros, step 0) on the flat fp32 partitions that ZeRO steps
    (stage 3: ``fp32_partitioned_groups_flat``; stage 2: ``single_partition_of_fp32_groups``,
    whose per-parameter views DeepSpeed links lazily) so that the saved moments can be
    written into them. Internals of DeepSpeed 0.19 (the version pinned in the extras)."""
    inner = optimizer.optimizer
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None) or optimizer.single_partition_of_fp32_groups
    for p in flats:
        state = inner.state[p]  # a defaultdict(dict)
        state.setdefault("step", torch.tensor(0.0))
        for key in ("exp_avg", "exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _set_adam_step(optimizer: Any, step: int) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    for s in inner.state.values():
        if "step" in s:
            s["step"] = torch.tensor(float(step)) if torch.is_tensor(s["step"]) else step


def make_backend(sharding: str, accelerator: Any, args: Any, mixed_precision: str) -> Replicated:
    """The backend for a resolved sharding (see ``resolve_sharding``)."""
    if sharding == "fsdp2":
        if mixed_precision == "fp16":
            raise UserError("sharding 'fsdp2' with mixed_precision 'fp16' is not supported (no loss scaling on "
                            "sharded gradients here): use 'bf16'")
        return FSDP2(accelerator, args, mixed_precision)
    if sharding in ("zero2", "zero3"):
        return DeepSpeedZero(accelerator, args, int(sharding[-1]), mixed_precision)
    return Replicated(accelerator, args, mixed_precision)


# ----------------------------------------------------------------------------- helpers


def _named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` wraps before the root: instances of the classes a
    transformers model names in ``_no_split_modules`` (its decoder/encoder blocks), else the
    children of every ``nn.ModuleList``. Each unit's parameters are gathered for its own forward
    only, so the peak holds one block's full weights."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in names] if names else []
    if not units:
        units = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    return units


def check_in_force(backend: Replicated, model: nn.Module, world: int) -> None:
    """After prepare: every trainable parameter is sharded over all ``world`` processes (a
    DTensor over a mesh of that size under FSDP2; a ZeRO engine of the asked stage), else a
    ``UserError`` naming the first one that is not."""
    if backend.name == "fsdp2":
        for name, p in _named_trainable(model):
            mesh = getattr(p, "device_mesh", None)
            if mesh is None or mesh.size() != world:
                raise UserError(f"sharding 'fsdp2' is not in force: trainable parameter {name} is not sharded over "
                                f"the {world} processes ({type(p).__name__})")
    elif isinstance(backend, DeepSpeedZero):
        stage = backend.engine.zero_optimization_stage()
        if stage != backend.stage:
            raise UserError(f"sharding 'zero{backend.stage}' is not in force: DeepSpeed runs ZeRO stage {stage}")


@contextlib.contextmanager
def gathered_trainable(model: nn.Module, backend: Replicated) -> Iterator[dict[str, torch.Tensor]]:
    """Collective (every process enters): every trainable parameter of ``model`` (unwrapped)
    as a full tensor, in the model for the duration of the block (so ``save_adapter`` sees an
    unsharded model), then the sharded parameters put back. Yields {name: full tensor}."""
    named = _named_trainable(model)
    full = {name: backend.full_tensor(p) for name, p in named}
    if backend.name == "none":
        yield full
        return
    swapped = []
    for name, _ in named:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        swapped.append((owner, attr, owner._parameters[attr]))
        owner._parameters[attr] = nn.Parameter(full[name], requires_grad=True)
    try:
        yield full
    finally:
        for owner, attr, original in swapped:
            owner._parameters[attr] = original


def save_adapter_gathered(model: nn.Module, directory: str | os.PathLike, backend: Replicated | None = None,
                          **save_kw: Any) -> None:
    """Collective ``asymlora.save_adapter`` for a model that ``fit`` left sharded: every process
    calls it, the trainable factors are gathered to full tensors, rank 0 writes (atomically,
    as ``save_adapter`` does) and the others wait. The file equals a one-process run's."""
    import torch.distributed as dist

    from asymlora.formats.native import save_adapter

    backend = backend or _backend_of(model)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    with gathered_trainable(model, backend):
        if rank == 0:
            save_adapter(model, directory, **save_kw)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _backend_of(model: nn.Module) -> Replicated:
    """A backend that can gather ``model``'s parameters, from what they are."""
    params = [p for p in model.parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for p in params):
        return DeepSpeedZero(None, None, 3)
    if any(hasattr(p, "full_tensor") for p in params):
        return FSDP2(None, None)
    return Replicated(None, None)
