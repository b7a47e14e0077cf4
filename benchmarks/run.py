"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--output-dir DIR] [--only NAME ...]``.

Writes ``DIR/results.json`` (all measurements, raw per-round times included) and
``DIR/results.md`` (goal verdicts and tables). Full mode defaults to ``benchmarks/``; quick
mode (tiny shapes, 2 rounds: checks that everything runs, timings meaningless) defaults to a
fresh temporary folder.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence

from asymlora.fileio import atomic_write_text

HERE = os.path.dirname(os.path.abspath(__file__))


_atomic_write = atomic_write_text


# (name in --only, module under benchmarks/, progress title), in the order they run
STAGES = [
    ("train", "train_step", "training step (time + memory)"),
    ("layer_memory", "layer_memory", "per-layer saved activations"),
    ("init", "init_speed", "initialisation, LLaMA-2-7B shapes"),
    ("checkpoint", "checkpoint_size", "checkpoint size and save/load time"),
    ("inference", "inference", "inference after merge"),
    ("multi_adapter", "multi_adapter", "mixed-adapter batches, K sweep"),
]
BENCHMARKS = tuple(name for name, _, _ in STAGES)


@contextlib.contextmanager
def _suite_global_state(threads: int) -> Iterator[None]:
    """The suite runs on ``threads`` torch threads, with FutureWarning/UserWarning silenced and
    torch's RNG seeded by the stages; all three are put back on exit, so the caller's process
    (a test session, a notebook) runs afterwards exactly as before."""
    import torch

    from .common import setup_threads

    before = torch.get_num_threads()
    with warnings.catch_warnings(), torch.random.fork_rng():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        setup_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def run_suite(quick: bool = False, only: Sequence[str] | None = None, threads: int = 2, log=print) -> dict:
    """Run the selected benchmarks in this process and return the results dict. Torch's thread
    count, RNG and the warning filters are the same after the call as before."""
    only = list(only or BENCHMARKS)
    bad = [b for b in only if b not in BENCHMARKS]
    if bad:
        raise ValueError(f"unknown benchmark(s) {bad}; valid: {', '.join(BENCHMARKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _suite_global_state(threads):
        return _run_stages(quick, only, log)


def _run_stages(quick: bool, only: list[str], log) -> dict:
    from .common import machine_info

    results: dict = {"quick": quick, "machine": machine_info(), "benchmarks": only}
    t0 = time.perf_counter()
    for i, (name, module, title) in enumerate(STAGES, 1):
        if name in only:
            log(f"[{i}/{len(STAGES)}] {title}")
            results[name] = importlib.import_module(f".{module}", __package__).run(quick=quick, log=log)
    results["total_seconds"] = time.perf_counter() - t0
    from .report import goals

    results["goals"] = goals(results)
    return results


def build_parser() -> argparse.ArgumentParser:
    """The suite's flags, in the ``asymlora`` command line's vocabulary (docs/cli.md)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke run (seconds)")
    parser.add_argument("--output-dir", "-o", default=None, metavar="DIR",
                        help="output folder (default: benchmarks/ in full mode, a temp folder in quick mode)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--merge", action="store_true",
                        help="update only the benchmarks run (--only) inside an existing DIR/results.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.only:
        bad = [b for b in args.only if b not in BENCHMARKS]
        if bad:
            parser.error(f"unknown benchmark(s) {bad}; valid: {', '.join(BENCHMARKS)}")
    out = args.output_dir or (tempfile.mkdtemp(prefix="asymlora-bench-") if args.quick else HERE)
    os.makedirs(out, exist_ok=True)
    results = run_suite(quick=args.quick, only=args.only, threads=args.threads)
    from .report import goals, render

    previous = os.path.join(out, "results.json")
    if args.merge and os.path.isfile(previous):
        with open(previous) as fh:
            merged = json.load(fh)
        if merged.get("quick") != results["quick"]:
            parser.error("--merge: quick and full results cannot be mixed")
        merged.setdefault("runs", []).append({"benchmarks": results["benchmarks"], "machine": results["machine"],
                                             "seconds": results["total_seconds"]})
        for name in results["benchmarks"]:
            merged[name] = results[name]
        merged["benchmarks"] = sorted(set(merged.get("benchmarks", [])) | set(results["benchmarks"]))
        merged["total_seconds"] = merged.get("total_seconds", 0) + results["total_seconds"]
        merged["goals"] = goals(merged)
        results = merged

    _atomic_write(os.path.join(out, "results.json"), json.dumps(results, indent=1, default=str) + "\n")
    _atomic_write(os.path.join(out, "results.md"), render(results))
    print(render(results))
    print(f"wrote {os.path.join(out, 'results.json')} and results.md")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # `python benchmarks/run.py`: make the package importable
        sys.path.insert(0, os.path.dirname(HERE))
        __package__ = "benchmarks"
        import benchmarks.run as _self

        sys.exit(_self.main())
    sys.exit(main())
