"""``asymlora theory``: the paper's linear theory (section 4) as numbers, tables and a plot.

``asymlora theory simulate``  expected loss of A-only / B-only / both vs rank r, per input spectrum
``asymlora theory bound``     Xu–Raginsky generalisation bound from a model's adapted-layer shapes

The computations are ``asymlora.theory.linear`` / ``bounds``; the text, files and plot
``asymlora.theory.report``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from asymlora.cli.options import Problems, add_list, add_output_dir, add_overwrite, str_list

DEFAULT_OUT = "./asymlora-theory"


# ---- simulate -----------------------------------------------------------------------------
def _check_simulate(args: argparse.Namespace) -> None:
    """Every bad ``theory simulate`` argument at once, before any work."""
    from asymlora.theory.linear import SPECTRA

    p = Problems()
    p.at_least("--d-in", args.d_in, 1)
    p.at_least("--d-out", args.d_out, 1)
    p.at_least("--rank", args.rank, 1)
    top = min(args.d_in, args.d_out)
    if top >= 1:
        too_big = [r for r in args.rank if r > top]
        p.check(not too_big, f"--rank {too_big} exceeds min(--d-in, --d-out) = {top}")
    for sp in args.spectra:
        p.check(sp in SPECTRA, f"--spectra: unknown spectrum {sp!r}; valid: {', '.join(SPECTRA)}")
    if "lowrank" in args.spectra and args.d_in >= 1:
        p.check(1 <= args.lowrank_k <= max(args.d_in, 1),
                f"--lowrank-k must be in [1, --d-in={args.d_in}], got {args.lowrank_k}")
    p.positive("--decay", args.decay)
    p.at_least("--sigma2", args.sigma2, 0)
    p.at_least("--mc-samples", args.mc_samples, 2)
    p.at_least("--seed", args.seed, 0)
    p.output_folder("--output-dir", args.output_dir)
    p.earlier_output(args.output_dir, args.overwrite, ("simulation.csv", "simulation.json", "simulation.png"),
                     "simulation")
    p.raise_if_any()


def run_simulate(args: argparse.Namespace) -> int:
    from asymlora.theory.linear import simulate
    from asymlora.theory.report import simulation_report, write_simulation

    _check_simulate(args)
    rows = simulate(
        d_in=args.d_in,
        d_out=args.d_out,
        ranks=args.rank,
        spectra=args.spectra,
        sigma2=args.sigma2,
        lowrank_k=args.lowrank_k,
        decay=args.decay,
        n_samples=args.mc_samples,
        seed=args.seed,
        b_method="mc" if args.mc_all else "auto",
    )
    print(simulation_report(rows))
    config = {"d_in": args.d_in, "d_out": args.d_out, "ranks": sorted(set(args.rank)), "spectra": list(args.spectra),
              "sigma2": args.sigma2, "lowrank_k": args.lowrank_k, "decay": args.decay, "mc_samples": args.mc_samples,
              "mc_all": bool(args.mc_all), "seed": args.seed}
    written = write_simulation(Path(args.output_dir), rows, config, plot=not args.no_plots)
    print("\nWrote " + ", ".join(str(p) for p in written))
    return 0


# ---- bound --------------------------------------------------------------------------------
def _targets(names: list[str] | None) -> Any:
    """``--target-modules``: None (the preset's/architecture's), one name, regex or all-linear
    (a string), or several names (a list)."""
    if names is None:
        return None
    return names[0] if len(names) == 1 else names


def _check_bound(args: argparse.Namespace) -> None:
    """Every bad ``theory bound`` argument at once, before any work."""
    p = Problems()
    p.check(not (args.shapes and args.model), "give either --model or --shapes, not both")
    p.check(not (args.shapes and args.target_modules is not None),
            "--target-modules applies to --model, not to --shapes")
    p.check(args.target_modules is None or bool(args.target_modules),
            "--target-modules is empty; give names (q_proj,v_proj), a regex, or all-linear")
    p.at_least("--rank", args.rank, 1)
    p.positive("--q", args.q)
    p.positive("--sigma", args.sigma)
    p.at_least("--n", args.n, 1)
    p.output_folder("--output-dir", args.output_dir)
    p.earlier_output(args.output_dir, args.overwrite, ("bound.csv", "bound.json"), "bound table")
    p.raise_if_any()


def run_bound(args: argparse.Namespace) -> int:
    from asymlora.theory.bounds import PRESETS, bound_table, load_shapes, parse_shapes
    from asymlora.theory.report import bound_report, write_bound

    _check_bound(args)
    targets = _targets(args.target_modules)
    if args.shapes:
        shapes = parse_shapes(args.shapes)
        source = f"shapes {args.shapes}"
    else:
        model = args.model or "llama-2-7b"
        shapes, desc = load_shapes(model, targets)
        source = f"{model}: {desc}" if model.lower() in PRESETS else desc
    rows = bound_table(shapes, ranks=args.rank, q=args.q, sigma=args.sigma, ns=args.n)
    print(bound_report(shapes, rows, source, args.q, args.sigma))
    if args.output_dir is None:
        print("\n(tables only; -o DIR also writes bound.csv and bound.json)")
        return 0
    written = write_bound(Path(args.output_dir), shapes, rows, source, targets)
    print("\nWrote " + ", ".join(str(p) for p in written))
    return 0


# ---- registration -----------------------------------------------------------------------
def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "theory",
        help="the paper's linear theory: simulation of Theorem 4.3 and the generalisation bound",
        description="Section 4 of Zhu et al. (2024) as numbers: 'simulate' compares A-only, B-only and "
        "both-trained adapters on a synthetic linear model; 'bound' evaluates the information-theoretic "
        "generalisation bound from a model's adapted-layer shapes.",
    )
    sub = parser.add_subparsers(dest="theory_command", metavar="{simulate,bound}")

    sim = sub.add_parser(
        "simulate",
        help="expected loss vs rank r for A-only / B-only / both, per input spectrum (Theorem 4.3)",
        description="Synthetic linear regression y = W_t x + noise; W0 = 0; Δ random Gaussian scaled so "
        "that ‖ΔΣ^½‖² = d_out. Writes simulation.csv, simulation.json and simulation.png to --output-dir.",
    )
    sim.add_argument("--d-in", type=int, default=64, help="input dimension (default 64)")
    sim.add_argument("--d-out", type=int, default=64, help="output dimension (default 64)")
    add_list(sim, "--rank", "-r", default=[1, 2, 4, 8, 16, 32], metavar="R",
             help="adapter ranks r, one or several, commas or spaces (default: 1,2,4,8,16,32)")
    add_list(
        sim, "--spectra", kind=str_list, default=["isotropic", "lowrank", "powerlaw"],
        help="input spectra: isotropic (Σ=I), lowrank (rank k), powerlaw (λ_i ∝ i^-decay)",
    )
    sim.add_argument("--lowrank-k", type=int, default=8, help="rank of Σ for the 'lowrank' spectrum (default 8)")
    sim.add_argument("--decay", type=float, default=1.0, help="power-law exponent of the 'powerlaw' spectrum")
    sim.add_argument("--sigma2", type=float, default=0.1, help="noise variance per output σ² (default 0.1)")
    sim.add_argument("--mc-samples", type=int, default=1000, help="Haar draws per Monte-Carlo estimate (default 1000)")
    sim.add_argument("--mc-all", action="store_true", help="use Monte-Carlo for B-only even where a closed form exists")
    sim.add_argument("--seed", type=int, default=0, help="seed of the random Δ and the Haar draws (default: 0)")
    sim.add_argument("--no-plots", action="store_true", help="skip simulation.png")
    add_output_dir(sim, DEFAULT_OUT, f"artefact folder (default {DEFAULT_OUT})")
    add_overwrite(sim, "simulation")
    sim.set_defaults(func=run_simulate)

    bnd = sub.add_parser(
        "bound",
        help="information-theoretic generalisation bound for A-only / B-only / both",
        description="Counts trained adapter parameters from a model's real layer shapes (built on the meta "
        "device: no weights) and prints sqrt(2σ²·ln2·q·k/n). With -o DIR also writes bound.csv and bound.json there.",
    )
    bnd.add_argument(
        "--model", default=None,
        help="preset (llama-2-7b, roberta-large, bart-large, vit-base) or a local config.json / model dir "
        "(default llama-2-7b)",
    )
    bnd.add_argument("--shapes", default=None,
                     help="instead of --model: layer shapes DINxDOUT[*COUNT],... e.g. 4096x4096*64")
    add_list(
        bnd, "--target-modules", kind=str_list, default=None,
        help="adapted modules: names (commas or spaces), one regex, or all-linear "
             "(default: the preset's/architecture's)",
    )
    add_list(bnd, "--rank", "-r", default=[8, 16], metavar="R",
             help="adapter ranks r, one or several, commas or spaces (default: 8,16)")
    bnd.add_argument("--q", type=float, default=16, help="bits per trained parameter (default 16)")
    bnd.add_argument("--sigma", type=float, default=1.0, help="sub-Gaussian parameter σ of the loss (default 1)")
    add_list(bnd, "--n", default=[10_000], help="training-set sizes, commas or spaces (default 10000)")
    add_output_dir(bnd, None, "also write bound.csv and bound.json to this folder (default: print only)")
    add_overwrite(bnd, "bound table")
    bnd.set_defaults(func=run_bound)

    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(func=show_help)
