"""``asymlora compare``: each adapter strategy fine-tuned on one real classification task at
its own learning rate, over paired seeds, with a verdict per strategy against LoRA — a task on
the sweep engine (``asymlora.sweep``: lr search, pruning, backends, resume, statistics). One
module per concern of the task:

- ``config``   — the task's settings on top of the protocol's (``SweepConfig``);
- ``task``     — data, tokenisation, the base model and the head-only features, loaded once;
- ``protocol`` — the compare sweep: settings block, progress lines, results.json;
- ``run``      — one run by the protocol's rules;  ``workers`` — one job on a backend;
- ``report``   — tables, verdict lines, results.json/csv/md;  ``plots`` — the PNGs.
"""
from asymlora.compare.config import (
           HEAD_ONLY,
           CompareConfig,
           StrategySpec,
           parse_strategy,
)
from asymlora.compare.protocol import run_compare, select_lr
from asymlora.compare.report import (
           format_report,
           format_table,
           paired_verdicts,
           summarize,
           write_reports,
)
from asymlora.compare.run import execute_run
from asymlora.compare.task import Task, prepare_task, set_threads

__all__ = ["HEAD_ONLY", "CompareConfig", "StrategySpec", "parse_strategy", "run_compare",
           "select_lr", "execute_run", "format_report", "format_table", "paired_verdicts", "summarize", "write_reports",
           "Task", "prepare_task", "set_threads"]
