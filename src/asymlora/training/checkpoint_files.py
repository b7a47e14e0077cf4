"""The files of a training checkpoint and how they are read back: weights-only loads (a folder from
someone else cannot run code on resume), weights matched by name, the newest checkpoint found."""
from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch

from asymlora.errors import UserError

CHECKPOINT_NAME = "checkpoint"


STATE_FILE = "trainer_state.json"


WEIGHTS_FILE = "trainable.safetensors"


OPTIM_FILE = "optimizer.pt"


SCHED_FILE = "scheduler.pt"


SCALER_FILE = "scaler.pt"


BEST_FILE = "best_trainable.safetensors"


def load_state(path: str) -> Any:
    """A checkpoint's optimizer / scheduler / scaler / RNG state, read with
    ``torch.load(weights_only=True)``: tensors, numbers, strings and plain containers only, so a
    checkpoint folder from someone else cannot run code on ``resume`` (everything saved here is
    of those types: ``rng_state`` keeps the Python and NumPy states as lists of ints)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"refusing to resume from {path}: it is not a plain state file (tensors, numbers, strings), "
            f"so it is not loaded ({first})"
        ) from err


def load_weights(path: str, named_trainable: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights, refused (one-line UserError naming the tensor) unless the
    file is readable and holds exactly the model's trainable parameters, each of its shape, a
    floating-point dtype and finite values."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors' own error types for a damaged or cut-short file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"refusing to resume from {path}: not a readable safetensors file ({first})") from err
    shapes = {k: tuple(p.shape) for k, p in named_trainable}
    for key in sorted(set(tensors) ^ set(shapes)):
        what = "is not a trainable parameter of the model" if key in tensors else "is missing"
        raise UserError(f"refusing to resume from {path}: tensor {key!r} {what}")
    for key, t in tensors.items():
        if not t.is_floating_point() or tuple(t.shape) != shapes[key]:
            raise UserError(f"refusing to resume from {path}: tensor {key!r} is {t.dtype} of shape {tuple(t.shape)}, "
                            f"expected a floating-point tensor of shape {shapes[key]}")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"refusing to resume from {path}: tensor {key!r} holds non-finite values (NaN or inf)")
    return tensors


def refuse_everywhere(refused: UserError | None, found: str, device: torch.device) -> None:
    """Raise ``refused`` here, and a UserError on every other process when any process refused
    its files (each reads its own rng_state_<rank>.pt): otherwise the others would go on into
    collectives that the refusing one never joins, and hang."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([dist.get_rank() + 1 if refused is not None else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if refused is None and int(flag):
            raise UserError(f"refusing to resume from {found}: process {int(flag) - 1} refused its state files "
                            "(its error names the file)")
    if refused is not None:
        raise refused


def find_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint folder, if any (a crash between the two renames of an
    update leaves the previous one under ``.checkpoint.old``)."""
    main = os.path.join(output_dir, CHECKPOINT_NAME)
    old = os.path.join(output_dir, "." + CHECKPOINT_NAME + ".old")
    for cand in (main, old):
        if os.path.isfile(os.path.join(cand, STATE_FILE)):
            return cand
    return None
