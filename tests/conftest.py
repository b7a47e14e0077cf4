"""Shared fixtures: tiny transformers models built from configs (no downloads)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch


def tiny_bert(num_labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     vocab_size=64, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


MODEL_BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 64, (2, 9), generator=g)


def perturb_trained_factors(model, seed: int = 1) -> None:
    """Give trained factors non-zero values so the adapter actually changes outputs."""
    import asymlora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in asymlora.lora_layers(model).values():
            for p in layer.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
