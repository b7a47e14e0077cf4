"""asymlora: asymmetric low-rank adaptation (Zhu et al., "Asymmetry in Low-Rank Adapters of
Foundation Models", ICML 2024). The daily path, on any transformers model::

    import asymlora
    cfg = asymlora.AsymLoraConfig.preset("b-only", r=8)      # A: frozen random orthonormal, B: trained
    model = asymlora.wrap(model, cfg)
    print(asymlora.parameter_report(model))
    asymlora.fit(model, train_ds, collate, asymlora.TrainArgs(lr=3e-3, max_steps=240))
    asymlora.save_adapter(model, "out/adapter")               # B + seed: A is rebuilt on load
    asymlora.export_peft(model, "out/peft")                   # PeftModel.from_pretrained reads it

Several named adapters on one model, weighted merges and PEFT's multi-adapter layout live in
``asymlora.adapters``; everything else in named submodules (layout: docs/design.md §3).
"""
from asymlora.core.config import PRESETS, AsymLoraConfig
from asymlora.core.inject import merge_and_unload, parameter_report, unload, wrap
from asymlora.core.quant import quantize_model
from asymlora.errors import UserError
from asymlora.formats.native import load_adapter, save_adapter
from asymlora.formats.peft import export_peft, import_peft
from asymlora.training.loop import TrainArgs, fit
from asymlora.version import __version__

__all__ = [
    "AsymLoraConfig",
    "PRESETS",
    "wrap",
    "parameter_report",
    "fit",
    "TrainArgs",
    "save_adapter",
    "load_adapter",
    "export_peft",
    "import_peft",
    "merge_and_unload",
    "unload",
    "quantize_model",
    "UserError",
    "__version__",
]
