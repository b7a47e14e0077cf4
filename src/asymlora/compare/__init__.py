"""``asymlora compare``: each adapter strategy fine-tuned on one real task at its own learning
rate, trained until validation stops improving, over paired seeds, with a verdict per strategy
against LoRA. One module per concern:

- ``config``   — strategies and the protocol's settings, validated up front;
- ``task``     — data, tokenisation, the base model and the head-only features, loaded once;
- ``protocol`` — learning-rate selection, scheduling, the time per phase;
- ``run``      — one run by the protocol's rules;  ``workers`` — where runs execute;
- ``stats``    — mean ± std, paired differences with t-intervals, verdicts, curve slopes;
- ``report``   — tables, verdict lines, results.json/csv/md;  ``plots`` — the PNGs.
"""
from asymlora.compare.config import ADAPTER_PRESETS, HEAD_ONLY, CompareConfig, StrategySpec, parse_strategy
from asymlora.compare.protocol import run_compare, select_lr
from asymlora.compare.run import train_one
from asymlora.compare.report import format_table, paired_verdicts, summarize, write_reports
from asymlora.compare.task import Task, prepare_task, set_threads

__all__ = ["ADAPTER_PRESETS", "HEAD_ONLY", "CompareConfig", "StrategySpec", "parse_strategy", "run_compare",
           "select_lr", "train_one", "format_table", "paired_verdicts", "summarize", "write_reports", "Task",
           "prepare_task", "set_threads"]
