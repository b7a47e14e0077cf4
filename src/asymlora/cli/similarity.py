"""``asymlora similarity``: layer-by-layer similarity of learned adapters across runs
(Figures 1-2 of Zhu et al., 2024).

    asymlora similarity RUN_DIR RUN_DIR [...] [-o DIR]
    asymlora similarity --demo [-o DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from asymlora.bundled import ENCODER, model_help
from asymlora.cli.options import Problems, add_list, add_output_dir, add_overwrite, plural, str_list
from asymlora.errors import UserError

DESCRIPTION = """\
Compare saved adapters of the same base model, layer by layer, for every pair of runs.
For each adapted layer: sim = ||U1^T U2||_F^2 / min(r1, r2), the mean squared cosine of
the principal angles between the row spaces of the two A's (resp. the column spaces of
the two B's) -- invariant to B*G, G^-1*A -- plus the plain cosine of the flattened
matrices. Writes heatmaps (layers x run pairs; A and B separately) as PNG, a long-format
CSV and summary.txt to --output-dir, and prints one summary line per factor.

--demo runs the paper's experiment on the embedded default model (all-MiniLM-L6-v2):
runs that share (task, init), only the task, only the init, or neither, for the standard
LoRA init (A random, B zero) and the reversed one (A zero, B random orthonormal), both
factors trained, and prints whether the paper's pattern appears (A's alike when the init
is shared, B's when the task is shared, for the standard init).

A RUN_DIR is an adapter folder or a folder written by `asymlora train`, `run` or `compare`:
its final adapter is used (adapters under checkpoint/ are passed over) and the choice is
printed. Only the given folders are searched, at most two levels down."""


DEFAULT_OUT = "similarity"  # RUN_DIRs' report folder when no --output-dir is given


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "similarity",
        help="layer-by-layer similarity of learned A's and B's across runs (paper Figs. 1-2)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="adapter folders, or folders written by `asymlora train`/`run`/`compare`")
    add_output_dir(p, None, "output folder for PNG/CSV (default: ./similarity for RUN_DIRs; "
                   "--demo writes only when given)")
    add_overwrite(p, "report")
    add_list(p, "--labels", kind=str_list, default=None,
             help="one label per RUN_DIR, commas or spaces (default: folder names)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative rank tolerance for the subspace bases (default: max(shape)*eps)")
    d = p.add_argument_group("--demo")
    d.add_argument("--demo", action="store_true", help="run the paper's Figures 1-2 experiment on the default model")
    d.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (default 60)")
    d.add_argument("--batch-size", type=int, default=None, help="batch size (default 16)")
    d.add_argument("--max-length", type=int, default=None, help="tokens per text (default 40)")
    d.add_argument("--rank", "-r", type=int, default=None, metavar="R", help="adapter rank r (default 8)")
    d.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    d.add_argument("--margin", type=float, default=None, help="verdict margin (default 0.02)")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--model", default=None, help=model_help(ENCODER))
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    """Every bad argument at once, before any work."""
    demo_only = ("max_steps", "batch_size", "max_length", "rank", "lr", "margin", "model", "threads")
    p = Problems()
    if args.demo:
        p.check(not args.run_dirs, f"--demo takes no RUN_DIRs (got {args.run_dirs}); use one or the other")
        p.check(args.labels is None and args.rtol is None, "--labels and --rtol apply to RUN_DIRs, not --demo")
    else:
        used = [f"--{n.replace('_', '-')}" for n in demo_only if getattr(args, n) is not None]
        p.check(not used, f"{', '.join(used)} only appl{'ies' if len(used) == 1 else 'y'} with --demo")
        p.check(len(args.run_dirs) >= 2,
                f"need at least 2 RUN_DIRs to compare, got {len(args.run_dirs)} (or use --demo)")
        from asymlora.analysis.similarity import pick_adapter_dir

        for d in args.run_dirs:  # every folder that is missing or holds no single adapter, at once
            try:
                pick_adapter_dir(d)
            except UserError as err:
                p.add(str(err))
        if args.labels is not None:
            p.check(len(args.labels) == len(args.run_dirs),
                    f"--labels needs {len(args.run_dirs)} names, one per RUN_DIR, got {args.labels!r}")
        if args.rtol is not None:
            p.check(args.rtol >= 0, f"--rtol must be >= 0, got {args.rtol}")
    p.output_folder("--output-dir", args.output_dir)
    if args.demo:
        p.earlier_output(args.output_dir, args.overwrite, ("verdict.json", "verdict.txt"), "demo")
    else:
        p.earlier_output(args.output_dir or DEFAULT_OUT, args.overwrite, ("similarity.csv", "summary.txt"),
                         "similarity report")
    p.raise_if_any()


def run(args: argparse.Namespace) -> int:
    _check(args)
    return _run_demo(args) if args.demo else _run_compare(args)


def _run_compare(args: argparse.Namespace) -> int:
    from asymlora.analysis.plots import save_report_heatmaps
    from asymlora.analysis.similarity import (
        compare_adapters,
        pick_adapter_dir,
    )
    from asymlora.fileio import atomic_write_text

    labels = args.labels
    for d in args.run_dirs:
        note = pick_adapter_dir(d)[1]
        if note:
            print(note)
    report = compare_adapters(args.run_dirs, labels, rtol=args.rtol)  # reads and checks every adapter first
    out = Path(args.output_dir or DEFAULT_OUT)
    lines = report.summary_lines("subspace") + report.summary_lines("cosine")
    written = [report.to_csv(out / "similarity.csv"), *save_report_heatmaps(report, out)]
    written.append(atomic_write_text(out / "summary.txt", "\n".join(lines) + "\n"))
    print(f"{plural(len(report.labels), 'run')}, {plural(len(report.pairs), 'pair')}, "
          f"{plural(len(report.layers), 'shared adapted layer')}")
    for line in lines:
        print(line)
    print("wrote: " + ", ".join(str(p) for p in written))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from asymlora.analysis.demo import DemoSettings, run_demo

    s = DemoSettings()
    for arg, field_name in (("max_steps", "steps"), ("batch_size", "batch_size"), ("max_length", "max_length"),
                            ("rank", "r"), ("lr", "lr"), ("margin", "margin"), ("model", "model_path"),
                            ("threads", "threads")):
        v = getattr(args, arg)
        if v is not None:
            setattr(s, field_name, v)
    s.validate()
    result = run_demo(s, out_dir=args.output_dir)
    if args.output_dir:
        print(f"wrote adapters, heatmaps, CSV and verdict to {args.output_dir}")
    return 0 if result.verdicts else 1
