"""Layer-by-layer similarity of learned adapter factors across runs (Figures 1-2 of the paper).

Zhu et al. (ICML 2024, arXiv 2402.16842), Figures 1-2: fine-tune the same model several
times with LoRA and compare, layer by layer, the learned factors of every pair of runs.
The ``B``'s of two runs are alike when the runs share the *task*; the ``A``'s are alike
when they share the *initialisation* (for the standard init, A random and B zero).

The measure
-----------
An adapter only matters through its product ``ΔW = B·A`` (B: d_out×r, A: r×d_in), and
``B·A = (B·G)·(G⁻¹·A)`` for every invertible r×r matrix ``G``.  A similarity of factors
should therefore not depend on ``G``.  What ``G`` cannot change is the *column space* of
``B`` (a subspace of R^d_out) and the *row space* of ``A`` (a subspace of R^d_in).  We
compare those subspaces ("canonical correlation goodness of fit", as in the paper):

    U1, U2   orthonormal bases of the two subspaces (dimensions r1, r2),
    sim      = ‖U1ᵀ·U2‖²_F / min(r1, r2)
             = (1 / min(r1, r2)) · Σ_i cos²(θ_i),

where θ_i are the principal angles between the subspaces.  Properties:

* ``sim ∈ [0, 1]``; it is 1 iff the smaller subspace lies inside the larger one, 0 iff
  they are orthogonal; it is symmetric in its arguments.
* invariant to ``B → B·G``, ``A → G⁻¹·A`` (and to any rescaling of the factors);
* chance level: for two *independent* uniformly random (Haar) subspaces of dimensions
  r1, r2 in R^d, ``E ‖U1ᵀU2‖²_F = r1·r2 / d`` (each of the r1·r2 entries of U1ᵀU2 has mean
  square 1/d), hence ``E sim = max(r1, r2) / d`` — ``r/d`` for equal ranks
  (:func:`chance_similarity`).  A value well above that means shared structure.

Bases come from an SVD with a rank tolerance: singular values below
``rtol · σ_max`` are treated as zero (default ``rtol = max(rows, cols) · eps(dtype)`` of
the input, like ``numpy.linalg.matrix_rank``), so a rank-deficient factor is compared on
its true rank.  A factor that is entirely zero has no subspace: its similarity is NaN.

For reference the module also reports the plain cosine similarity of the flattened
matrices, ``⟨vec X, vec Y⟩ / (‖X‖_F ‖Y‖_F)``, which is *not* invariant to ``G``.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from asymlora.errors import UserError

Factor = Literal["A", "B"]
FACTORS: tuple[str, ...] = ("A", "B")
MEASURES: tuple[str, ...] = ("subspace", "cosine")

__all__ = [
    "FACTORS",
    "MEASURES",
    "SimilarityReport",
    "chance_similarity",
    "compare_adapters",
    "compare_factors",
    "cosine_similarity",
    "factor_similarity",
    "orthonormal_basis",
    "resolve_adapter_dir",
    "subspace_similarity",
]


# ---------------------------------------------------------------------------
# the measure on raw tensors
# ---------------------------------------------------------------------------
def _as_matrix(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.is_complex()):
        x = x.to(torch.float64)
    return x


def orthonormal_basis(
    matrix: torch.Tensor | np.ndarray, *, rtol: float | None = None
) -> torch.Tensor:
    """Orthonormal basis of the column space of ``matrix`` (n×m) as an n×k float64 tensor.

    ``k`` is the numerical rank: the number of singular values ``σ_i > rtol · σ_max``.
    Default ``rtol = max(n, m) · eps`` of the input's dtype.  A zero matrix gives k = 0.
    (For the row space of ``A`` pass ``A.T``.)
    """
    m = _as_matrix(matrix, "matrix")
    if rtol is None:
        rtol = max(m.shape) * torch.finfo(m.dtype).eps
    if rtol < 0 or not math.isfinite(rtol):
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol}")
    m64 = m.detach().to("cpu", torch.float64)
    if m64.numel() == 0:
        return m64.new_zeros((m64.shape[0], 0))
    if not torch.isfinite(m64).all():
        raise ValueError("matrix contains NaN or Inf; cannot compute its subspace")
    u, s, _ = torch.linalg.svd(m64, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return m64.new_zeros((m64.shape[0], 0))
    k = int((s > rtol * s[0]).sum())
    return u[:, :k]


def subspace_similarity(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    space: Literal["column", "row"] = "column",
    rtol: float | None = None,
) -> float:
    """``‖U1ᵀU2‖²_F / min(r1, r2)``: mean cos² of the principal angles between subspaces.

    ``space="column"`` compares the column spaces of ``x`` and ``y`` (use for B, d_out×r),
    ``space="row"`` their row spaces (use for A, r×d_in).  Both must live in the same
    ambient space (same number of rows for "column", of columns for "row"); ranks may
    differ.  Returns NaN when either matrix is numerically zero.  See the module docstring.
    """
    if space not in ("column", "row"):
        raise ValueError(f"space must be 'column' or 'row', got {space!r}")
    x = _as_matrix(x, "x")
    y = _as_matrix(y, "y")
    if space == "row":
        x, y = x.T, y.T
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{space} spaces live in different dimensions: {x.shape[0]} vs {y.shape[0]} "
            f"(shapes {tuple(x.shape)} and {tuple(y.shape)} as {space}-matrices)"
        )
    u1 = orthonormal_basis(x, rtol=rtol)
    u2 = orthonormal_basis(y, rtol=rtol)
    k = min(u1.shape[1], u2.shape[1])
    if k == 0:
        return float("nan")
    val = float((u1.T @ u2).pow(2).sum()) / k
    return min(max(val, 0.0), 1.0)  # clip round-off


def factor_similarity(
    f1: torch.Tensor, f2: torch.Tensor, factor: Factor, *, rtol: float | None = None
) -> float:
    """Subspace similarity of two ``A``'s (row spaces) or two ``B``'s (column spaces)."""
    if factor not in FACTORS:
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    return subspace_similarity(f1, f2, space="row" if factor == "A" else "column", rtol=rtol)


def cosine_similarity(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Plain cosine of the flattened matrices ``⟨vec x, vec y⟩ / (‖x‖_F ‖y‖_F)``.

    Not invariant to ``B·G, G⁻¹·A``; NaN when either matrix is zero.
    """
    x = _as_matrix(x, "x")
    y = _as_matrix(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"cosine similarity needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    a = x.detach().to("cpu", torch.float64).flatten()
    b = y.detach().to("cpu", torch.float64).flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float(a @ b) / (na * nb)


def chance_similarity(r1: int, r2: int, d: int) -> float:
    """Expected subspace similarity of two independent Haar subspaces: ``max(r1, r2) / d``.

    ``E ‖U1ᵀU2‖²_F = r1·r2/d`` (every entry of U1ᵀU2 has mean square 1/d), divided by
    ``min(r1, r2)``.
    """
    if d <= 0 or r1 <= 0 or r2 <= 0 or r1 > d or r2 > d:
        raise ValueError(f"need 0 < r1, r2 <= d, got r1={r1}, r2={r2}, d={d}")
    return max(r1, r2) / d


# ---------------------------------------------------------------------------
# comparing whole adapters
# ---------------------------------------------------------------------------
def nanmean(x: np.ndarray) -> float:
    """Mean of the finite entries; NaN (no warning) when there are none."""
    a = np.asarray(x, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def short_layer_names(layers: Sequence[str]) -> list[str]:
    """Drop the dotted prefix shared by all names (``bert.encoder.layer.3.attention.self.query``
    → ``3.attention.self.query``) so heatmap labels stay readable."""
    if len(layers) <= 1:
        return [name.split(".")[-1] if name else name for name in layers]
    parts = [name.split(".") for name in layers]
    n = 0
    while all(len(p) > n + 1 for p in parts) and len({p[n] for p in parts}) == 1:
        n += 1
    return [".".join(p[n:]) for p in parts]


@dataclass(frozen=True)
class SimilarityReport:
    """Similarities of every pair of runs, per adapted layer.

    ``values[(measure, factor)]`` is an array of shape ``(len(layers), len(pairs))``;
    ``pairs[j] = (i, k)`` indexes ``labels``.  ``chance[factor]`` holds, per layer, the
    chance level ``max(r_i, r_k)/d`` of the subspace measure for independent random
    subspaces, per pair (same shape as the values).  ``ranks[factor]`` is the numerical
    rank of each run's factor, shape ``(len(layers), len(labels))``.
    """

    labels: tuple[str, ...]
    layers: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]
    values: dict[tuple[str, str], np.ndarray]
    chance: dict[str, np.ndarray]
    ranks: dict[str, np.ndarray] = field(default_factory=dict)

    def pair_labels(self, sep: str = " vs ") -> list[str]:
        return [f"{self.labels[i]}{sep}{self.labels[k]}" for i, k in self.pairs]

    def get(self, factor: str, measure: str = "subspace") -> np.ndarray:
        if factor not in FACTORS:
            raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        return self.values[(measure, factor)]

    def pair_means(self, factor: str, measure: str = "subspace") -> np.ndarray:
        """Mean over layers (NaN layers ignored) for each pair: shape ``(len(pairs),)``."""
        v = self.get(factor, measure)
        out = np.full(v.shape[1], np.nan)
        for j in range(v.shape[1]):
            col = v[:, j]
            col = col[np.isfinite(col)]
            if col.size:
                out[j] = float(col.mean())
        return out

    def rows(self) -> list[dict]:
        """Long-format rows: layer, run_a, run_b, factor, measure, value, chance."""
        out = []
        for li, layer in enumerate(self.layers):
            for j, (i, k) in enumerate(self.pairs):
                for factor in FACTORS:
                    for measure in MEASURES:
                        out.append(
                            {
                                "layer": layer,
                                "run_a": self.labels[i],
                                "run_b": self.labels[k],
                                "factor": factor,
                                "measure": measure,
                                "value": float(self.values[(measure, factor)][li, j]),
                                "chance": float(self.chance[factor][li, j]) if measure == "subspace" else float("nan"),
                            }
                        )
        return out

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`rows` as CSV, atomically (temp file in the same folder, then rename)."""
        buf = io.StringIO()
        cols = ["layer", "run_a", "run_b", "factor", "measure", "value", "chance"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in self.rows():
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        return atomic_write_text(path, buf.getvalue())

    def summary_lines(self, measure: str = "subspace") -> list[str]:
        """One line per factor: mean over layers for each pair, and the chance level."""
        lines = []
        for factor in FACTORS:
            means = self.pair_means(factor, measure)
            ch = nanmean(self.chance[factor]) if measure == "subspace" else float("nan")
            per_pair = ", ".join(f"{lab}={m:.3f}" for lab, m in zip(self.pair_labels(), means))
            finite = means[np.isfinite(means)]
            overall = f"{finite.mean():.3f}" if finite.size else "nan"
            chance_txt = f" (chance {ch:.3f})" if measure == "subspace" else ""
            lines.append(
                f"{factor}: {measure} similarity, "
                f"mean over {len(self.layers)} layer{'' if len(self.layers) == 1 else 's'}: "
                f"{per_pair}; all pairs {overall}{chance_txt}"
            )
        return lines


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def compare_factors(
    runs: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    labels: Sequence[str] | None = None,
    *,
    layers: Iterable[str] | None = None,
    rtol: float | None = None,
) -> SimilarityReport:
    """Similarity of the A's and of the B's of every pair of runs, per layer.

    ``runs[i]`` maps layer name -> ``(A, B)`` with ``A`` r×d_in and ``B`` d_out×r (the
    output of :func:`asymlora.formats.native.load_factors`).  Layers compared: ``layers`` if
    given, else those present in every run (natural sort order).  For each layer and pair:
    the subspace similarity (row spaces of A, column spaces of B) and the plain cosine
    (NaN when the ranks differ).
    """
    runs = list(runs)
    if len(runs) < 2:
        raise UserError(f"need at least 2 runs to compare, got {len(runs)}")
    if labels is None:
        labels = [f"run{i}" for i in range(len(runs))]
    labels = [str(label) for label in labels]
    if len(labels) != len(runs):
        raise UserError(f"got {len(labels)} labels for {len(runs)} runs")
    if len(set(labels)) != len(labels):
        raise UserError(f"labels must be unique, got {labels}")
    for lab, run in zip(labels, runs):
        if not isinstance(run, Mapping) or not run:
            raise UserError(f"run {lab!r} has no adapted layers (expected a non-empty mapping layer -> (A, B))")
    common = set(runs[0])
    for run in runs[1:]:
        common &= set(run)
    if layers is None:
        layer_list = sorted(common, key=_natural_key)
        if not layer_list:
            raise UserError(
                "the runs share no adapted layer; first run has e.g. "
                f"{sorted(runs[0])[:3]}, second {sorted(runs[1])[:3]}"
            )
    else:
        layer_list = list(layers)
        missing = [layer for layer in layer_list if layer not in common]
        if missing:
            raise UserError(f"layers not adapted in every run: {missing[:5]}; "
                            f"shared layers: {sorted(common, key=_natural_key)[:5]}...")
        if not layer_list:
            raise UserError("layers is empty")

    # validate shapes before any work
    for layer in layer_list:
        shapes = []
        for lab, run in zip(labels, runs):
            pair = run[layer]
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise UserError(f"run {lab!r}, layer {layer!r}: expected (A, B), got {type(pair).__name__}")
            a, b = _as_matrix(pair[0], f"A of {lab}:{layer}"), _as_matrix(pair[1], f"B of {lab}:{layer}")
            if a.shape[0] != b.shape[1]:
                raise UserError(
                    f"run {lab!r}, layer {layer!r}: A is {tuple(a.shape)} and B is {tuple(b.shape)}; "
                    "need A r×d_in and B d_out×r with the same r"
                )
            shapes.append((a.shape[1], b.shape[0]))
        if len(set(shapes)) != 1:
            raise UserError(
                f"layer {layer!r} has different (d_in, d_out) across runs: "
                + ", ".join(f"{lab}={s}" for lab, s in zip(labels, shapes))
                + " — adapters of different base models?"
            )

    pairs = tuple(combinations(range(len(runs)), 2))
    nl, npairs = len(layer_list), len(pairs)
    values = {(m, f): np.full((nl, npairs), np.nan) for m in MEASURES for f in FACTORS}
    chance = {f: np.full((nl, npairs), np.nan) for f in FACTORS}
    ranks = {f: np.zeros((nl, len(runs)), dtype=int) for f in FACTORS}
    for li, layer in enumerate(layer_list):
        bases = {}
        for ri, run in enumerate(runs):
            a, b = run[layer]
            bases[("A", ri)] = orthonormal_basis(_as_matrix(a, "A").T, rtol=rtol)
            bases[("B", ri)] = orthonormal_basis(_as_matrix(b, "B"), rtol=rtol)
            ranks["A"][li, ri] = bases[("A", ri)].shape[1]
            ranks["B"][li, ri] = bases[("B", ri)].shape[1]
        for j, (i, k) in enumerate(pairs):
            for fi, f in enumerate(FACTORS):
                u1, u2 = bases[(f, i)], bases[(f, k)]
                r = min(u1.shape[1], u2.shape[1])
                if r > 0:
                    values[("subspace", f)][li, j] = min(1.0, float((u1.T @ u2).pow(2).sum()) / r)
                    chance[f][li, j] = chance_similarity(u1.shape[1], u2.shape[1], u1.shape[0])
                x, y = runs[i][layer][fi], runs[k][layer][fi]
                if tuple(x.shape) == tuple(y.shape):
                    values[("cosine", f)][li, j] = cosine_similarity(x, y)
    return SimilarityReport(
        labels=tuple(labels), layers=tuple(layer_list), pairs=pairs, values=values, chance=chance, ranks=ranks
    )


ADAPTER_CONFIG = "adapter_config.json"
SEARCH_DEPTH = 2  # run folders are searched this many levels down, never further
_INTERMEDIATE = ("checkpoint",)  # adapters saved mid-training, not the final one


def adapter_candidates(folder: str | os.PathLike) -> list[Path]:
    """Folders holding ``adapter_config.json``: ``folder`` itself or its sub-folders at most
    ``SEARCH_DEPTH`` levels down (hidden folders skipped), sorted."""
    p = Path(folder)
    patterns = [ADAPTER_CONFIG] + ["/".join(["*"] * k + [ADAPTER_CONFIG]) for k in range(1, SEARCH_DEPTH + 1)]
    found = {c.parent for pat in patterns for c in p.glob(pat)}
    return sorted(f for f in found if not any(part.startswith(".") for part in f.relative_to(p).parts))


def pick_adapter_dir(path: str | os.PathLike) -> tuple[Path, str | None]:
    """The adapter folder for a run folder, and a note saying which was chosen (or None).

    ``path`` may be an adapter folder, or a folder written by ``asymlora train`` / ``run`` /
    ``compare``: its one final adapter is taken, adapters inside ``checkpoint/`` folders
    (saved mid-training) are passed over. Several final adapters are an error listing them.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"run directory {str(p)!r} does not exist")
    if p.is_file():
        if p.name == ADAPTER_CONFIG:
            return p.parent, None
        raise UserError(f"{str(p)!r} is a file; pass a folder holding {ADAPTER_CONFIG}")
    if (p / ADAPTER_CONFIG).is_file():
        return p, None
    found = adapter_candidates(p)
    final = [f for f in found if not any(part in _INTERMEDIATE for part in f.relative_to(p).parts)]
    pool = final or found  # a run killed before its end has only checkpoint adapters
    if len(pool) == 1:
        skipped = len(found) - len(final)
        why = ("the final adapter" + (f"; skipped {skipped} checkpoint cop{'y' if skipped == 1 else 'ies'}"
                                      if skipped else "")) if final else "a checkpoint: no final adapter was saved"
        return pool[0], f"{p}: using {pool[0]} ({why})"
    if not pool:
        raise UserError(f"no saved adapter ({ADAPTER_CONFIG}) in {str(p)!r} or its sub-folders "
                        f"(searched {SEARCH_DEPTH} levels down)")
    more = f" and {len(pool) - 10} more" if len(pool) > 10 else ""
    raise UserError(f"{str(p)!r} holds {len(pool)} adapters; pass one of: "
                    + ", ".join(str(f) for f in pool[:10]) + more)


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The folder holding ``adapter_config.json`` for a run (see :func:`pick_adapter_dir`)."""
    return pick_adapter_dir(path)[0]


def _run_labels(dirs: Sequence[Path]) -> list[str]:
    dirs = [d.resolve() for d in dirs]
    names = [d.name or str(d) for d in dirs]
    if len(set(names)) == len(names):
        return names
    # disambiguate with parent folders, then with an index
    names = [f"{d.parent.name}/{d.name}" for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{i}:{n}" for i, n in enumerate(names)]


def compare_adapters(
    run_dirs: Sequence[str | os.PathLike],
    labels: Sequence[str] | None = None,
    *,
    rtol: float | None = None,
) -> SimilarityReport:
    """Load each saved adapter with :func:`asymlora.formats.native.load_factors` and run
    :func:`compare_factors` on them.  ``run_dirs`` may name adapter folders or run folders
    holding exactly one adapter."""
    if len(run_dirs) < 2:
        raise UserError(f"need at least 2 run directories, got {len(run_dirs)}")
    dirs = [resolve_adapter_dir(d) for d in run_dirs]
    from asymlora.formats.native import load_factors  # core API; imported lazily

    runs = [load_factors(str(d)) for d in dirs]
    return compare_factors(runs, labels or _run_labels([Path(d) for d in run_dirs]), rtol=rtol)
