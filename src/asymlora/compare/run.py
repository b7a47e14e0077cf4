"""One run of ``asymlora compare``: a strategy × seed at one learning rate, trained by the
protocol's stopping rule (``CompareConfig.stopping``: a fixed budget with a linearly decaying
rate, scored with the final weights; or the plateau rule) and scored on test. A pilot run may be
trained in segments (``pause_at`` / ``resume``) so the lr search can look at it part-way. The
head-only baseline runs on cached features of the frozen encoder (``FeatureHead``); every other
strategy adapts the model as its registry entry says (``asymlora.strategies``)."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from asymlora.compare.config import HEAD_ONLY, CompareConfig, StrategySpec
from asymlora.compare.task import HeadFeatures, Task, reinit_head
from asymlora.errors import UserError
from asymlora.strategies import Adapted, AdaptRequest, Strategy
from asymlora.sweep.run_settings import autocast, resolve_precision, run_copy, stopping_args
from asymlora.sweep.stats import curve_slope
from asymlora.sweep.timing import Timed

__all__ = ["RunResult", "FeatureHead", "execute_run", "refuse_unfit"]


@dataclass
class RunResult:
    """One strategy × seed × learning rate, scored at its best validation step."""

    record: dict[str, Any]
    eval_seconds: float
    model: Any = field(default=None, repr=False)


class FeatureHead(nn.Module):
    """The head-only model on cached features: ``dropout`` then the base model's head, with
    the same cross-entropy as ``*ForSequenceClassification``."""

    def __init__(self, head: nn.Module, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.head = head

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.head(self.dropout(features))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def _stack_features(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"features": torch.stack([it["features"] for it in items]),
            "labels": torch.as_tensor([it["labels"] for it in items], dtype=torch.long)}


def _feature_metrics(model: Any, data: HeadFeatures, num_labels: int, prefix: str) -> dict[str, float]:
    from asymlora.compare.data import classification_metrics

    was = model.training
    model.eval()
    with torch.inference_mode():
        pred = model(data.features).logits.argmax(-1).tolist()
    model.train(was)
    return {prefix + k: v for k, v in classification_metrics(data.labels, pred, num_labels).items()}


def _head_dropout(config: Any) -> float:
    p = getattr(config, "classifier_dropout", None)
    if p is None:
        p = getattr(config, "hidden_dropout_prob", 0.0)
    return float(p or 0.0)


def _private_modules(task: Task, strategy: Strategy, cfg: CompareConfig) -> list[str]:
    """What a run owns a copy of: the head, and the adapted layers when the strategy's init
    rewrites them (PiSSA, OLoRA); the rest of the frozen base is shared between runs."""
    from asymlora.core.inject import find_target_modules

    if not strategy.mutates_base:
        return [task.head]
    return [task.head, *find_target_modules(task.base, cfg.targets, exclude=[task.head])]


def refuse_unfit(task: Task, specs: list[StrategySpec], cfg: CompareConfig) -> None:
    """Every strategy that cannot adapt the task's model, in one UserError, before any run."""
    bad = []
    for spec in specs:
        strategy = spec.strategy
        if strategy.is_adapter:
            scratch = run_copy(task.base, private=_private_modules(task, strategy, cfg))
            problem = strategy.problem(scratch, AdaptRequest(rank=spec.rank, seed=0, targets=cfg.targets,
                                                             head=task.head))
            if problem:
                bad.append(problem)
    if bad:
        raise UserError("; ".join(bad))


def _build(task: Task, spec: StrategySpec, seed: int, cfg: CompareConfig,
           features: dict[str, HeadFeatures] | None) -> tuple[Any, Any, Any, Callable, Callable, Adapted | None]:
    """The model of one run and how to feed and score it:
    (model, train data, collate, val scorer, test scorer (test and the train sample), what the strategy made
    of it)."""
    from asymlora.compare.data import evaluate_classifier

    k = task.num_labels
    strategy = spec.strategy
    if not strategy.is_adapter and features is not None:
        head = copy.deepcopy(getattr(task.base, task.head))
        shell = SimpleNamespace(config=task.base.config, h=head)
        reinit_head(shell, seed, "h")
        # a head that reads the first token applies its own dropout; a head fed the pooled
        # vector gets the dropout the full model applies before it
        dropout = 0.0 if features["train"].first_token else _head_dropout(task.base.config)
        model: nn.Module = FeatureHead(head, dropout)
        return (model, features["train"], _stack_features,
                lambda m: _feature_metrics(m, features["val"], k, "val_"),
                lambda m: {**_feature_metrics(m, features["test"], k, "test_"),
                           **_feature_metrics(m, features["train_sample"], k, "train_")}, None)
    model = run_copy(task.base, private=_private_modules(task, strategy, cfg))
    reinit_head(model, seed, task.head)
    adapted = None
    if not strategy.is_adapter:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in getattr(model, task.head).parameters():
            p.requires_grad_(True)
    else:
        assert strategy.adapt is not None
        adapted = strategy.adapt(model, AdaptRequest(rank=spec.rank, seed=seed, targets=cfg.targets,
                                                     head=task.head))
        model = adapted.model
    return (model, task.train_ds, task.collate,
            lambda m: evaluate_classifier(m, task.val_ds, task.collate, k, prefix="val_"),
            lambda m: {**evaluate_classifier(m, task.test_ds, task.collate, k, prefix="test_"),
                       **evaluate_classifier(m, task.train_sample_ds, task.collate, k, prefix="train_")}, adapted)


