"""``asymlora results DIR...``: the paper's tables from `asymlora run` folders
(``asymlora.recipes.results`` builds them)."""
from __future__ import annotations

import argparse
import sys

from asymlora.cli.options import Problems, add_output_dir, add_overwrite


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "results",
        help="collect `asymlora run` outputs into the paper's tables (markdown + CSV)",
        description="Scan DIR... for result.json files written by `asymlora run` and print one table per "
                    "recipe: strategies x ranks as rows, tasks as columns, mean ± std over seeds (percent). "
                    "No result.json under DIR... is a mistake in the input: one line on stderr, exit status 2.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run output folders (searched recursively)")
    add_output_dir(p, None, "folder to also write results.md and results.csv into (default: print only)")
    add_overwrite(p, "table")
    p.add_argument("--digits", type=int, default=2, help="decimals in the markdown table (default: 2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from asymlora.recipes.results import load_tables, to_markdown, write_tables

    p = Problems()
    for d in args.dirs:
        p.existing("DIR", d)
    p.at_least("--digits", args.digits, 0)
    p.output_folder("--output-dir", args.output_dir)
    p.earlier_output(args.output_dir, args.overwrite, ("results.md", "results.csv"), "table")
    p.raise_if_any()
    tables = load_tables(args.dirs)
    print(to_markdown(tables, args.digits), end="")
    if args.output_dir:
        md, table_csv = write_tables(tables, args.output_dir, args.digits)
        print(f"wrote {md} and {table_csv}", file=sys.stderr)
    return 0
