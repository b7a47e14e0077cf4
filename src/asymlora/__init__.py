"""asymlora: asymmetric low-rank adaptation (Zhu et al., "Asymmetry in Low-Rank Adapters of
Foundation Models", ICML 2024).

    import asymlora
    cfg = asymlora.AsymLoraConfig.preset("b-only", r=8)      # A: frozen random orthonormal, B: trained
    model = asymlora.wrap(model, cfg)
    print(asymlora.parameter_report(model))
    asymlora.save_adapter(model, "out/adapter")               # B + seed: A is rebuilt on load
    asymlora.add_weighted_adapter(model, ["t1", "t2"], [1, -0.5], "mix")  # exact for b-only, one seed
"""
__version__ = "0.1.0"

from .config import PRESETS, AsymLoraConfig  # noqa: E402
from .inject import (  # noqa: E402
    ParameterReport,
    default_targets,
    disable_adapters,
    find_target_modules,
    lora_layers,
    mark_only_adapters_trainable,
    merge_adapters,
    merge_and_unload,
    parameter_report,
    unload,
    unmerge_adapters,
    wrap,
)
from .layer import BASE_ONLY, DEFAULT_ADAPTER, LoraLinear  # noqa: E402
from .adapters import active_adapters, add_adapter, delete_adapter, list_adapters, set_adapter  # noqa: E402
from .multi import mixed_batch  # noqa: E402
from .checkpoint import (  # noqa: E402
    convert_to_peft,
    export_peft,
    export_peft_adapters,
    import_peft,
    load_adapter,
    load_factors,
    save_adapter,
)
from .merging import add_weighted_adapter, save_weighted_adapter  # noqa: E402

__all__ = [
    "AsymLoraConfig",
    "PRESETS",
    "LoraLinear",
    "ParameterReport",
    "wrap",
    "unload",
    "merge_and_unload",
    "merge_adapters",
    "unmerge_adapters",
    "disable_adapters",
    "lora_layers",
    "find_target_modules",
    "default_targets",
    "mark_only_adapters_trainable",
    "parameter_report",
    "save_adapter",
    "load_adapter",
    "load_factors",
    "export_peft",
    "convert_to_peft",
    "import_peft",
    "export_peft_adapters",
    "DEFAULT_ADAPTER",
    "BASE_ONLY",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "list_adapters",
    "active_adapters",
    "mixed_batch",
    "add_weighted_adapter",
    "save_weighted_adapter",
]
