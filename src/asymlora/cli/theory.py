"""``asymlora theory``: the paper's linear theory (section 4) as numbers, tables and a plot.

``asymlora theory simulate``  expected loss of A-only / B-only / both vs rank r, per input spectrum
``asymlora theory bound``     Xu–Raginsky generalisation bound from a model's adapted-layer shapes
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asymlora.cli.options import Problems, add_list, add_output_dir, str_list
from asymlora.errors import UserError
from asymlora.text import format_table

DEFAULT_OUT = "./asymlora-theory"


# ---- artefact writers (atomic: temp file in the same folder + os.replace) ---------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    from asymlora.fileio import atomic_write_bytes

    atomic_write_bytes(path, data)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write_bytes(path, buf.getvalue().encode())


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


# ---- simulate -----------------------------------------------------------------------------
def _plot_simulation(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spectra = list(dict.fromkeys(r["spectrum"] for r in rows))
    fig = Figure(figsize=(4.2 * len(spectra), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(spectra), squeeze=False, sharey=True)[0]
    styles = {
        "a_only": ("A-only (B random, frozen)", "tab:red", "s", "-", 7),
        "b_only": ("B-only (A random, frozen)", "tab:blue", "o", "--", 4),
        "both": ("both trained (optimal)", "tab:green", "^", "-", 6),
    }
    for ax, sp in zip(axes, spectra):
        sub = sorted((r for r in rows if r["spectrum"] == sp), key=lambda r: r["r"])
        xs = [r["r"] for r in sub]
        for key, (label, color, marker, ls, ms) in styles.items():
            ys = [r[f"loss_{key}"] for r in sub]
            errs = [r.get(f"se_{key}", 0.0) for r in sub]
            ax.errorbar(
                xs, ys, yerr=[2 * e for e in errs] if any(e > 0 for e in errs) else None,
                label=label, color=color, marker=marker, ls=ls, ms=ms, capsize=2,
            )
        ax.axhline(sub[0]["noise_floor"], color="gray", ls="--", lw=1, label="noise floor d_out·σ²")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("rank r")
        ax.set_title(f"{sp} Σ (eff. rank {sub[0]['effective_rank']:.1f})", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("expected loss E‖y − ŷ‖²  (B-only: ±2 s.e.)")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"Theorem 4.3: d_in={rows[0]['d_in']}, d_out={rows[0]['d_out']}, σ²={rows[0]['sigma2']:g}", fontsize=10
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    _atomic_write_bytes(path, buf.getvalue())


def _fmt_loss(mean: float, se: float) -> str:
    return f"{mean:.4f}" if se == 0 else f"{mean:.4f}±{se:.4f}"


def _check_simulate(args: argparse.Namespace) -> None:
    """Every bad ``theory simulate`` argument at once, before any work."""
    from asymlora.theory.linear import SPECTRA

    p = Problems()
    p.at_least("--d-in", args.d_in, 1)
    p.at_least("--d-out", args.d_out, 1)
    p.at_least("--ranks", args.ranks, 1)
    top = min(args.d_in, args.d_out)
    if top >= 1:
        too_big = [r for r in args.ranks if r > top]
        p.check(not too_big, f"--ranks {too_big} exceed min(--d-in, --d-out) = {top}")
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
    p.raise_if_any()


def run_simulate(args: argparse.Namespace) -> int:
    from asymlora.theory.linear import simulate, summarize_simulation

    _check_simulate(args)
    rows = simulate(
        d_in=args.d_in,
        d_out=args.d_out,
        ranks=args.ranks,
        spectra=args.spectra,
        sigma2=args.sigma2,
        lowrank_k=args.lowrank_k,
        decay=args.decay,
        n_samples=args.mc_samples,
        seed=args.seed,
        b_method="mc" if args.mc_all else "auto",
    )
    out = Path(args.output_dir)
    print(
        f"Linear model, d_in={args.d_in}, d_out={args.d_out}, σ²={args.sigma2:g}, signal ‖ΔΣ^½‖²=d_out "
        f"(W0=0). Expected loss; noise floor d_out·σ² = {rows[0]['noise_floor']:.4f}."
    )
    print("A-only: B Haar-random frozen (exact: r/d_out of the signal). B-only: A Haar-random frozen "
          "(exact where a closed form exists, else Monte-Carlo mean±s.e.). Both: optimal rank-r.\n")
    for sp in dict.fromkeys(r["spectrum"] for r in rows):
        sub = [r for r in rows if r["spectrum"] == sp]
        print(f"[{sp}]  rank(Σ)={sub[0]['sigma_rank']}, effective rank={sub[0]['effective_rank']:.1f}")
        table = [
            [
                str(r["r"]),
                _fmt_loss(r["loss_a_only"], r["se_a_only"]),
                _fmt_loss(r["loss_b_only"], r["se_b_only"]) + ("" if r["method_b_only"] == "exact" else " (mc)"),
                f"{r['loss_both']:.4f}",
                f"{r['excess_a_only']:.3f}/{r['excess_b_only']:.3f}/{r['excess_both']:.3f}",
            ]
            for r in sub
        ]
        print(format_table(["r", "A-only", "B-only", "both", "excess/‖M‖² A/B/both"], table))
        print()
    print("Summary:")
    for line in summarize_simulation(rows):
        print("  " + line)
    _write_csv(out / "simulation.csv", rows)
    _write_json(
        out / "simulation.json",
        {
            "description": "Zhu et al. 2024, Theorem 4.3 on synthetic linear data (asymlora theory simulate)",
            "config": {
                "d_in": args.d_in,
                "d_out": args.d_out,
                "ranks": sorted(set(args.ranks)),
                "spectra": list(args.spectra),
                "sigma2": args.sigma2,
                "lowrank_k": args.lowrank_k,
                "decay": args.decay,
                "mc_samples": args.mc_samples,
                "mc_all": bool(args.mc_all),
                "seed": args.seed,
            },
            "rows": rows,
        },
    )
    written = [out / "simulation.csv", out / "simulation.json"]
    if not args.no_plot:
        _plot_simulation(out / "simulation.png", rows)
        written.append(out / "simulation.png")
    print("\nWrote " + ", ".join(str(p) for p in written))
    return 0


# ---- bound --------------------------------------------------------------------------------
def _parse_targets(text: str | None) -> Any:
    if text is None:
        return None
    text = text.strip()
    if not text:
        raise UserError("--targets is empty; give names (q_proj,v_proj), a regex, or all-linear")
    if "," in text:
        names = [t.strip() for t in text.split(",") if t.strip()]
        if not names:
            raise UserError(f"--targets {text!r} names no module")
        return names
    return text  # a single name, a regex, or "all-linear"


def _check_bound(args: argparse.Namespace) -> None:
    """Every bad ``theory bound`` argument at once, before any work."""
    p = Problems()
    p.check(not (args.shapes and args.model), "give either --model or --shapes, not both")
    p.check(not (args.shapes and args.targets is not None), "--targets applies to --model, not to --shapes")
    p.at_least("--r", args.r, 1)
    p.positive("--q", args.q)
    p.positive("--sigma", args.sigma)
    p.at_least("--n", args.n, 1)
    try:
        _parse_targets(args.targets)
    except UserError as err:
        p.add(str(err))
    p.output_folder("--output-dir", args.output_dir)
    p.raise_if_any()


def run_bound(args: argparse.Namespace) -> int:
    from asymlora.theory.bounds import PRESETS, bound_table, load_shapes, parse_shapes

    _check_bound(args)
    targets = _parse_targets(args.targets)
    if args.shapes:
        shapes = parse_shapes(args.shapes)
        source = f"shapes {args.shapes}"
    else:
        model = args.model or "llama-2-7b"
        shapes, desc = load_shapes(model, targets)
        source = f"{model}: {desc}" if model.lower() in PRESETS else desc
    rows = bound_table(shapes, ranks=args.r, q=args.q, sigma=args.sigma, ns=args.n)

    kinds = Counter((s.d_in, s.d_out) for s in shapes)
    suffixes = sorted({s.name.rsplit(".", 1)[-1] for s in shapes})
    print(f"Model: {source}")
    print(f"Adapted layers: {len(shapes)} ({', '.join(suffixes)})")
    for (d_in, d_out), c in sorted(kinds.items()):
        print(f"  {c:4d} x  d_in={d_in:<6d} d_out={d_out}")
    s_in = sum(s.d_in for s in shapes)
    s_out = sum(s.d_out for s in shapes)
    print(f"  Σd_in={s_in}  Σd_out={s_out}")
    print(
        f"\nXu–Raginsky bound |E gen| <= sqrt(2σ²·ln2·q·k/n), q={args.q:g} bits, σ={args.sigma:g}; "
        f"B-only/both = sqrt(Σd_out/Σ(d_in+d_out)) = {math.sqrt(s_out / (s_in + s_out)):.4f}\n"
    )
    table = [
        [str(r["r"]), r["strategy"], f"{r['params']:,}", f"{r['n']:,}", f"{r['bound']:.4g}",
         f"{r['ratio_to_both']:.4f}"]
        for r in rows
    ]
    print(format_table(["r", "strategy", "trainable k", "n", "bound", "ratio/both"], table))
    if args.output_dir is None:
        print("\n(tables only; -o DIR also writes bound.csv and bound.json)")
        return 0
    out = Path(args.output_dir)
    _write_csv(out / "bound.csv", rows)
    _write_json(
        out / "bound.json",
        {
            "description": "Xu & Raginsky (2017) bound for low-rank adapters, Zhu et al. 2024 §4 "
                           "(asymlora theory bound)",
            "source": source,
            "targets": targets,
            "layers": [{"name": s.name, "d_in": s.d_in, "d_out": s.d_out} for s in shapes],
            "sum_d_in": s_in,
            "sum_d_out": s_out,
            "ratio_b_only_to_both": math.sqrt(s_out / (s_in + s_out)),
            "rows": rows,
        },
    )
    print(f"\nWrote {out / 'bound.csv'}, {out / 'bound.json'}")
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
    add_list(sim, "--ranks", default=[1, 2, 4, 8, 16, 32], help="adapter ranks r, commas or spaces")
    add_list(
        sim, "--spectra", kind=str_list, default=["isotropic", "lowrank", "powerlaw"],
        help="input spectra: isotropic (Σ=I), lowrank (rank k), powerlaw (λ_i ∝ i^-decay)",
    )
    sim.add_argument("--lowrank-k", type=int, default=8, help="rank of Σ for the 'lowrank' spectrum (default 8)")
    sim.add_argument("--decay", type=float, default=1.0, help="power-law exponent of the 'powerlaw' spectrum")
    sim.add_argument("--sigma2", type=float, default=0.1, help="noise variance per output σ² (default 0.1)")
    sim.add_argument("--mc-samples", type=int, default=1000, help="Haar draws per Monte-Carlo estimate (default 1000)")
    sim.add_argument("--mc-all", action="store_true", help="use Monte-Carlo for B-only even where a closed form exists")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--no-plot", action="store_true", help="skip simulation.png")
    add_output_dir(sim, DEFAULT_OUT, f"artefact folder (default {DEFAULT_OUT})")
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
    bnd.add_argument(
        "--targets", default=None,
        help="adapted modules: comma-separated names, a regex, or all-linear (default: the preset's/architecture's)",
    )
    add_list(bnd, "--r", default=[8, 16], help="adapter ranks, commas or spaces (default 8 16)")
    bnd.add_argument("--q", type=float, default=16, help="bits per trained parameter (default 16)")
    bnd.add_argument("--sigma", type=float, default=1.0, help="sub-Gaussian parameter σ of the loss (default 1)")
    add_list(bnd, "--n", default=[10_000], help="training-set sizes, commas or spaces (default 10000)")
    add_output_dir(bnd, None, "also write bound.csv and bound.json to this folder (default: print only)")
    bnd.set_defaults(func=run_bound)

    def show_help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(func=show_help)
