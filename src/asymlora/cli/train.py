"""``asymlora train``: one fine-tuning run (one strategy, one seed) with checkpoints and resume."""
from __future__ import annotations

import argparse
import json
import os

from asymlora.cli.options import (
    Problems,
    add_list,
    add_model_and_data,
    add_output_dir,
    add_quantize,
    show_progress,
    str_list,
)
from asymlora.strategies import REGISTRY
from asymlora.sweep.budget import DEFAULT, QUICK, TRAIN_EVAL_EVERY

DESCRIPTION = """\
Fine-tune a pretrained classifier with one adapter strategy and seed, on the same tasks as
`asymlora compare`. Checkpoints (trainable weights, optimizer, scheduler, RNG states, step)
go to OUTPUT_DIR/checkpoint; --resume continues a killed run and ends where an uninterrupted
run would. The trained adapter is saved to OUTPUT_DIR/adapter (asymlora format: B + the
seed of the frozen factor), metrics and history to OUTPUT_DIR/metrics.json.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune one strategy on a real task (checkpoints, resume)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="b-only",
                   help="a strategy of `asymlora compare --help` (lora, b-only, a-only, head-only, peft:NAME, "
                        "MODULE:FACTORY), optional @Kr (default: b-only)")
    p.add_argument("--rank", "-r", type=int, default=None, metavar="R", help=f"adapter rank r (default: {DEFAULT.r})")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, head and frozen factor (default: 0)")
    add_model_and_data(p)
    p.add_argument("--max-steps", type=int, default=None,
                   help="step cap; the run stops earlier when validation stops improving "
                   f"(default: {DEFAULT.max_steps})")
    p.add_argument("--patience", type=int, default=None,
                   help=f"stop after N evaluations without a new best (default: {DEFAULT.patience})")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the one compare chose for the strategy on the bundled data: "
                        + ", ".join(f"{s.name} {s.train_lr:g}" for s in REGISTRY.values() if s.train_lr)
                        + f"; any other: the grid's middle rate {DEFAULT.lrs[1]:g} times its scale)")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {DEFAULT.batch_size})")
    p.add_argument("--max-length", type=int, default=None, help=f"max tokens (default: {DEFAULT.max_length})")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"validate every N steps (default: {TRAIN_EVAL_EVERY})")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (default: eval-every)")
    add_list(p, "--target-modules", kind=str_list, default=None,
             help="adapted module names, commas or spaces (default: per architecture)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: probe all CPUs vs 1)")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="auto = bf16 (or fp16) on a GPU and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32")
    add_quantize(p)
    add_output_dir(p, "asymlora-train", "output folder (default: ./asymlora-train)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint if present")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an OUTPUT_DIR that holds an earlier one (without it, or --resume, "
                        "such a folder is refused)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (compare --quick's budget)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


RUN_FILES = ("metrics.json", "adapter", "checkpoint")  # what a run leaves in its folder


def _default_lr(name: str) -> float:
    """The strategy's own rate for one run, else the grid's middle rate times its scale; an
    unknown strategy is reported by ``cfg.problems()`` (its rate is then moot)."""
    from asymlora.errors import UserError
    from asymlora.strategies import parse_strategy

    try:
        strategy = parse_strategy(name, 1).strategy
    except UserError:
        return DEFAULT.lrs[1]
    return strategy.train_lr or DEFAULT.lrs[1] * strategy.lr_scale


def run(args: argparse.Namespace) -> int:
    from asymlora.compare import (
        CompareConfig,
        execute_run,
        parse_strategy,
        prepare_task,
    )
    from asymlora.fileio import atomic_write_text
    from asymlora.sweep.backends import threads_for_run
    from asymlora.sweep.outdir import check_output_dir

    b = QUICK if args.quick else DEFAULT
    pick = lambda v, d: d if v is None else v  # noqa: E731
    r = pick(args.rank, b.r)
    eval_every = pick(args.eval_every, b.eval_every if args.quick else TRAIN_EVAL_EVERY)
    lr = pick(args.lr, _default_lr(args.strategy))
    cfg = CompareConfig(
        model=args.model, data=args.data, text_column=args.text_column, label_column=args.label_column,
        strategies=[args.strategy], ranks=[r], seeds=[args.seed], lr=lr, max_steps=pick(args.max_steps, b.max_steps),
        stopping="plateau",  # one run on its own: stop on its validation plateau, best weights restored
        eval_every=eval_every, patience=pick(args.patience, b.patience), min_steps=b.min_steps,
        warmup_steps=b.warmup_steps,
        batch_size=pick(args.batch_size, b.batch_size), max_length=pick(args.max_length, b.max_length),
        max_train=b.max_train, max_val=b.max_val, max_test=b.max_test, output_dir=args.output_dir,
        threads=args.threads, mixed_precision=args.mixed_precision, target_modules=args.target_modules,
        quantize=args.quantize, quick=args.quick, progress=show_progress(args))
    problems = Problems()  # every bad argument, before any work
    problems.at_least("--rank", r, 1)
    for message in cfg.problems():
        if not message.startswith("--rank"):  # one rank here, checked above
            problems.add(message)
    problems.at_least("--checkpoint-every", args.checkpoint_every, 1)
    problems.raise_if_any()
    # an earlier run's adapter and metrics are never replaced by accident
    check_output_dir(cfg.output_dir, args.resume, args.overwrite, markers=RUN_FILES, what="run")
    spec = parse_strategy(args.strategy, r)
    with threads_for_run(cfg.threads) as (threads, _):
        task = prepare_task(cfg)
        os.makedirs(cfg.output_dir, exist_ok=True)
        out = execute_run(task, spec, args.seed, lr, cfg, desc=f"{spec.label} seed {args.seed}",
                          output_dir=cfg.output_dir, checkpoint_every=pick(args.checkpoint_every, eval_every),
                          resume=args.resume)
    run_info, model = out.record, out.model
    if spec.strategy.save is not None:
        spec.strategy.save(model, os.path.join(cfg.output_dir, "adapter"))
    run_info["settings"] = {"data": cfg.data, "model": task.model_path, "max_steps": cfg.max_steps, "lr": lr,
                            "patience": cfg.patience, "eval_every": cfg.eval_every, "batch_size": cfg.batch_size,
                            "max_length": cfg.max_length, "quantize": cfg.quantize, "threads": threads,
                            "label_names": task.data.label_names}
    atomic_write_text(os.path.join(cfg.output_dir, "metrics.json"), json.dumps(run_info, indent=1))
    print(f"{spec.label} seed {args.seed}: test accuracy {100 * run_info['test_accuracy']:.2f}%, macro-F1 "
          f"{100 * run_info['test_macro_f1']:.2f}% at the best validation step {run_info['best_step']} of "
          f"{run_info['steps']}, {run_info['trainable_params']:,} trainable parameters, "
          f"{run_info['wall_time_s']:.1f} s; wrote {os.path.abspath(cfg.output_dir)}")
    return 0
