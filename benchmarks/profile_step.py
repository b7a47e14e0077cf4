"""Profile one training step per variant with ``torch.profiler`` and split the time by op.

``python -m benchmarks.profile_step [--model bert|llama] [--rank 64] [--target-modules all-linear]``

Prints, per variant, total self-CPU time and the top ops, and the share of matmul time spent
in adapter-sized products (an operand dimension equal to r) — what the adapter itself costs.
"""
from __future__ import annotations

import argparse
import os
import warnings

from torch.profiler import ProfilerActivity, profile

from .common import setup_threads
from .models import build_base, build_variant, make_inputs


def profile_variant(variant, inputs, steps: int = 2) -> dict:
    step = variant.step_fn(inputs)
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / steps
    by_op: dict[str, float] = {}
    for e in events:
        by_op[e.key] = by_op.get(e.key, 0.0) + e.self_cpu_time_total / steps
    return {"total_ms": total / 1e3, "by_op_ms": {k: v / 1e3 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
            "events": events}


def adapter_share(events, r: int, steps: int) -> float:
    mm = [e for e in events if e.key in ("aten::mm", "aten::addmm")]  # bmm = attention, never the adapter
    tot = sum(e.self_cpu_time_total for e in mm)
    ad = sum(e.self_cpu_time_total for e in mm if any(r in (s or []) for s in (e.input_shapes or [])))
    return ad / tot if tot else 0.0


def build_parser() -> argparse.ArgumentParser:
    """The profiler's flags, in the ``asymlora`` command line's vocabulary (docs/cli.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bert", choices=["bert", "llama"])
    parser.add_argument("--rank", "-r", type=int, default=64, help="adapter rank r (default 64)")
    parser.add_argument("--target-modules", default="all-linear", choices=["qv", "all-linear"],
                        help="adapted modules: qv (query/value) or all-linear (default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    setup_threads(args.threads)
    base, shapes = build_base(args.model, False)
    inputs = make_inputs(shapes)
    for name in ("floor", "asym-b-only", "peft-lora", "peft-lora-frozenA"):
        v = build_variant(name, base, args.model, args.rank, args.target_modules)
        res = profile_variant(v, inputs)
        share = adapter_share(res["events"], args.rank, 2)
        top = ", ".join(f"{k} {ms:.0f}" for k, ms in list(res["by_op_ms"].items())[: args.top])
        print(f"{name:18s} self-CPU {res['total_ms']:.0f} ms/step; matmul share in rank-{args.rank} products "
              f"{100 * share:.1f}%; top ms: {top}")
        del v
    return 0


if __name__ == "__main__":
    raise SystemExit(main())  # run from the repository root: python -m benchmarks.profile_step
