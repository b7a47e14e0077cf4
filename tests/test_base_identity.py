"""The adapter knows its base (``asymlora.formats.base_identity``): save_adapter records a sketch
of the adapted layers' base weights; load_adapter, import_peft, merge and eval compare it. Another
model of the same shapes (a random re-init, a sibling fine-tune) gets one warning naming both,
strict refuses before the model is touched; the same weights at another float precision, and
files saved before the record existed, load in silence."""
from __future__ import annotations

import json
import os
import re
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import asymlora
from asymlora.cli.main import main
from asymlora.core.inject import lora_layers
from asymlora.errors import BaseMismatchWarning, UserError
from asymlora.formats.base_identity import TOLERANCE, base_sketch, sketch_difference

needs_real = pytest.mark.needs_assets("minilm")


def bert(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     vocab_size=64, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def trained_adapter(path, base_seed: int = 0) -> str:
    model = asymlora.wrap(bert(base_seed), asymlora.AsymLoraConfig.preset("b-only", r=4, seed=1))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return asymlora.save_adapter(model, str(path))


def silent(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        return fn()


def test_the_sketch_tells_another_init_from_the_same_weights_at_another_precision():
    names = [n for n, m in bert().named_modules() if n.endswith(("query", "value"))]
    ref = base_sketch(bert(0), names)
    assert sketch_difference(ref, base_sketch(bert(0), names)) == 0.0
    assert sketch_difference(ref, base_sketch(bert(0).to(torch.bfloat16), names)) < TOLERANCE / 3
    assert sketch_difference(ref, base_sketch(bert(0).half(), names)) < TOLERANCE / 3
    assert sketch_difference(ref, base_sketch(bert(1), names)) > 10 * TOLERANCE
    # a fine-tune that moved every weight by 5 % of its size
    tuned = bert(0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in names:
            w = dict(tuned.named_modules())[n].weight
            w.add_(0.05 * w.norm() / w.numel() ** 0.5 * torch.randn(w.shape, generator=g))
    assert sketch_difference(ref, base_sketch(tuned, names)) > TOLERANCE


def test_load_adapter_warns_on_another_base_and_strict_refuses(tmp_path):
    folder = trained_adapter(tmp_path / "a")
    silent(lambda: asymlora.load_adapter(bert(0), folder))
    silent(lambda: asymlora.load_adapter(bert(0, torch.bfloat16), folder))
    with pytest.warns(BaseMismatchWarning) as caught:
        asymlora.load_adapter(bert(1), folder)
    (w,) = caught
    assert str(w.message).startswith(f"{folder} was trained on the base weights of 'an unnamed model', but this "
                                     "BertForSequenceClassification has other weights in the adapted layers")
    other = bert(1)
    with pytest.raises(UserError, match="refused \\(strict\\)"):
        asymlora.load_adapter(other, folder, strict=True)
    assert not lora_layers(other)  # refused before the model was touched


def test_a_file_from_before_the_record_loads_in_silence(tmp_path):
    folder = trained_adapter(tmp_path / "a")
    path = os.path.join(folder, "adapter_config.json")
    meta = json.loads(open(path).read())
    del meta["base_weights"]
    open(path, "w").write(json.dumps(meta))
    silent(lambda: asymlora.load_adapter(bert(1), folder, strict=True))


def test_import_peft_of_an_exported_adapter_compares_the_base(tmp_path):
    model = asymlora.load_adapter(bert(0), trained_adapter(tmp_path / "a"))
    peft_dir = asymlora.export_peft(model, str(tmp_path / "peft"))
    silent(lambda: asymlora.import_peft(bert(0), peft_dir))
    with pytest.warns(BaseMismatchWarning):
        asymlora.import_peft(bert(1), peft_dir)
    with pytest.raises(UserError, match="strict"):
        asymlora.import_peft(bert(1), peft_dir, strict=True)


def test_merge_of_adapters_from_two_bases_warns_in_one_line_and_strict_refuses(tmp_path, capsys):
    a, b = trained_adapter(tmp_path / "a", 0), trained_adapter(tmp_path / "b", 1)
    assert main(["merge", a, b, "-o", str(tmp_path / "m1"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"asymlora merge: error: {b} was trained on the base weights of "), err
    assert not (tmp_path / "m1").exists()
    assert main(["merge", a, b, "-o", str(tmp_path / "m2")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"asymlora merge: warning: {b} was trained on the base weights"), err
    same = trained_adapter(tmp_path / "c", 0)
    assert main(["merge", a, same, "-o", str(tmp_path / "m3"), "--strict"]) == 0
    merged = json.loads((tmp_path / "m3" / "adapter_config.json").read_text())
    silent(lambda: asymlora.load_adapter(bert(0), str(tmp_path / "m3"), strict=True))
    assert merged["base_weights"]["layers"].keys() == json.loads(open(os.path.join(a, "adapter_config.json")).read())[
        "base_weights"]["layers"].keys()


@needs_real
def test_a_minilm_adapter_on_a_reinitialised_minilm_is_named_in_one_warning(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from asymlora.bundled import default_model_path

    path = default_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=8))
    folder = asymlora.save_adapter(model, str(tmp_path / "a"))
    silent(lambda: asymlora.load_adapter(AutoModelForSequenceClassification.from_pretrained(path, num_labels=5),
                                         folder))
    torch.manual_seed(0)
    fresh = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, num_labels=5))
    with pytest.warns(BaseMismatchWarning, match=re.escape(f"trained on the base weights of '{path}', but this "
                                                           f"BertForSequenceClassification (named '{path}' too) has "
                                                           "other weights")):
        asymlora.load_adapter(fresh, folder)
