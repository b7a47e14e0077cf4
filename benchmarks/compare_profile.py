"""Where a training step of the default ``asymlora compare`` spends its time: GEMM against the rest.

``python -m benchmarks.compare_profile [--strategies lora,b-only] [--max-steps 8] [--mixed-precision auto]``

The main job's own step: the bundled all-MiniLM-L6-v2 on fortunes, batch 16 of the real
length-grouped training batches (48 tokens at most), adapters r=8 on query/value, AdamW, one
thread (what a sweep worker runs), at the precision ``--mixed-precision`` would pick
(``auto``: measured, asymlora.precision). ``torch.profiler`` records ``--max-steps`` steps after two
of warm-up, and one scoring pass over the validation split (batch 128, no autograd); each op's
self CPU time goes to GEMM (matrix products) or to everything else. Proportions only: the
machine may be shared, so absolute times say little. Run it under the instruction-set caps of
the CPU kind to profile (README, "Two commands").
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

# self time of these ops is the matrix-product kernels (fp32 MKL, bf16 oneDNN)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
            "aten::mkldnn_linear", "aten::_mkldnn_matmul", "aten::linear_backward")


def split(prof, passes: int) -> dict:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / passes / 1e3
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / passes / 1e3
    top = sorted(((e.key, e.self_cpu_time_total / passes / 1e3) for e in events), key=lambda kv: -kv[1])[:8]
    return {"ms": round(total, 2), "gemm_ms": round(gemm, 2), "gemm_share": round(gemm / total, 3) if total else 0.0,
            "top_ms": {k: round(v, 2) for k, v in top}}


def train_step(model, opt, batch, precision_context) -> None:
    """One optimizer step as fit() takes it: forward under the run's precision, backward, AdamW."""
    with precision_context:
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def build_parser() -> argparse.ArgumentParser:
    """The profiler's flags, in the ``asymlora`` command line's vocabulary (docs/cli.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default="lora,b-only", help="comma-separated (default: lora,b-only)")
    parser.add_argument("--max-steps", type=int, default=8, help="training steps profiled (default: 8)")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                        help="as `asymlora compare` takes it (default: auto, measured)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from asymlora.startup import start_command_process

    start_command_process()  # offline, and no third-party start-up chatter around the JSON

    from transformers import AutoTokenizer

    from asymlora import AsymLoraConfig, wrap
    from asymlora.bundled import default_model_path
    from asymlora.compare.data import TokenizedDataset, evaluate_classifier, load_text_dataset
    from asymlora.compare.task import bundled_classifier, load_classifier
    from asymlora.precision import cpu_precision
    from asymlora.sweep.run_settings import autocast, resolve_precision

    precision = resolve_precision(args.mixed_precision)
    base, train, collate = bundled_classifier("fortunes")

    ds = load_text_dataset("fortunes", 0)
    val = TokenizedDataset(ds.val, AutoTokenizer.from_pretrained(default_model_path()), 48)
    lengths = train.lengths()
    order = sorted(range(len(train)), key=lambda i: -lengths[i])  # batches of similar lengths, as the sweep's
    n = args.max_steps + 2  # batches spread evenly over the lengths, as a run's shuffled batches are
    starts = [round(k * (len(order) - 16) / (n - 1)) for k in range(n)]
    batches = [collate([train[i] for i in order[s:s + 16]]) for s in starts]
    out = {"precision": precision, "cpu_precision": cpu_precision().as_record() if args.mixed_precision == "auto"
           else None, "isa": torch.backends.cpu.get_cpu_capability(), "strategies": {}}
    for name in args.strategies.split(","):
        model = load_classifier(default_model_path(), ds.label_names)
        model.load_state_dict(base.state_dict())
        wrap(model, AsymLoraConfig.preset(name, r=8, seed=0, modules_to_save=["classifier"]))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for b in batches[:2]:
            train_step(model, opt, b, autocast(precision))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[2:]:
                train_step(model, opt, b, autocast(precision))
        rec = {"train_step": split(prof, len(batches) - 2)}
        with profile(activities=[ProfilerActivity.CPU]) as prof, autocast(precision):
            evaluate_classifier(model, val, collate, len(ds.label_names))
        rec["validation_pass"] = split(prof, 1)
        out["strategies"][name] = rec
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())  # run from the repository root: python -m benchmarks.compare_profile