def execute_run(task: Task, spec: StrategySpec, seed: int, lr: float, cfg: CompareConfig, *, desc: str,
                features: dict[str, HeadFeatures] | None = None, output_dir: str | None = None,
                checkpoint_every: int | None = None, resume: bool = False, pilot: bool = False,
                pause_at: int | None = None) -> RunResult:
    """One run of the protocol: one strategy × seed at learning rate ``lr``, trained and scored
    by the rules of step 2 of the protocol.
    With ``pause_at`` the run stops there with a checkpoint in ``output_dir`` and its record
    holds only the curve so far (``paused``); ``resume`` continues it."""
    from asymlora.training.loop import TrainArgs, fit

    model, train_data, collate, score_val, score_test, adapted = _build(task, spec, seed, cfg, features)
    precision = resolve_precision(cfg.mixed_precision)
    if torch.cuda.is_available():  # fit() returns the model on the device it was given
        model.to("cuda")
    timed_val = Timed(score_val)
    make_optimizer = None
    if adapted is not None and adapted.make_optimizer is not None:
        make_optimizer = adapted.make_optimizer(lr, cfg.weight_decay)
    args = TrainArgs(lr=lr, max_steps=cfg.max_steps, batch_size=cfg.batch_size, seed=seed,
                     **stopping_args(cfg, pilot, "val_accuracy"),
                     group_by_length=callable(getattr(train_data, "lengths", None)),
                     weight_decay=cfg.weight_decay, mixed_precision=precision,
                     progress=cfg.progress, desc=desc, output_dir=output_dir,
                     checkpoint_every=checkpoint_every, resume=resume, pause_at=pause_at)
    res = fit(model, train_data, collate, args, eval_fn=timed_val, make_optimizer=make_optimizer)
    if res.paused:
        record = {"strategy": spec.label, "seed": seed, "lr": lr, "paused": True, "steps": res.steps,
                  "val_size": len(task.val_ds),  # cached head features, when used, are of the same texts
                  "wall_time_s": res.wall_time_s, "eval_time_s": timed_val.seconds, "history": res.history}
        return RunResult(record, timed_val.seconds, model)
    t = time.perf_counter()
    with autocast(precision):  # test (and the train sample) scored at the precision validation was
        test_m = score_test(model)
    # the train - test accuracy gap of the final weights, on a train sample the size of validation
    test_m["generalization_gap"] = test_m["train_accuracy"] - test_m["test_accuracy"]
    eval_s = timed_val.seconds + time.perf_counter() - t
    strategy = spec.strategy
    evals = [(h["step"], h["val_accuracy"]) for h in res.history if "val_accuracy" in h]
    record = {
        "strategy": spec.label, "preset": spec.preset or HEAD_ONLY, "rank": spec.rank, "seed": seed, "lr": lr,
        "trainable_params": res.trainable_params, "adapter_params": strategy.adapter_params(model, task.head),
        "adapter_file_bytes": strategy.file_bytes(model) if strategy.is_adapter else None,
        **test_m,
        "val_accuracy": res.final_metrics.get("val_accuracy"),
        "val_macro_f1": res.final_metrics.get("val_macro_f1"),
        "best_step": res.best_step if res.best_step is not None else res.steps,
        "steps": res.steps, "max_steps": cfg.max_steps, "stopping": cfg.stopping,
        "stopped_early": res.stopped_early,
        "val_slope_last_quarter": curve_slope([s for s, _ in evals], [v for _, v in evals]),
        "final_train_loss": res.final_metrics.get("train_loss"),
        "wall_time_s": res.wall_time_s + (time.perf_counter() - t), "eval_time_s": eval_s,
        "peak_memory_bytes": res.peak_memory_bytes, "peak_memory_kind": res.peak_memory_kind,
        "saved_activation_bytes": res.saved_activation_bytes,
        "head_on_cached_features": spec.preset is None and features is not None,
        "history": res.history,
    }
    return RunResult(record, eval_s, model)
