"""The random-number state of a process (python, numpy, torch, CUDA): saved into a checkpoint,
restored on resume, and left as the caller had it by ``fit``."""
from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch

from asymlora.training.args import FitResult


def rng_state() -> dict[str, Any]:
    # the global RandomState is an MT19937, whose legacy state is a tuple (never the dict form)
    np_state = cast(tuple[Any, ...], np.random.get_state())
    py_state = random.getstate()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keeps_caller_rng(fn: Callable[..., FitResult]) -> Callable[..., FitResult]:
    """``fit`` seeds the global python / numpy / torch (/ CUDA) RNGs from ``args.seed`` and
    draws from them (dropout); put the caller's states back on return or raise, so a call to
    ``fit`` does not change what the caller's own random draws give afterwards."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> FitResult:
        caller = rng_state()
        try:
            return fn(*args, **kwargs)
        finally:
            set_rng_state(caller)

    return wrapper
