"""One run of ``asymlora sft``: a strategy × seed at one learning rate, trained by the rules of
``asymlora.compare`` (warm-up then a constant rate, validation every ``eval_every`` steps,
patience, best-step restore) with the validation response loss as the criterion; then scored
on the held-out test questions (response loss, and exact match of greedy answers) and its
adapter saved."""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from asymlora.sft.config import SFTConfig
from asymlora.sft.data import ChatQADataset, QAPair, collate_chat, load_qa, split_qa
from asymlora.sft.model import (
    ResponseOnlyLM,
    exact_match_rate,
    generate_answers,
    response_nll,
)
from asymlora.strategies import AdaptRequest, Strategy, StrategySpec, get_strategy
from asymlora.strategies.base import folder_bytes
from asymlora.sweep.outdir import staged_dir
from asymlora.sweep.run_settings import autocast, resolve_precision, run_copy, stopping_args
from asymlora.sweep.stats import curve_slope
from asymlora.sweep.timing import Timed

__all__ = ["LMTask", "prepare_lm_task", "execute_run", "score_test", "score_saved_adapter", "adapter_dir"]


@dataclass
class LMTask:
    """The base model (never modified: every run adapts a copy that shares its frozen weights,
    ``asymlora.sweep.run_settings.run_copy``), its tokenizer and the data."""

    model_path: str
    lm: Any
    tokenizer: Any
    train: ChatQADataset
    val_batches: list[dict[str, torch.Tensor]]
    test_batches: list[dict[str, torch.Tensor]]
    test_pairs: list[QAPair]
    collate: Any
    sizes: dict[str, Any]
    timings: dict[str, float]


def _batches(ds: ChatQADataset, collate: Any, size: int = 64) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches, sorted by length (less padding; the loss is token-weighted anyway)."""
    items = sorted(ds.items, key=lambda it: len(it["input_ids"]))
    return [collate(items[i:i + size]) for i in range(0, len(items), size)]


def prepare_lm_task(cfg: SFTConfig) -> LMTask:
    """Load the model and tokenizer, split and tokenise the QA pairs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asymlora.bundled import CAUSAL_LM, resolve_model

    t = time.perf_counter()
    path = resolve_model(cfg.model, CAUSAL_LM)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    lm.requires_grad_(False)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    pairs = load_qa(cfg.sources)
    train, val, test = split_qa(pairs, cfg.max_val or 256, cfg.max_test or 256, seed=cfg.split_seed,
                                max_train=cfg.max_train)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = functools.partial(collate_chat, pad_id=pad)
    train_ds = ChatQADataset(train, tokenizer, cfg.max_length)
    val_ds, test_ds = ChatQADataset(val, tokenizer, cfg.max_length), ChatQADataset(test, tokenizer, cfg.max_length)
    sizes = {"available": len(pairs), "train": len(train_ds), "val": len(val_ds), "test": len(test_ds),
             "train_label_tokens": train_ds.label_tokens(), "val_label_tokens": val_ds.label_tokens(),
             # exchanges longer than --max-length: questions dropped, answers cut (their EOS unlearnt)
             "too_long": {name: {"questions_dropped": ds.dropped, "answers_cut": ds.answers_cut}
                          for name, ds in (("train", train_ds), ("val", val_ds), ("test", test_ds))}}
    return LMTask(path, lm, tokenizer, train_ds, _batches(val_ds, collate), _batches(test_ds, collate), test,
                  collate, sizes, {"load": load_s, "tokenise": time.perf_counter() - t})


def adapter_dir(cfg: SFTConfig, label: str, seed: int, lr: float) -> str:
    """Where a run saves its adapter: the sweep's staging folder while the sweep runs, so an
    earlier sweep's adapters stay as they are until this one is complete (``asymlora.sweep.outdir``)."""
    slug = label.replace(" ", "").replace("=", "").replace("(", "").replace(")", "").replace("@", "x")
    return os.path.join(staged_dir(cfg.checkpoint_dir, cfg.output_dir), "adapters", f"{slug}-seed{seed}-lr{lr:g}")


def score_test(lm: Any, task: LMTask, cfg: SFTConfig) -> dict[str, Any]:
    """Test response loss, exact match of greedy answers and the first 20 answers of ``lm`` (the
    base model before tuning, or a tuned one), at the precision the runs validate at."""
    with autocast(resolve_precision(cfg.mixed_precision)):
        loss = response_nll(ResponseOnlyLM(lm), task.test_batches)
        answers = generate_answers(lm, task.tokenizer, task.test_pairs, max_length=cfg.max_length,
                                   max_new_tokens=cfg.max_new_tokens)
    return {"test_loss": loss, "test_loglik": -loss, "test_exact_match": exact_match_rate(answers, task.test_pairs),
            "test_answers": answers[:20]}


