"""What one ``asymlora sft`` run is: instruction tuning of a causal LM on question → answer
pairs, each strategy at its own learning rate, converged, over paired seeds — the protocol of
``asymlora compare`` (``asymlora.sweep``) with the validation *loss* of the
response tokens as the criterion (lr selection: lowest; early stopping: no new minimum).

The defaults are the LLaMA-class run of docs/llm.md "Instruction tuning on real LLaMA weights": the bundled
SmolLM2-135M-Instruct, TriviaQA + NQ-open, adapters of rank 8 on q_proj/v_proj (the paper's
LLaMA targets), alpha = 2r.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from asymlora.errors import UserError
from asymlora.sweep.config import SweepConfig, parse_strategy

__all__ = ["SFTConfig", "SFT_DEFAULTS", "SFT_QUICK"]

#: the protocol settings of the default run and of ``--quick`` (its few-minute smoke version)
SFT_DEFAULTS = dict(strategies=["lora", "b-only"], ranks=[8], seeds=[0, 1, 2], lrs=[1e-3, 3e-3, 1e-2],
                    stopping="plateau", max_steps=300, eval_every=15, patience=3, min_steps=45, warmup_steps=10,
                    batch_size=16, max_length=96, max_train=None, max_val=128, max_test=256, max_lr_extensions=1)
SFT_QUICK = dict(strategies=["lora", "b-only"], ranks=[4], seeds=[0, 1], lrs=[1e-3, 3e-3], stopping="plateau",
                 max_steps=40, eval_every=10, patience=2, min_steps=20, warmup_steps=5, batch_size=8, max_length=64,
                 max_train=640, max_val=48, max_test=48, max_lr_extensions=0)


def _default(name: str):
    value = SFT_DEFAULTS[name]
    return field(default_factory=lambda: list(value)) if isinstance(value, list) else value


@dataclass
class SFTConfig(SweepConfig):
    """``SweepConfig``'s protocol settings (strategies, ranks, seeds, lrs, max_steps, …) with
    the sft defaults, plus the LM task: ``model`` (a folder or ``smollm2``), ``sources`` (QA
    sets of ``asymlora.sft.data``), ``tasks`` (benchmarks scored before and after tuning by
    ``asymlora.lmeval``; empty = none) and ``bench_limit`` (items per benchmark)."""

    selection_metric: ClassVar[str] = "val_loss"
    selection_higher_is_better: ClassVar[bool] = False

    model: str = "smollm2"
    data: str = "trivia_qa,nq_open"
    strategies: list[str] = _default("strategies")
    ranks: list[int] = _default("ranks")
    seeds: list[int] = _default("seeds")
    lrs: list[float] = _default("lrs")
    stopping: str = _default("stopping")
    max_steps: int = _default("max_steps")
    eval_every: int = _default("eval_every")
    patience: int = _default("patience")
    min_steps: int = _default("min_steps")
    warmup_steps: int = _default("warmup_steps")
    batch_size: int = _default("batch_size")
    max_length: int = _default("max_length")
    max_train: int | None = _default("max_train")
    max_val: int | None = _default("max_val")
    max_test: int | None = _default("max_test")
    target_modules: list[str] | None = field(default_factory=lambda: ["q_proj", "v_proj"])
    output_dir: str = "asymlora-sft"
    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "sciq", "piqa", "mmlu"])
    bench_limit: int | None = 200
    mmlu_limit: int | None = 4           # MMLU items per subject (57 subjects: 228 questions)
    shots: int = 0                       # MMLU's solved examples (the other benchmarks are 0-shot)
    max_new_tokens: int = 16
    # a validation loss that has not dropped by more than this (nats per token) over `patience`
    # evaluations is a plateau (asymlora.training.loop.TrainArgs.early_stopping_min_delta)
    min_delta: float = 0.02

    @property
    def sources(self) -> list[str]:
        return [s.strip() for s in self.data.split(",") if s.strip()]

    def task_problems(self) -> list[str]:
        from asymlora.bundled import CAUSAL_LM, model_problem
        from asymlora.sft.data import QA_SOURCES

        out: list[str] = []
        if problem := model_problem(self.model, CAUSAL_LM):
            out.append(problem)
        bad = [s for s in self.sources if s not in QA_SOURCES]
        if bad or not self.sources:
            out.append(f"--data {self.data!r}: give one or more of {', '.join(QA_SOURCES)} (commas)")
        for s in self.strategies:
            try:
                strategy = parse_strategy(s, 1).strategy
            except UserError:
                continue  # reported by problems()
            if not strategy.is_adapter:
                out.append(f"strategy {s!r} has no meaning for a causal LM (no adapter); use an adapter strategy")
            elif strategy.load is None:  # a pilot that wins is scored later, from its saved adapter
                out.append(f"strategy {s!r} cannot load its saved adapter back, which sft needs to score a "
                           "winning pilot; give it as a Strategy with save and load")
        if self.tasks:
            from asymlora.lmeval import TASKS

            unknown = [t for t in self.tasks if t not in TASKS]
            if unknown:
                out.append(f"--benchmarks {','.join(unknown)}: unknown benchmark; valid: {', '.join(TASKS)}")
        if self.bench_limit is not None and self.bench_limit < 1:
            out.append(f"--limit {self.bench_limit!r}: must be >= 1 (or unset for whole benchmarks)")
        if self.mmlu_limit is not None and self.mmlu_limit < 1:
            out.append(f"--mmlu-limit {self.mmlu_limit!r}: must be >= 1 (items per subject)")
        if not (isinstance(self.shots, int) and 0 <= self.shots <= 5):
            out.append(f"--shots {self.shots!r}: MMLU takes 0 to 5 solved examples")
        if not self.min_delta >= 0:
            out.append(f"--min-delta {self.min_delta!r}: must be >= 0 (nats per token)")
        if self.max_new_tokens < 1:
            out.append(f"--max-new-tokens {self.max_new_tokens!r}: must be >= 1")
        return out
