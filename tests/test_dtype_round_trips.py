"""dtype round trips, each against a float64 reference: the model's logits with the same adapter
computed in float64 (base weights and factors cast up, nothing rounded on the way). An adapter
saved from a bf16/fp16 base and loaded onto an fp32 one (and the reverse), exported to PEFT from
bf16 and imported back, and merged into a bf16 base with merge_and_unload, computes what the
float64 model computes, to the precision of the dtype it runs in."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import asymlora
from conftest import require

# relative tolerance of logits computed in a dtype (per-element rounding 2^-8 bf16, 2^-11 fp16,
# accumulated over two layers): measured errors are several times smaller
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def bert(dtype: torch.dtype = torch.float32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                     vocab_size=64, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def adapted(dtype: torch.dtype, preset: str = "b-only"):
    """A wrapped ``dtype`` base whose trained factors (and head) have non-trivial values."""
    model = asymlora.wrap(bert(dtype), asymlora.AsymLoraConfig.preset(preset, r=4, seed=3,
                                                                      modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=g) * 0.3).to(p.dtype))
    return model


IDS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def reference(folder: str) -> torch.Tensor:
    """The logits of the fp32 base's weights with the saved adapter, all in float64."""
    return logits(asymlora.load_adapter(bert(torch.float32).double(), folder))


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= RTOL[dtype], (dtype, err)


@pytest.mark.parametrize("saved_in,loaded_in", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_an_adapter_saved_in_one_dtype_loads_onto_another(tmp_path, saved_in, loaded_in):
    folder = asymlora.save_adapter(adapted(saved_in), str(tmp_path / "a"))
    want = reference(folder)
    close(logits(asymlora.load_adapter(bert(loaded_in), folder)), want, loaded_in)
    # and the adapter carried the trained values: without it the logits are far from the reference
    assert float((logits(bert(torch.float32)) - want).abs().max() / want.abs().max()) > 100 * RTOL[torch.float32]


def test_peft_export_from_bf16_and_import_back(tmp_path):
    peft = require("peft")
    model = adapted(torch.bfloat16, "lora")
    folder = asymlora.save_adapter(model, str(tmp_path / "a"))
    peft_dir = asymlora.export_peft(model, str(tmp_path / "peft"))
    want = reference(folder)
    close(logits(asymlora.import_peft(bert(torch.float32), peft_dir)), want, torch.float32)
    close(logits(asymlora.import_peft(bert(torch.bfloat16), peft_dir)), want, torch.bfloat16)
    close(logits(peft.PeftModel.from_pretrained(bert(torch.float32), peft_dir).eval()), want, torch.float32)


def test_merge_and_unload_into_a_bf16_base(tmp_path):
    model = adapted(torch.bfloat16)
    folder = asymlora.save_adapter(model, str(tmp_path / "a"))
    want = reference(folder)
    merged = asymlora.merge_and_unload(model)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    close(logits(merged), want, torch.bfloat16)
    merged32 = asymlora.merge_and_unload(asymlora.load_adapter(bert(torch.float32), folder))
    close(logits(merged32), want, torch.float32)
