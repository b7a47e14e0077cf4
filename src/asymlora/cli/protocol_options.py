"""The flags of the sweep protocol (``asymlora.sweep.config.SweepConfig``), one set shared by
``asymlora compare`` and ``asymlora sft``: each command shows its own defaults in the help and
fills in the flags not given from them."""
from __future__ import annotations

import argparse

from asymlora.cli.options import add_list, float_list, show_progress, str_list

__all__ = ["add_protocol_options", "protocol_settings"]


def _show_default(v) -> str:
    if v is None:
        return "all"
    if isinstance(v, list):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return str(v)


def add_protocol_options(p: argparse.ArgumentParser, d: dict, lr_note: str, targets_note: str) -> None:
    """The flags of the fair protocol, shared by ``compare`` and ``sft`` (``d``: the defaults
    shown in the help; ``protocol_settings`` fills in the ones not given)."""
    show = _show_default
    add_list(p, "--strategies", kind=str_list, default=None,
             help="commas or spaces: lora, b-only, a-only, head-only, peft:NAME, MODULE:FACTORY, any with @Kr "
                  f"(`asymlora compare --help` lists them) (default: {show(d['strategies'])})")
    add_list(p, "--rank", "-r", dest="ranks", default=None, metavar="R",
             help=f"adapter ranks r, one or several, commas or spaces (default: {show(d['ranks'])})")
    add_list(p, "--seeds", default=None,
             help="seeds, commas or spaces, paired across strategies; the first one picks the learning rates "
                  f"(default: {show(d['seeds'])})")
    add_list(p, "--lrs", kind=float_list, default=None,
             help=f"learning-rate grid, one picked per strategy on {lr_note} (default: {show(d['lrs'])})")
    p.add_argument("--lr", type=float, default=None, help="one learning rate for every strategy (no selection)")
    p.add_argument("--max-lr-extensions", type=int, default=None,
                   help="when the best rate is at an edge of the grid, try up to N further rates beyond it "
                        f"(default: {d['max_lr_extensions']}; 0 = only report it)")
    p.add_argument("--stopping", choices=["budget", "plateau"], default=None,
                   help="budget: every run trains --max-steps steps with a linearly decaying rate and keeps its "
                        "final weights; plateau: constant rate, stop after --patience evaluations without a new "
                        f"best, best weights restored (default: {d['stopping']})")
    p.add_argument("--schedule", choices=["linear", "wsd"], default=None,
                   help="budget: the rate decays linearly from the end of warm-up (linear) or over the last "
                        "quarter only (wsd: warm-up, stable, decay)")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"steps of every run (budget), or its step cap (plateau) (default: {d['max_steps']})")
    p.add_argument("--eval-every", type=int, default=None,
                   help=f"validate every N steps (budget: the lr search's pilot runs) (default: {d['eval_every']})")
    p.add_argument("--patience", type=int, default=None,
                   help=f"plateau: stop after N evaluations without a new best (default: {d['patience']})")
    p.add_argument("--min-steps", type=int, default=None,
                   help=f"plateau: evaluations before this step do not use up patience (default: {d['min_steps']})")
    p.add_argument("--no-prune", action="store_true",
                   help="run every pilot of the lr search to the end (default: a pilot that is clearly losing at "
                        "1/4 or 1/2 of the budget stops there)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warm-up steps (default: {d['warmup_steps']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {d['batch_size']})")
    p.add_argument("--max-length", type=int, default=None, help=f"max tokens per text (default: {d['max_length']})")
    p.add_argument("--max-train", type=int, default=None,
                   help=f"cap on training examples (default: {show(d['max_train'])})")
    p.add_argument("--max-val", type=int, default=None,
                   help=f"cap on validation examples (default: {show(d['max_val'])})")
    p.add_argument("--max-test", type=int, default=None, help=f"cap on test examples (default: {show(d['max_test'])})")
    p.add_argument("--margin", type=float, default=None,
                   help="equivalence margin of the verdicts, in accuracy points (default: 1)")
    add_list(p, "--target-modules", kind=str_list, default=None, help=f"adapted module names (default: {targets_note})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (default: a short probe picks all CPUs or 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running adapter runs side by side, one thread each (default: one per CPU "
                        "core, at most 2; 1 on a GPU)")
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                   help="auto = bf16 (or fp16) on a GPU, and on a CPU where a short probe measures bf16 "
                        "≥ 1.2× as fast as fp32 (native AVX512-BF16 or AMX), else fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from asymlora.sweep.backends import BACKENDS

    p.add_argument("--backend", choices=list(BACKENDS), default="local",
                   help="where runs execute: " + "; ".join(f"{b.name} = {b.help}" for b in BACKENDS.values())
                        + " (default: local)")
    p.add_argument("--ray-address", default=None,
                   help="ray: join a running cluster (auto, or HOST:PORT of `ray start --head`); default: start a "
                        "local one on this machine, loopback only")
    p.add_argument("--cpus-per-run", type=float, default=1, help="ray: CPUs each run asks for (default: 1)")
    p.add_argument("--gpus-per-run", type=float, default=0, help="ray: GPUs each run asks for (default: 0)")
    p.add_argument("--resume", action="store_true",
                   help="go on with the interrupted sweep in --output-dir: its finished runs are kept, the others "
                        "run (refused when the settings, the data or the model differ from the saved ones)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new sweep in an --output-dir that holds an earlier one; the earlier results are "
                        "replaced only once the new sweep completes (without it, or --resume, such a folder "
                        "is refused)")


_PROTOCOL_KEYS = ("strategies", "ranks", "seeds", "lrs", "max_lr_extensions", "stopping", "max_steps", "eval_every",
                  "patience", "min_steps", "warmup_steps", "batch_size", "max_length", "max_train", "max_val",
                  "max_test")


def protocol_settings(args: argparse.Namespace, d: dict) -> dict:
    """The protocol fields of a config: each flag given, else its default from ``d``."""
    out = {k: d[k] if getattr(args, k) is None else getattr(args, k) for k in _PROTOCOL_KEYS}
    out.update(lr=args.lr, margin=(1.0 if args.margin is None else args.margin) / 100, threads=args.threads,
               workers=args.workers, mixed_precision=args.mixed_precision, progress=show_progress(args),
               prune=not args.no_prune, resume=args.resume, overwrite=args.overwrite, backend=args.backend,
               ray_address=args.ray_address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run)
    if args.schedule is not None:
        out["schedule"] = args.schedule
    if args.target_modules is not None:
        out["target_modules"] = args.target_modules
    return out
