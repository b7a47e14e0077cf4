"""Instruction tuning of causal LMs (the LLaMA family) under the fair protocol of
``asymlora compare``: ``data`` (QA pairs, chat template, response-only labels), ``model``
(response-only loss, generation), ``config``, ``run`` (one run), ``protocol`` (the whole
``asymlora sft``)."""
from asymlora.sft.config import SFT_DEFAULTS, SFT_QUICK, SFTConfig

__all__ = ["SFTConfig", "SFT_DEFAULTS", "SFT_QUICK", "run_sft"]


def run_sft(cfg: SFTConfig) -> dict:
    from asymlora.sft.protocol import run_sft as _run_sft

    return _run_sft(cfg)
