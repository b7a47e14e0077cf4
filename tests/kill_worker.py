"""A process for tests/test_kills.py to SIGKILL while it writes an adapter folder. Not a test module.

    python kill_worker.py adapter TARGET VERSION [--no-exchange]   save adapter VERSION to TARGET
    python kill_worker.py peft ADAPTER TARGET [--no-exchange]      convert_to_peft(ADAPTER, TARGET)
    python kill_worker.py loop TARGET READY                         save versions 1, 2, 1, 2, ... to
                                                                    TARGET until killed (READY: a file
                                                                    written after the first save)

``--no-exchange`` takes away the one-step folder swap (Linux ``renameat2``), as on a system
without it, so that the two-rename fallback is what gets killed. The stopping point itself is
chosen by the test through ``ASYMLORA_FAULT_PAUSE`` (``asymlora.fileio.fault_point``).
"""
from __future__ import annotations

import sys

import torch


def base_model() -> torch.nn.Module:
    """A tiny BERT classifier (the same weights every time)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     vocab_size=64, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def adapter_model(version: int) -> torch.nn.Module:
    """``base_model`` with a b-only adapter whose B factors and classifier depend on ``version``
    (same config, so only the values tell two versions apart)."""
    from asymlora.core.config import AsymLoraConfig
    from asymlora.core.inject import wrap

    model = wrap(base_model(), AsymLoraConfig.preset("b-only", r=4, modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(version)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def main(argv: list[str]) -> None:
    import asymlora.fileio
    from asymlora.formats.native import save_adapter
    from asymlora.formats.peft import convert_to_peft

    if "--no-exchange" in argv:
        argv.remove("--no-exchange")
        asymlora.fileio._renameat2 = lambda: None  # type: ignore[assignment]
    mode = argv[0]
    if mode == "adapter":
        save_adapter(adapter_model(int(argv[2])), argv[1])
    elif mode == "peft":
        convert_to_peft(argv[1], argv[2])
    elif mode == "loop":
        models = [adapter_model(1), adapter_model(2)]
        save_adapter(models[0], argv[1])
        open(argv[2], "w").close()
        i = 1
        while True:
            save_adapter(models[i % 2], argv[1])
            i += 1
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
