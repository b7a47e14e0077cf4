"""Several named adapters on one model: add, switch, delete, serve a mixed batch, merge a
weighted sum exactly, and write them all in PEFT's multi-adapter layout.

    from asymlora import adapters
    adapters.add_adapter(model, "task2", cfg)
    adapters.set_adapter(model, ["default", "task2"])
    with adapters.mixed_batch(model, ["default", "task2", "default"]): model(**batch)
    adapters.add_weighted_adapter(model, ["default", "task2"], [1.0, -0.5], "mix")  # exact for b-only

This module only gathers the verbs; they are implemented in ``asymlora.core`` (adapters,
routing) and ``asymlora.merging``.
"""
from asymlora.core.adapters import (
    active_adapters,
    add_adapter,
    delete_adapter,
    list_adapters,
    set_adapter,
)
from asymlora.core.inject import (
    disable_adapters,
    lora_layers,
    merge_adapters,
    unmerge_adapters,
)
from asymlora.core.layer import BASE_ONLY, DEFAULT_ADAPTER
from asymlora.core.multi import mixed_batch
from asymlora.formats.peft import export_peft_adapters
from asymlora.merging import add_weighted_adapter, save_weighted_adapter

__all__ = [
    "DEFAULT_ADAPTER",
    "BASE_ONLY",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "list_adapters",
    "active_adapters",
    "lora_layers",
    "disable_adapters",
    "merge_adapters",
    "unmerge_adapters",
    "mixed_batch",
    "add_weighted_adapter",
    "save_weighted_adapter",
    "export_peft_adapters",
]
