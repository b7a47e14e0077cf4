"""Instruction-tune a causal LM with TRL's SFTTrainer and an asymlora adapter (b-only by default).

    python examples/trl_sft.py                          # tiny random Llama, toy Q/A pairs, seconds
    python examples/trl_sft.py --model DIR --data qa.jsonl --max-steps 200 --output-dir out/sft

``--model`` is a local transformers folder with a tokenizer and chat template, or ``smollm2`` for
the bundled SmolLM2-135M-Instruct (``asymlora.bundled``); without it a tiny random Llama and a
word-level tokenizer are built in memory. ``--data`` is a JSON-lines file of ``{"prompt": ..., "completion":
...}`` rows (strings); without it a few toy questions are used. The rows become chat turns
(prompt = user, completion = assistant), so the loss is on the assistant's reply only
(TRL's completion-only loss) and the model's own chat template formats them.

Afterwards the adapter folder (``<output-dir>/asymlora_adapter``, written by ``AsymLoraCallback``) is
reloaded onto a fresh copy of the base model and converted to PEFT's format
(``<output-dir>/peft_adapter``); the script prints the largest logit difference of each against the
trained model.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

import asymlora
from asymlora.errors import UserError
from asymlora.formats.peft import convert_to_peft

TOY_PAIRS = [
    ("what is the capital of france", "paris"),
    ("what is the capital of germany", "berlin"),
    ("what is the capital of italy", "rome"),
    ("what is the capital of spain", "madrid"),
    ("what colour is the sky", "blue"),
    ("what colour is grass", "green"),
]
# A chat template whose reply sits between {% generation %} markers, so TRL's assistant-only loss
# works on chat "messages" data too; prompt/completion data needs no markers.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
    "{% else %}<|assistant|> {% generation %}{{ m['content'] }} <|end|>{% endgeneration %} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_llama(texts: Sequence[str], seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer random ``LlamaForCausalLM`` and a whitespace word-level tokenizer over ``texts``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = sorted({w for t in texts for w in t.split()} - set(specials))
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|end|>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["<|end|>"], pad_token_id=vocab["<pad>"])
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG left alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def read_pairs(path: str | None) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from a JSON-lines file, or the toy pairs."""
    if path is None:
        return list(TOY_PAIRS)
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
                    raise UserError(f"{path} line {i}: need string fields 'prompt' and 'completion', got {sorted(row)}")
                pairs.append((row["prompt"], row["completion"]))
    if not pairs:
        raise UserError(f"{path} holds no rows")
    return pairs


def chat_dataset(pairs: Sequence[tuple[str, str]]) -> Any:
    """TRL's conversational prompt/completion format: the loss covers the completion only."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                               "completion": [{"role": "assistant", "content": c}]} for p, c in pairs])


def load_base(model_dir: str | None, pairs: Sequence[tuple[str, str]]) -> tuple[Any, Any]:
    if model_dir is None:
        return tiny_llama([w for pair in TOY_PAIRS + list(pairs) for w in pair])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asymlora.bundled import CAUSAL_LM, resolve_model

    model_dir = resolve_model(model_dir, CAUSAL_LM)  # a bundled model's name (smollm2): its cached folder
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"--model {model_dir!r} is not a transformers model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        raise UserError(f"the tokenizer in {model_dir!r} has no chat template; SFT on chat turns needs one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tokenizer


def build_parser() -> argparse.ArgumentParser:
    """The example's flags, in the ``asymlora`` command line's vocabulary (docs/cli.md)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local transformers causal-LM folder, or 'smollm2' for the bundled "
                   "SmolLM2-135M-Instruct (default: a tiny random Llama)")
    p.add_argument("--data", help="JSON-lines file of {prompt, completion} rows (default: toy questions)")
    p.add_argument("--strategy", default="b-only", choices=sorted(asymlora.PRESETS))
    p.add_argument("--rank", "-r", type=int, default=8, help="adapter rank r (default: 8)")
    p.add_argument("--target-modules", default="all-linear", help="'all-linear' or comma-separated names")
    p.add_argument("--max-steps", type=int, default=30, help="training steps (default: 30)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output-dir", "-o", default=None, metavar="DIR",
                   help="output folder (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("rank", "max_steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def max_logit_difference(a: Any, b: Any, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(input_ids=input_ids).logits - b(input_ids=input_ids).logits).abs().max())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    from asymlora.integrations.trl import ADAPTER_DIR, AsymLoraCallback

    args = parse_args(argv)
    pairs = read_pairs(args.data)
    output = args.output_dir or tempfile.mkdtemp(prefix="asymlora-trl-")
    model, tokenizer = load_base(args.model, pairs)
    targets = ("all-linear" if args.target_modules == "all-linear"
               else [t.strip() for t in args.target_modules.split(",")])
    config = asymlora.AsymLoraConfig.preset(args.strategy, r=args.rank, target_modules=targets, seed=args.seed)
    asymlora.wrap(model, config)
    print(asymlora.parameter_report(model))

    # bf16=False: SFTConfig defaults to bf16 autocast even on CPU, and leaves the trained model's
    # forward wrapped in it, so its logits would differ (~1e-3) from a float32 reload.
    sft = SFTConfig(output_dir=output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, bf16=False, seed=args.seed, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=chat_dataset(pairs), processing_class=tokenizer,
                         callbacks=[AsymLoraCallback()])
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    adapter_dir = os.path.join(output, ADAPTER_DIR)
    peft_dir = convert_to_peft(adapter_dir, os.path.join(output, "peft_adapter"))

    model.eval()
    probe = tokenizer.apply_chat_template([{"role": "user", "content": pairs[0][0]}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
    reloaded = asymlora.load_adapter(load_base(args.model, pairs)[0], adapter_dir).eval()
    peft_model = PeftModel.from_pretrained(load_base(args.model, pairs)[0], peft_dir).eval()
    result = {
        "output": output, "adapter_dir": adapter_dir, "peft_dir": peft_dir, "losses": losses,
        "reload_max_diff": max_logit_difference(model, reloaded, probe),
        "peft_max_diff": max_logit_difference(model, peft_model, probe),
    }
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps\n"
          f"adapter: {adapter_dir} (reloaded: max |Δlogit| {result['reload_max_diff']:.2e})\n"
          f"PEFT:    {peft_dir} (PeftModel: max |Δlogit| {result['peft_max_diff']:.2e})")
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None  # the message is the whole report
