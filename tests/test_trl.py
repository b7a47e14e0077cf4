"""TRL's SFTTrainer on an asymlora-wrapped tiny Llama: only the trained factors move, the
checkpoints carry an asymlora adapter that reloads to identical logits, and its PEFT export gives
PEFT's own forward the same logits. The tiny model and tokenizer come from examples/trl_sft.py."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import asymlora
from asymlora.core.adapters import add_adapter, set_adapter
from asymlora.core.inject import lora_layers
from asymlora.errors import UserError
from asymlora.formats.peft import convert_to_peft
from asymlora.integrations.trl import (  # needs transformers and accelerate, not trl
    ADAPTER_DIR,
    AsymLoraCallback,
    adapter_trainable_parameters,
    check_for_trainer,
)
from conftest import require

require("trl")
from trl import SFTConfig, SFTTrainer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_sft.py"
_spec = importlib.util.spec_from_file_location("trl_sft_example", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

PAIRS = example.TOY_PAIRS


def base_model():
    return example.load_base(None, PAIRS)


def messages_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
                              for p, c in PAIRS])


def sft_args(out, **overrides):
    values = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=3, learning_rate=1e-2,
                  lr_scheduler_type="constant", logging_steps=1, save_steps=3, report_to=[], use_cpu=True,
                  bf16=False, disable_tqdm=True, seed=0)
    values.update(overrides)
    return SFTConfig(**values)


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def probe_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[0][0]}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


@pytest.mark.parametrize("preset,data", [("b-only", "messages"), ("b-only", "prompt-completion"),
                                         ("lora", "prompt-completion"), ("a-only", "prompt-completion")])
def test_sft_round_trip(tmp_path, preset, data):
    from peft import PeftModel

    model, tok = base_model()
    asymlora.wrap(model, asymlora.AsymLoraConfig.preset(preset, r=4, target_modules="all-linear"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = messages_dataset() if data == "messages" else example.chat_dataset(PAIRS)
    args = sft_args(tmp_path / "run", assistant_only_loss=(data == "messages"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                         callbacks=[AsymLoraCallback()])
    # The loss is on the reply only: each row's labels are -100 up to the reply.
    row = trainer.train_dataset[0]
    reply = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tok.decode(reply).split() == [PAIRS[0][1], "<|end|>"]
    trainer.train()

    # The optimizer held exactly the trained factors; nothing else moved.
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trained = {n for n, p in model.named_parameters() if id(p) in held}
    factor = {"b-only": ["lora_B"], "a-only": ["lora_A"], "lora": ["lora_A", "lora_B"]}[preset]
    layers = lora_layers(model)
    assert trained == {f"{n}.{f}" for n in layers for f in factor} == set(adapter_trainable_parameters(model))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # every trained factor changed (gradient checkpointing is on), frozen ones bit-for-bit not
    assert changed == trained
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0]

    # Checkpoints and the final folder hold asymlora adapters; reloads give identical logits.
    ids = probe_ids(tok)
    trained_logits = logits(model, ids)
    final = tmp_path / "run" / ADAPTER_DIR
    assert (tmp_path / "run" / "checkpoint-3" / ADAPTER_DIR / "adapter_config.json").is_file()
    assert torch.equal(logits(asymlora.load_adapter(base_model()[0], final), ids), trained_logits)
    last_checkpoint = asymlora.load_adapter(base_model()[0], tmp_path / "run" / "checkpoint-6" / ADAPTER_DIR)
    assert torch.equal(logits(last_checkpoint, ids), trained_logits)
    assert not torch.equal(logits(base_model()[0], ids), trained_logits)

    # PEFT format: PEFT's own forward on its own LoRA layers gives the same logits (float32 sums in
    # another order: 1e-5 absolute on logits of size ~1).
    peft_dir = convert_to_peft(final, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(base_model()[0], peft_dir)
    torch.testing.assert_close(logits(peft_model, ids), trained_logits, rtol=0, atol=1e-5)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    """The trainer's own checkpoint (the whole wrapped state dict) resumes a wrapped model."""
    def run(out, resume=None):
        model, tok = base_model()
        asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=4))
        SFTTrainer(model=model, args=sft_args(out), train_dataset=example.chat_dataset(PAIRS),
                   processing_class=tok, callbacks=[AsymLoraCallback()]).train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _trainer(tmp_path, model, tok):
    return SFTTrainer(model=model, args=sft_args(tmp_path, max_steps=1), train_dataset=example.chat_dataset(PAIRS),
                      processing_class=tok, callbacks=[AsymLoraCallback()])


