"""``asymlora export``: convert a saved asymlora adapter to Hugging Face PEFT's LoRA format."""
from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="convert an asymlora adapter folder to a PEFT LoRA adapter",
        description="Write ADAPTER_DIR (asymlora format) as a PEFT LoRA adapter in --out, frozen factors "
        "rebuilt from their seed and included, so peft.PeftModel.from_pretrained(base, OUT) loads it.",
    )
    p.add_argument("adapter_dir", help="folder written by asymlora.save_adapter")
    p.add_argument("--out", required=True, help="output folder for the PEFT adapter")
    p.add_argument("--format", default="peft", choices=["peft"], help="target format (default: peft)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import convert_to_peft

    if os.path.abspath(args.adapter_dir) == os.path.abspath(args.out):
        raise SystemExit("--out must differ from ADAPTER_DIR: both use adapter_config.json")
    convert_to_peft(args.adapter_dir, args.out)
    print(f"wrote PEFT LoRA adapter to {args.out}")
    return 0
