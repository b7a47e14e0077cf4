"""A strategy from the user's own Python code: ``--strategies lora,mypkg.mod:mine`` (a module on
the import path) or ``--strategies lora,path/to/file.py:mine``.

``mine`` is one of:

- a :class:`asymlora.strategies.base.Strategy` (full control: lr scale, saving, …);
- a factory ``mine(model, request) -> nn.Module | peft.PeftConfig``: it adapts ``model`` in place
  or returns the adapted model (and freezes what it does not train), or returns a PEFT config
  that is applied with PEFT exactly like the ``peft:`` rows (the head added to its
  ``modules_to_save``).

It runs under the same protocol as ours: the same seeds, its own learning rate from the grid,
the same cost columns (its file is the safetensors of what it trains, or PEFT's adapter folder).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Any

from torch import nn

from asymlora.errors import UserError
from asymlora.strategies.base import Adapted, AdaptRequest, Strategy

__all__ = ["is_user_name", "load_user_strategy"]


def is_user_name(name: str) -> bool:
    """``MODULE:ATTR`` or ``FILE.py:ATTR`` (``peft:…`` is PEFT's, not a module of the user's)."""
    mod, sep, attr = name.rpartition(":")
    return bool(sep and mod and attr) and mod != "peft"


def _import(module: str) -> Any:
    if module.endswith(".py"):
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise UserError(f"strategy module {module!r} is not a file")
        key = "asymlora_user_" + str(abs(hash(path)))
        if key in sys.modules:
            return sys.modules[key]
        spec = importlib.util.spec_from_file_location(key, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
        return mod
    if os.getcwd() not in sys.path:  # as `python -m` would: a package in the current folder is found
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise UserError(f"strategy module {module!r} cannot be imported ({err}); put it on PYTHONPATH or "
                        "name its .py file") from None


def _save_trained(model: nn.Module, folder: str) -> None:
    """What a user's method needs to keep: the tensors it trained, as one safetensors file."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, os.path.join(folder, "adapter.safetensors"))


def _from_factory(name: str, factory: Any) -> Strategy:
    def adapt(model: nn.Module, req: AdaptRequest) -> Adapted:
        out = factory(model, req)
        try:
            from peft import PeftConfig
        except ImportError:  # then it cannot be a PEFT config
            PeftConfig = ()  # type: ignore[assignment,misc]  # noqa: N806
        if isinstance(out, PeftConfig):
            from asymlora.strategies.peft_methods import apply_peft_config

            return Adapted(apply_peft_config(model, out, req))
        if out is None:
            out = model
        if not isinstance(out, nn.Module):
            raise UserError(f"strategy {name!r}: the factory returned {type(out).__name__}; return the adapted "
                            "model (an nn.Module) or a PEFT config")
        if req.head and _has(out, req.head):  # the head trains in every row, as in ours
            for p in out.get_submodule(req.head).parameters():
                p.requires_grad_(True)
        return Adapted(out)

    return Strategy(name=name, family="user", trains=f"what {name} leaves trainable",
                    same_r="what the factory makes of request.rank", adapt=adapt, save=_save_peft_or_trained)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _save_peft_or_trained(model: nn.Module, folder: str) -> None:
    save_pretrained = getattr(model, "save_pretrained", None)
    if hasattr(model, "peft_config") and callable(save_pretrained):
        save_pretrained(folder)
    else:
        _save_trained(model, folder)


@functools.cache
def load_user_strategy(name: str) -> Strategy:
    """The strategy named ``MODULE:ATTR``; a bad name is a one-line UserError."""
    module, _, attr = name.rpartition(":")
    obj = getattr(_import(module), attr, None)
    if obj is None:
        raise UserError(f"strategy {name!r}: module {module!r} has no {attr!r}")
    if isinstance(obj, Strategy):
        return Strategy(**{**obj.__dict__, "name": name, "family": "user"})
    if callable(obj):
        return _from_factory(name, obj)
    raise UserError(f"strategy {name!r}: {attr!r} is a {type(obj).__name__}; give a Strategy or a factory "
                    "(model, request) -> adapted model or PEFT config")