def test_unfrozen_base_weight_is_refused_before_training(tmp_path):
    model, tok = base_model()
    asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=4))
    model.model.embed_tokens.weight.requires_grad_(True)  # would train, but no adapter file holds it
    before = model.model.embed_tokens.weight.clone()
    trainer = _trainer(tmp_path, model, tok)
    with pytest.raises(UserError, match="model.embed_tokens.weight.*modules_to_save"):
        trainer.train()
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_modules_to_save_train_and_reload(tmp_path):
    model, tok = base_model()
    asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=4, modules_to_save=["embed_tokens"]))
    _trainer(tmp_path, model, tok).train()
    ids = probe_ids(tok)
    assert torch.equal(logits(asymlora.load_adapter(base_model()[0], tmp_path / ADAPTER_DIR), ids), logits(model, ids))


def test_frozen_trained_factor_is_refused(tmp_path):
    model, tok = base_model()
    asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=4))
    next(iter(lora_layers(model).values())).lora_B.requires_grad_(False)
    with pytest.raises(UserError, match=r"does not train 1 trained factor.*lora_B"):
        _trainer(tmp_path, model, tok).train()


def test_output_layer_adapter_is_refused(tmp_path):
    model, tok = base_model()
    asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UserError, match="'lm_head' is the output layer"):
        check_for_trainer(model)
    with pytest.raises(UserError, match="'lm_head' is the output layer"):
        _trainer(tmp_path, model, tok).train()


def test_several_active_adapters_are_refused():
    model, _ = base_model()
    asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=4), adapter_name="one")
    add_adapter(model, "two", asymlora.AsymLoraConfig.preset("b-only", r=4))
    set_adapter(model, ["one", "two"])
    with pytest.raises(UserError, match=r"2 adapters are active \(\['one', 'two'\]\)"):
        check_for_trainer(model)
    set_adapter(model, "two")
    check_for_trainer(model)


def test_unwrapped_and_peft_models_are_refused():
    from peft import LoraConfig, get_peft_model

    model, _ = base_model()
    with pytest.raises(UserError, match="no asymlora adapters"):
        check_for_trainer(model)
    asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=4))
    with pytest.raises(UserError, match="PEFT model"):
        check_for_trainer(get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj"])))


@pytest.mark.parametrize("subdir", ["", "/abs", "../up", None])
def test_callback_subdir_checked(subdir):
    with pytest.raises(UserError, match="subdir"):
        AsymLoraCallback(subdir)


def test_example_main(tmp_path, capsys, monkeypatch):
    trained = []
    real_difference = example.max_logit_difference

    def keep_trained(a, b, ids):  # the example's own comparison, a = the model it trained
        trained.append(a)
        return real_difference(a, b, ids)

    monkeypatch.setattr(example, "max_logit_difference", keep_trained)
    out = example.main(["--max-steps", "4", "-r", "2", "--output-dir", str(tmp_path),
                        "--target-modules", "q_proj,v_proj"])
    assert out["losses"][-1] < out["losses"][0]
    # checked here, not by the example's own numbers: on every training prompt, the trained model,
    # its adapter loaded onto a fresh base and the PEFT conversion loaded by PEFT give the same
    # logits, which are not the base model's (the adapter was trained and saved after training)
    from peft import PeftModel

    model, tokenizer = base_model()
    base = model.eval()
    reloaded = asymlora.load_adapter(base_model()[0], out["adapter_dir"]).eval()
    peft_model = PeftModel.from_pretrained(base_model()[0], out["peft_dir"]).eval()
    assert len(trained) == 2 and trained[0] is trained[1]
    for prompt, _ in PAIRS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        want = logits(trained[0], ids)
        assert torch.equal(logits(reloaded, ids), want)
        torch.testing.assert_close(logits(peft_model, ids), want, rtol=0, atol=1e-5)
        assert (logits(base, ids) - want).abs().max() > 1e-3
    assert os.path.isfile(os.path.join(out["adapter_dir"], "adapter_model.safetensors"))
    assert "max |Δlogit|" in capsys.readouterr().out


def test_example_rejects_bad_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(UserError, match="line 1: need string fields 'prompt' and 'completion'"):
        example.main(["--data", str(bad), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