DEFERRED_TEST: dict[str, Any] = {"test_loss": None, "test_loglik": None, "test_exact_match": None,
                                 "test_answers": [], "test_deferred": True}


def _run_lm(task: LMTask, strategy: Strategy, cfg: SFTConfig) -> Any:
    """The LM one run adapts: the frozen base weights shared with every run, not copied — but
    the adapted layers copied when the strategy's init rewrites them (PiSSA, OLoRA)."""
    if not strategy.mutates_base:
        return run_copy(task.lm)
    from asymlora.core.inject import find_target_modules

    return run_copy(task.lm, private=list(find_target_modules(task.lm, cfg.targets)))


def score_saved_adapter(task: LMTask, cfg: SFTConfig, record: dict[str, Any]) -> dict[str, Any]:
    """The test scores of a run whose scoring was deferred (a pilot that won its lr search),
    from the adapter it saved; returns the record with them filled in."""
    strategy = get_strategy(record["preset"])
    assert strategy.load is not None  # sft refuses a strategy that cannot load (SFTConfig.task_problems)
    lm = strategy.load(_run_lm(task, strategy, cfg), record["adapter_dir"])
    t = time.perf_counter()
    test = score_test(lm, task, cfg)
    seconds = time.perf_counter() - t
    return dict(record, **test, test_deferred=False, wall_time_s=record["wall_time_s"] + seconds,
                eval_time_s=record["eval_time_s"] + seconds)


def execute_run(task: LMTask, spec: StrategySpec, seed: int, lr: float, cfg: SFTConfig, *,
                desc: str, pilot: bool = False) -> tuple[dict[str, Any], float]:
    """One run of the protocol: one strategy × seed at ``lr``, trained and scored; returns
    (record, seconds spent evaluating)."""
    from asymlora.training.loop import TrainArgs, fit

    strategy = spec.strategy
    assert strategy.adapt is not None and strategy.save is not None  # SFTConfig.task_problems
    adapted = strategy.adapt(_run_lm(task, strategy, cfg), AdaptRequest(rank=spec.rank, seed=seed,
                                                                        targets=cfg.targets))
    lm = adapted.model
    model = ResponseOnlyLM(lm)  # type: ignore[arg-type]  # a PEFT wrapper forwards as the LM does
    precision = resolve_precision(cfg.mixed_precision)
    score_val = Timed(lambda m: {"val_loss": response_nll(m, task.val_batches)})

    args = TrainArgs(lr=lr, max_steps=cfg.max_steps, batch_size=cfg.batch_size, seed=seed,
                     **stopping_args(cfg, pilot, "val_loss", higher_is_better=False),
                     group_by_length=True, weight_decay=cfg.weight_decay, mixed_precision=precision,
                     progress=cfg.progress, desc=desc)
    make_optimizer = adapted.make_optimizer(lr, cfg.weight_decay) if adapted.make_optimizer else None
    res = fit(model, task.train, task.collate, args, eval_fn=score_val, make_optimizer=make_optimizer)
    t = time.perf_counter()
    # Exact match is generated only where it is scored: a pilot's test scores count only if its
    # rate wins, so pilots are scored later, from their saved adapter (``score_saved_adapter``).
    test = DEFERRED_TEST if pilot else score_test(lm, task, cfg)
    out = adapter_dir(cfg, spec.label, seed, lr)
    strategy.save(lm, out)
    eval_s = score_val.seconds + time.perf_counter() - t
    evals = [(h["step"], h["val_loss"]) for h in res.history if "val_loss" in h]
    record = {
        "strategy": spec.label, "preset": spec.preset, "rank": spec.rank, "seed": seed, "lr": lr,
        "trainable_params": res.trainable_params, "adapter_params": strategy.adapter_params(lm, None),
        "adapter_file_bytes": folder_bytes(out),
        "val_loss": res.best_metric if res.best_metric is not None else res.final_metrics.get("val_loss"),
        **test,
        "best_step": res.best_step if res.best_step is not None else res.steps, "steps": res.steps,
        "max_steps": cfg.max_steps, "stopping": cfg.stopping, "stopped_early": res.stopped_early,
        "val_slope_last_quarter": curve_slope([s for s, _ in evals], [v for _, v in evals]),
        "final_train_loss": res.final_metrics.get("train_loss"),
        "wall_time_s": res.wall_time_s + (time.perf_counter() - t), "eval_time_s": eval_s,
        "peak_memory_bytes": res.peak_memory_bytes, "peak_memory_kind": res.peak_memory_kind,
        "adapter_dir": os.path.abspath(out), "history": res.history,
    }
    return record, eval_s
