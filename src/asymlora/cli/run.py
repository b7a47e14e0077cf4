"""``asymlora run RECIPE``: run one of the paper's experiment recipes (one table)."""
from __future__ import annotations

import argparse
import json
import sys

from asymlora.cli.options import (
    Problems,
    add_list,
    add_output_dir,
    add_quantize,
    show_progress,
    str_list,
)
from asymlora.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a paper recipe (GLUE, XSum/CNN-DM, Alpaca+MMLU, DomainBed) end to end",
        description=(
            "Run every (task x strategy x rank x seed) of a recipe: load the model and data from local "
            "paths, wrap with the asymmetric adapter (alpha = 2r), train, evaluate the paper's metric and "
            "write OUTPUT_DIR/<task>/<strategy>-r<r>/seed<seed>/result.json (+ adapter/). Completed runs are "
            "skipped, so an interrupted table resumes. RECIPE is a YAML path or a name in recipes/ "
            "(glue-roberta-large, xsum-bart-large, cnndm-bart-large, alpaca-mmlu-llama2-7b, domainbed-vit-b16)."
        ),
    )
    p.add_argument("recipe", help="recipe YAML path or name")
    p.add_argument("--model", help="local model directory (default: the recipe's model, from the HF cache)")
    p.add_argument("--data", help="local dataset directory (layout: see the task module's docs)")
    add_output_dir(p, None, "output folder (default: runs/<recipe name>)")
    add_list(p, "--seeds", help="override the recipe's seeds (commas or spaces)")
    add_list(p, "--tasks", kind=str_list,
             help="only these of the recipe's tasks, the fine-tuning problems of the table's columns (e.g. sst2 rte), "
                  "commas or spaces")
    add_list(p, "--strategies", kind=str_list, help="only these strategies (table rows), commas or spaces")
    add_list(p, "--rank", "-r", dest="ranks", metavar="R", help="override the ranks: one or several, commas or spaces")
    p.add_argument("--max-steps", type=int, help="stop each run after N optimizer steps (smoke tests)")
    p.add_argument("--epochs", type=float, help="override the number of epochs")
    p.add_argument("--lr", type=float, help="override the learning rate")
    p.add_argument("--batch-size", type=int, help="override the per-device batch size")
    p.add_argument("--max-train", type=int, help="use only the first N training examples")
    p.add_argument("--max-test", type=int,
                   help="use only the first N examples of each scored split (the split the table reports: GLUE's "
                        "dev sets, XSum/CNN-DM test, each DomainBed domain, each MMLU subject)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model weight dtype")
    p.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"),
                   help="autocast mode (default: the recipe's train.mixed_precision)")
    add_quantize(p, "the recipe's quantize field, else none")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-save-adapter", action="store_true", help="do not save the trained adapters")
    p.add_argument("--overwrite", action="store_true",
                   help="re-run the runs whose result.json exists, each one's result and adapter replaced when its "
                        "new run completes (without it they are skipped: a second run goes on with the first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, dotted keys, YAML values (e.g. eval_args.num_beams=2, "
                        "train.grad_accum=8, task_overrides.VLCS.data_args.test_env=LabelMe); repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate inputs and print the plan; train nothing")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> Problems:
    """Every bad command-line value (the recipe's own problems are added by the caller)."""
    p = Problems()
    p.at_least("--seeds", args.seeds, 0)
    p.at_least("--rank", args.ranks, 1)
    for flag in ("max_steps", "batch_size", "max_train", "max_test"):
        p.at_least(f"--{flag.replace('_', '-')}", getattr(args, flag), 1)
    p.positive("--epochs", args.epochs)
    p.positive("--lr", args.lr)
    p.existing("--data", args.data)
    from asymlora.core.quant import scheme_problem

    if problem := scheme_problem(args.quantize):
        p.add(problem)
    wants_gpu = [f for f, on in (("--mixed-precision fp16", args.mixed_precision == "fp16"),
                                 (f"--device {args.device}", (args.device or "").startswith("cuda"))) if on]
    if wants_gpu:
        import torch

        p.check(torch.cuda.is_available(), f"{' and '.join(wants_gpu)}: needs a CUDA GPU, and torch sees none")
    p.output_folder("--output-dir", args.output_dir)
    return p


def run(args: argparse.Namespace) -> int:
    from asymlora.recipes.base import (
        RunOptions,
        check_model,
        load_recipe,
        plan,
        run_recipe,
    )

    problems = _check(args)
    try:
        recipe = load_recipe(args.recipe, args.sets)
    except UserError as err:
        problems.add(str(err))
    problems.raise_if_any()
    opts = RunOptions(
        model=args.model, data=args.data, out=args.output_dir, seeds=args.seeds, tasks=args.tasks,
        strategies=args.strategies, ranks=args.ranks, max_steps=args.max_steps, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, max_train_samples=args.max_train,
        max_eval_samples=args.max_test, dtype=args.dtype, quantize=args.quantize, mixed_precision=args.mixed_precision,
        save_adapter=not args.no_save_adapter, force=args.overwrite, progress=show_progress(args),
        device=args.device,
    )
    try:
        if args.dry_run:
            runs = plan(recipe, opts)
            model = opts.model or recipe.model
            check_model(model, recipe)
            data = opts.data or recipe.data
            if data is None:
                raise UserError(f"recipe {recipe.name!r} needs a dataset: pass --data PATH. {recipe.data_hint}")
            fam = recipe.family_module()
            for t in dict.fromkeys(t for t, *_ in runs):
                fam.check_data(t, data, recipe.for_task(t))
            for t, s, r, seed in runs:
                print(f"{t}\t{s.name}\tr={r}\talpha={recipe.alpha_for(r, s):g}\tseed={seed}")
            print(f"{len(runs)} run{'' if len(runs) == 1 else 's'}; model {model}; data {data}", file=sys.stderr)
            return 0
        records = run_recipe(recipe, opts)
    except ImportError as err:  # an optional package the recipe needs (rouge-score, datasets, ...)
        raise UserError(f"a package this recipe needs is missing: {err}") from err
    summary = [{"task": r["task"], "strategy": r["strategy"], "r": r["r"], "seed": r["seed"], **r["columns"]}
               for r in records]
    print(json.dumps(summary, indent=1))
    return 0
