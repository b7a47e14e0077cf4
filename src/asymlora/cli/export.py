"""``asymlora export``: convert a saved asymlora adapter to Hugging Face PEFT's LoRA format."""
from __future__ import annotations

import argparse
import os

from asymlora.cli.options import Problems, add_output_dir, add_overwrite


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="convert an asymlora adapter folder to a PEFT LoRA adapter",
        description="Write ADAPTER_DIR (asymlora format) as a PEFT LoRA adapter in --output-dir, frozen "
        "factors rebuilt from their seed and included, so peft.PeftModel.from_pretrained(base, DIR) loads it.",
    )
    p.add_argument("adapter_dir", help="folder written by asymlora.save_adapter")
    add_output_dir(p, None, "output folder for the PEFT adapter (required)")
    add_overwrite(p, "adapter")
    p.add_argument("--format", default="peft", choices=["peft"], help="target format (default: peft)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymlora.formats.native import CONFIG_NAME, WEIGHTS_NAME
    from asymlora.formats.peft import convert_to_peft

    p = Problems()
    p.check(os.path.isfile(os.path.join(args.adapter_dir, CONFIG_NAME)),
            f"ADAPTER_DIR {args.adapter_dir!r} is not an adapter folder (no {CONFIG_NAME})")
    if p.check(args.output_dir is not None, "--output-dir/-o DIR is required"):
        p.check(os.path.abspath(args.adapter_dir) != os.path.abspath(args.output_dir),
                "--output-dir must differ from ADAPTER_DIR: both use adapter_config.json")
        p.output_folder("--output-dir", args.output_dir)
        p.earlier_output(args.output_dir, args.overwrite, (CONFIG_NAME, WEIGHTS_NAME), "adapter")
    p.raise_if_any()
    convert_to_peft(args.adapter_dir, args.output_dir)
    print(f"wrote PEFT LoRA adapter to {args.output_dir}")
    return 0
