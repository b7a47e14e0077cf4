r"""Closed forms for low-rank adaptation of a linear model (Zhu et al. 2024, section 4).

Setting (DESIGN §2). Inputs x have covariance :math:`\Sigma` (d_in × d_in, positive
semi-definite, possibly singular); targets are ``y = W_t x + ε`` with noise variance
:math:`\sigma^2` per output. The pretrained map is ``W0``; let

    Δ = W_t − W0,     S = Σ^{1/2},     M = Δ·S   (d_out × d_in).

The adapted model ``W0 + B·A`` (A: r × d_in, B: d_out × r) has expected squared loss

    L(A, B) = E‖y − (W0 + BA)x‖² = ‖(Δ − BA)·S‖²_F + d_out·σ².

* **Lemma 4.1** (A frozen to Q, B trained): regression of the residual on the projected
  features Q·x.  B* = Δ·Σ·Qᵀ·(Q·Σ·Qᵀ)⁺ and
  L* = d_out·σ² + ‖M‖² − ‖M·P‖², P the orthogonal projector onto col(S·Qᵀ).
* **Lemma 4.2** (B frozen to U, A trained): regression onto the projected outputs.
  A* = U⁺·Δ (= Uᵀ·Δ for orthonormal U) and L* = d_out·σ² + ‖M‖² − ‖P_U·M‖²
  (= ‖M‖² − ‖Uᵀ·M‖² for orthonormal U).
* **Both trained**: min over rank-r C of ‖(Δ − C)S‖² is the Eckart–Young tail
  Σ_{i>r} s_i(M)², attained by C* = M_r·S⁺ (M_r the best rank-r approximation of M).
* **Theorem 4.3** (random frozen factors, Haar distributed): E‖UᵀM‖² = (r/d_out)‖M‖² for
  any M, so A-only keeps only r/d_out of the signal whatever the inputs are.  For B-only,
  the random projection S·Qᵀ leans toward the high-variance input directions: when the
  non-zero eigenvalues of Σ are all equal (rank k) E‖MP‖² = min(r, k)/k·‖M‖², in particular
  r/d_in for Σ = I, and when rank(Σ) ≤ r the loss is exactly the noise floor.  Other spectra
  are estimated by Monte-Carlo with a reported standard error.

Everything is computed in float64 numpy.  Singular Σ is handled with eigenvalue clipping and
pseudo-inverses (no NaNs); shape mismatches raise ``ValueError``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "LinearProblem",
    "FactorSolution",
    "JointSolution",
    "ExpectedLoss",
    "haar_orthonormal",
    "optimal_b_given_a",
    "optimal_a_given_b",
    "optimal_both",
    "expected_loss_a_only",
    "expected_loss_b_only",
    "make_covariance",
    "effective_rank",
    "SPECTRA",
    "simulate",
    "summarize_simulation",
]

_EPS = np.finfo(np.float64).eps


def _as_f64(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array / torch tensor / nested list to a float64 numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric matrix, got {type(x).__name__}") from err
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite entries")
    return arr


def _check_rank(r: Any, name: str = "r", upper: int | None = None, why: str = "") -> int:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer, got {r!r}")
    r = int(r)
    if r < 1:
        raise ValueError(f"{name} must be a positive integer, got {r}")
    if upper is not None and r > upper:
        raise ValueError(f"{name}={r} is too large: {why} requires {name} <= {upper}")
    return r


def _range_basis(K: np.ndarray) -> np.ndarray:
    """Orthonormal basis (columns) of the column space of K, numerical rank by SVD."""
    if K.size == 0:
        return np.zeros((K.shape[0], 0))
    U, s, _ = np.linalg.svd(K, full_matrices=False)
    if s.size == 0 or s[0] == 0.0:
        return np.zeros((K.shape[0], 0))
    tol = max(K.shape) * _EPS * s[0]
    return U[:, s > tol]


@dataclass(frozen=True)
class FactorSolution:
    """Optimal trained factor for a frozen other factor, and its expected loss."""

    factor: np.ndarray
    loss: float
    explained: float  # ‖M‖² − (L* − d_out σ²): the part of the signal the adapter captures


@dataclass(frozen=True)
class JointSolution:
    """Optimal rank-r pair (A, B) when both factors are trained."""

    A: np.ndarray
    B: np.ndarray
    loss: float
    explained: float


@dataclass(frozen=True)
class ExpectedLoss:
    """Expected loss over Haar-random frozen factors.

    ``se`` is the Monte-Carlo standard error of ``mean`` (0.0 for a closed form);
    ``method`` is ``"exact"`` or ``"mc"``; ``n_samples`` is 0 for a closed form.
    """

    mean: float
    se: float
    method: str
    n_samples: int = 0
    fraction: float = float("nan")  # expected explained fraction E[explained]/‖M‖²


@dataclass(frozen=True, eq=False)
class LinearProblem:
    r"""A linear regression problem ``y = W_t x + ε`` adapted from ``W0`` (DESIGN §2).

    Parameters: ``W0``, ``W_t`` (d_out × d_in), ``Sigma`` (d_in × d_in, symmetric PSD, may be
    singular), ``sigma2`` ≥ 0 (noise variance per output). Accepts numpy arrays or torch
    tensors; stores float64 numpy copies.
    """

    W0: Any
    W_t: Any
    Sigma: Any
    sigma2: float = 0.0
    # derived (filled in __post_init__)
    delta: np.ndarray = field(init=False, repr=False)
    sqrt_sigma: np.ndarray = field(init=False, repr=False)
    pinv_sqrt_sigma: np.ndarray = field(init=False, repr=False)
    M: np.ndarray = field(init=False, repr=False)
    sigma_eigvals: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        W0 = _as_f64(self.W0, "W0")
        Wt = _as_f64(self.W_t, "W_t")
        Sig = _as_f64(self.Sigma, "Sigma")
        if W0.ndim != 2:
            raise ValueError(f"W0 must be a 2-D (d_out x d_in) matrix, got shape {W0.shape}")
        if Wt.shape != W0.shape:
            raise ValueError(f"W_t has shape {Wt.shape} but W0 has shape {W0.shape}; they must match")
        d_out, d_in = W0.shape
        if d_out < 1 or d_in < 1:
            raise ValueError(f"W0 must be non-empty, got shape {W0.shape}")
        if Sig.shape != (d_in, d_in):
            raise ValueError(
                f"Sigma has shape {Sig.shape}; expected ({d_in}, {d_in}) = (d_in, d_in) for W0 of shape {W0.shape}"
            )
        scale = max(1.0, float(np.max(np.abs(Sig))))
        if np.max(np.abs(Sig - Sig.T)) > 1e-8 * scale:
            raise ValueError("Sigma must be symmetric (a covariance matrix)")
        try:
            s2 = float(self.sigma2)
        except (TypeError, ValueError) as err:
            raise ValueError(f"sigma2 must be a number >= 0, got {self.sigma2!r}") from err
        if not math.isfinite(s2) or s2 < 0:
            raise ValueError(f"sigma2 must be a finite number >= 0, got {self.sigma2!r}")
        Sig = 0.5 * (Sig + Sig.T)
        lam, V = np.linalg.eigh(Sig)
        lam_max = float(max(lam.max(), 0.0))
        tol = d_in * _EPS * lam_max * 10
        if lam.min() < -max(1e-8 * lam_max, 1e-12):
            raise ValueError(f"Sigma must be positive semi-definite; smallest eigenvalue is {lam.min():.3g}")
        lam = np.where(lam > tol, lam, 0.0)
        root = np.sqrt(lam)
        inv_root = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
        S = (V * root) @ V.T
        S_pinv = (V * inv_root) @ V.T
        delta = Wt - W0
        set_ = object.__setattr__
        set_(self, "W0", W0)
        set_(self, "W_t", Wt)
        set_(self, "Sigma", Sig)
        set_(self, "sigma2", s2)
        set_(self, "delta", delta)
        set_(self, "sqrt_sigma", S)
        set_(self, "pinv_sqrt_sigma", S_pinv)
        set_(self, "M", delta @ S)
        set_(self, "sigma_eigvals", lam[::-1].copy())

    # ---- basic quantities -------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return int(self.W0.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W0.shape[0])

    @property
    def noise_floor(self) -> float:
        """d_out·σ²: the loss of the ideal model W_t."""
        return self.d_out * self.sigma2

    @property
    def signal(self) -> float:
        """‖M‖²_F = ‖Δ Σ^{1/2}‖²_F: the excess loss of the unadapted model W0."""
        return float(np.sum(self.M**2))

    @property
    def sigma_rank(self) -> int:
        return int(np.count_nonzero(self.sigma_eigvals))

    def loss(self, A: Any, B: Any) -> float:
        """L(A, B) = tr((Δ − BA) Σ (Δ − BA)ᵀ) + d_out σ², evaluated directly from Σ."""
        A = _as_f64(A, "A")
        B = _as_f64(B, "B")
        self._check_A(A)
        self._check_B(B)
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"A has {A.shape[0]} rows but B has {B.shape[1]} columns; they must match (rank r)")
        E = self.delta - B @ A
        return float(np.einsum("ij,jk,ik->", E, self.Sigma, E)) + self.noise_floor

    def _check_A(self, A: np.ndarray) -> None:
        if A.ndim != 2 or A.shape[1] != self.d_in or A.shape[0] < 1:
            raise ValueError(f"A must have shape (r, d_in) = (r, {self.d_in}) with r >= 1, got {A.shape}")

    def _check_B(self, B: np.ndarray) -> None:
        if B.ndim != 2 or B.shape[0] != self.d_out or B.shape[1] < 1:
            raise ValueError(f"B must have shape (d_out, r) = ({self.d_out}, r) with r >= 1, got {B.shape}")


# ---- Haar sampler -----------------------------------------------------------------------
def haar_orthonormal(
    d: int, r: int, rng: np.random.Generator | int | None = None, size: int | None = None
) -> np.ndarray:
    """Haar-distributed d × r matrices with orthonormal columns (QᵀQ = I_r).

    Draw G ~ N(0, 1)^{d×r}, take the reduced QR G = QR and multiply column j of Q by
    sign(R_jj): this removes the sign ambiguity of QR and makes Q exactly Haar (uniform on
    the Stiefel manifold). ``size`` adds a leading batch axis. Requires 1 <= r <= d.
    """
    d = _check_rank(d, "d")
    r = _check_rank(r, "r", upper=d, why="orthonormal columns")
    rng = np.random.default_rng(rng)
    shape = (d, r) if size is None else (int(size), d, r)
    G = rng.standard_normal(shape)
    Q, R = np.linalg.qr(G)
    signs = np.sign(np.diagonal(R, axis1=-2, axis2=-1))
    signs = np.where(signs == 0, 1.0, signs)
    return Q * signs[..., None, :]


# ---- Lemma 4.1 / 4.2 / joint ------------------------------------------------------------
def optimal_b_given_a(problem: LinearProblem, A: Any) -> FactorSolution:
    """Lemma 4.1 — A frozen (= Q), B trained: B* = Δ Σ Qᵀ (Q Σ Qᵀ)⁺.

    L* = d_out σ² + ‖M‖² − ‖M P‖², with P the orthogonal projector onto col(Σ^{1/2} Qᵀ).
    Q need not be orthonormal; the pseudo-inverse handles rank-deficient Q Σ Qᵀ.
    """
    Q = _as_f64(A, "A")
    problem._check_A(Q)
    K = problem.sqrt_sigma @ Q.T  # d_in × r
    basis = _range_basis(K)
    explained = float(np.sum((problem.M @ basis) ** 2))
    QS = Q @ problem.Sigma
    G = QS @ Q.T
    B = (problem.delta @ QS.T) @ np.linalg.pinv(0.5 * (G + G.T), rcond=1e-12, hermitian=True)
    loss = problem.noise_floor + max(problem.signal - explained, 0.0)
    return FactorSolution(factor=B, loss=loss, explained=explained)


def optimal_a_given_b(problem: LinearProblem, B: Any) -> FactorSolution:
    """Lemma 4.2 — B frozen (= U), A trained: A* = U⁺ Δ (= Uᵀ Δ when UᵀU = I).

    L* = d_out σ² + ‖M‖² − ‖P_U M‖² (= ‖M‖² − ‖Uᵀ M‖² for orthonormal U).
    """
    U = _as_f64(B, "B")
    problem._check_B(U)
    basis = _range_basis(U)
    explained = float(np.sum((basis.T @ problem.M) ** 2))
    A = np.linalg.pinv(U, rcond=1e-12) @ problem.delta
    loss = problem.noise_floor + max(problem.signal - explained, 0.0)
    return FactorSolution(factor=A, loss=loss, explained=explained)


def optimal_both(problem: LinearProblem, r: int) -> JointSolution:
    """Both factors trained: best rank-r approximation of M = Δ Σ^{1/2}, mapped back.

    With M = Σ_i s_i u_i v_iᵀ: B = [s_1 u_1 … s_r u_r], A = [v_1 … v_r]ᵀ Σ^{+1/2};
    L* = d_out σ² + Σ_{i>r} s_i² (Eckart–Young). Since the rows of M lie in range(Σ),
    B A Σ^{1/2} = M_r exactly even for singular Σ.
    """
    r = _check_rank(r)
    U, s, Vt = np.linalg.svd(problem.M, full_matrices=False)
    k = min(r, s.size)
    B = U[:, :k] * s[:k]
    A = Vt[:k] @ problem.pinv_sqrt_sigma
    if k < r:  # pad with zero directions so the shapes are always (r, d_in), (d_out, r)
        A = np.vstack([A, np.zeros((r - k, problem.d_in))])
        B = np.hstack([B, np.zeros((problem.d_out, r - k))])
    explained = float(np.sum(s[:k] ** 2))
    loss = problem.noise_floor + float(np.sum(s[k:] ** 2))
    return JointSolution(A=A, B=B, loss=loss, explained=explained)


# ---- Theorem 4.3: expectations over Haar-random frozen factors --------------------------
def _mc_summary(problem: LinearProblem, explained: np.ndarray) -> ExpectedLoss:
    losses = problem.noise_floor + np.maximum(problem.signal - explained, 0.0)
    n = losses.size
    se = float(np.std(losses, ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    frac = float(np.mean(explained) / problem.signal) if problem.signal > 0 else float("nan")
    return ExpectedLoss(mean=float(np.mean(losses)), se=se, method="mc", n_samples=n, fraction=frac)


def _batches(n: int, per_item: int, budget: int = 1 << 22) -> Iterable[int]:
    step = max(1, budget // max(per_item, 1))
    done = 0
    while done < n:
        b = min(step, n - done)
        yield b
        done += b


def _check_method(method: str) -> str:
    if method not in ("auto", "exact", "mc"):
        raise ValueError(f"method must be 'auto', 'exact' or 'mc', got {method!r}")
    return method


def _check_samples(n_samples: Any) -> int:
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2, got {n_samples!r}")
    return int(n_samples)


def expected_loss_a_only(
    problem: LinearProblem,
    r: int,
    method: str = "auto",
    n_samples: int = 2000,
    seed: int | np.random.Generator | None = 0,
) -> ExpectedLoss:
    """E_U[L*] for B frozen to a Haar-random orthonormal U (d_out × r), A trained.

    Exact (Theorem 4.3): E[U Uᵀ] = (r/d_out) I, so E‖UᵀM‖² = (r/d_out)‖M‖² and
    E L* = d_out σ² + (1 − r/d_out)‖M‖² for every Σ. ``method="mc"`` averages Lemma 4.2
    over ``n_samples`` draws instead (used by the tests to check the closed form).
    """
    method = _check_method(method)
    r = _check_rank(r, upper=problem.d_out, why="a frozen orthonormal B (d_out x r)")
    if method in ("auto", "exact"):
        frac = r / problem.d_out
        return ExpectedLoss(
            mean=problem.noise_floor + (1.0 - frac) * problem.signal, se=0.0, method="exact", fraction=frac
        )
    n = _check_samples(n_samples)
    rng = np.random.default_rng(seed)
    out = []
    for b in _batches(n, problem.d_out * r):
        U = haar_orthonormal(problem.d_out, r, rng, size=b)  # (b, d_out, r)
        UtM = np.swapaxes(U, -1, -2) @ problem.M
        out.append(np.sum(UtM**2, axis=(-2, -1)))
    return _mc_summary(problem, np.concatenate(out))


def _b_only_closed_form(problem: LinearProblem, r: int) -> float | None:
    """Closed-form E‖MP‖²/‖M‖² for a Haar A, when one exists (else None).

    rank(Σ) = k ≤ r: P covers range(Σ) ⊇ row(M) almost surely → fraction 1.
    Non-zero eigenvalues of Σ all equal: col(Σ^{1/2}Qᵀ) is a Haar r-dimensional subspace of
    range(Σ) → fraction r/k (r/d_in for Σ ∝ I).
    """
    lam = problem.sigma_eigvals
    k = int(np.count_nonzero(lam))
    if k == 0:
        return 1.0  # M = 0: nothing to explain
    if k <= r:
        return 1.0
    nz = lam[:k]
    if np.max(nz) - np.min(nz) <= 1e-10 * np.max(nz):
        return r / k
    return None


def expected_loss_b_only(
    problem: LinearProblem,
    r: int,
    method: str = "auto",
    n_samples: int = 2000,
    seed: int | np.random.Generator | None = 0,
) -> ExpectedLoss:
    """E_Q[L*] for A frozen to a Haar-random orthonormal Q (r × d_in), B trained.

    Averages Lemma 4.1 over Q. Closed forms (``"auto"`` uses them when they apply,
    ``"exact"`` raises if none does): rank(Σ) ≤ r → d_out σ² exactly; non-zero eigenvalues of
    Σ equal (rank k) → d_out σ² + (1 − r/k)‖M‖², i.e. (1 − r/d_in) for Σ = I. Otherwise
    Monte-Carlo over ``n_samples`` draws, with the standard error in ``se``.
    """
    method = _check_method(method)
    r = _check_rank(r, upper=problem.d_in, why="a frozen orthonormal A (r x d_in)")
    if method in ("auto", "exact"):
        frac = _b_only_closed_form(problem, r)
        if frac is not None:
            return ExpectedLoss(
                mean=problem.noise_floor + (1.0 - frac) * problem.signal, se=0.0, method="exact", fraction=frac
            )
        if method == "exact":
            raise ValueError(
                "no closed form for B-only with this Sigma (rank(Sigma) > r and unequal eigenvalues); "
                "use method='mc' or 'auto'"
            )
    n = _check_samples(n_samples)
    rng = np.random.default_rng(seed)
    S, M = problem.sqrt_sigma, problem.M
    lam0 = problem.sigma_eigvals[0] if problem.sigma_eigvals.size else 0.0
    out = []
    for b in _batches(n, problem.d_in * r):
        Qt = haar_orthonormal(problem.d_in, r, rng, size=b)  # (b, d_in, r) = Qᵀ
        K = S @ Qt
        U, s, _ = np.linalg.svd(K, full_matrices=False)  # batched
        tol = max(problem.d_in, r) * _EPS * max(np.sqrt(lam0), 1e-300) * 10
        mask = (s > tol)[:, None, :]
        MU = (M @ U) * mask
        out.append(np.sum(MU**2, axis=(-2, -1)))
    return _mc_summary(problem, np.concatenate(out))


# ---- synthetic spectra and the simulation ----------------------------------------------
SPECTRA = ("isotropic", "lowrank", "powerlaw")


def make_covariance(
    spectrum: str,
    d_in: int,
    rng: np.random.Generator | int | None = 0,
    k: int = 8,
    decay: float = 1.0,
) -> np.ndarray:
    """Input covariance Σ with trace d_in (same total input energy for every spectrum).

    ``isotropic``: Σ = I. ``lowrank``: k equal eigenvalues d_in/k, the rest 0, random
    eigenvectors. ``powerlaw``: eigenvalues ∝ i^(−decay), random eigenvectors.
    """
    d_in = _check_rank(d_in, "d_in")
    if spectrum == "isotropic":
        return np.eye(d_in)
    rng = np.random.default_rng(rng)
    V = haar_orthonormal(d_in, d_in, rng)
    if spectrum == "lowrank":
        k = _check_rank(k, "k", upper=d_in, why="a rank-k covariance of size d_in")
        lam = np.zeros(d_in)
        lam[:k] = d_in / k
    elif spectrum == "powerlaw":
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and decay > 0):
            raise ValueError(f"decay must be a positive number, got {decay!r}")
        lam = np.arange(1, d_in + 1, dtype=np.float64) ** (-float(decay))
        lam *= d_in / lam.sum()
    else:
        raise ValueError(f"unknown spectrum {spectrum!r}; valid: {', '.join(SPECTRA)}")
    Sig = (V * lam) @ V.T
    return 0.5 * (Sig + Sig.T)


def effective_rank(Sigma: Any) -> float:
    """Participation ratio (tr Σ)² / tr(Σ²): d for Σ = I, k for k equal eigenvalues."""
    Sig = _as_f64(Sigma, "Sigma")
    tr = float(np.trace(Sig))
    tr2 = float(np.sum(Sig * Sig.T))
    return tr * tr / tr2 if tr2 > 0 else 0.0


def simulate(
    d_in: int = 64,
    d_out: int = 64,
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32),
    spectra: Sequence[str] = SPECTRA,
    sigma2: float = 0.1,
    lowrank_k: int = 8,
    decay: float = 1.0,
    n_samples: int = 1000,
    seed: int = 0,
    b_method: str = "auto",
) -> list[dict[str, Any]]:
    """Theorem 4.3 on synthetic data: expected loss of A-only, B-only and both vs r.

    For each spectrum a random Δ (Gaussian, d_out × d_in) is scaled so that the signal
    ‖Δ Σ^{1/2}‖² equals d_out (unit excess loss per output before adaptation); W0 = 0,
    W_t = Δ. Returns one row per (spectrum, r) with expected losses (exact where a closed
    form exists, else Monte-Carlo with standard error), normalised excess losses
    (L − d_out σ²)/‖M‖² and explained fractions. ``b_method="mc"`` forces Monte-Carlo for
    B-only even where a closed form exists (a check of the closed form).
    """
    d_in = _check_rank(d_in, "d_in")
    d_out = _check_rank(d_out, "d_out")
    ranks = [int(_check_rank(r, "r", upper=min(d_in, d_out), why="random orthonormal frozen factors")) for r in ranks]
    if not ranks:
        raise ValueError("ranks must not be empty")
    spectra = list(spectra)
    if not spectra:
        raise ValueError(f"spectra must not be empty; valid: {', '.join(SPECTRA)}")
    for sp in spectra:
        if sp not in SPECTRA:
            raise ValueError(f"unknown spectrum {sp!r}; valid: {', '.join(SPECTRA)}")
    _check_samples(n_samples)
    _check_method(b_method)
    rows: list[dict[str, Any]] = []
    for i, sp in enumerate(spectra):
        rng = np.random.default_rng([seed, i])
        Sig = make_covariance(sp, d_in, rng, k=lowrank_k, decay=decay)
        Delta = rng.standard_normal((d_out, d_in))
        base = LinearProblem(np.zeros_like(Delta), Delta, Sig, sigma2)
        Delta *= math.sqrt(d_out / base.signal)
        prob = LinearProblem(np.zeros_like(Delta), Delta, Sig, sigma2)
        eff = effective_rank(Sig)
        for j, r in enumerate(sorted(set(ranks))):
            a = expected_loss_a_only(prob, r)
            b = expected_loss_b_only(prob, r, method=b_method, n_samples=n_samples,
                                     seed=np.random.default_rng([seed, i, j]))
            both = optimal_both(prob, r)
            norm = prob.signal
            rows.append(
                {
                    "spectrum": sp,
                    "r": r,
                    "d_in": d_in,
                    "d_out": d_out,
                    "sigma_rank": prob.sigma_rank,
                    "effective_rank": round(eff, 6),
                    "sigma2": prob.sigma2,
                    "noise_floor": prob.noise_floor,
                    "signal": norm,
                    "loss_a_only": a.mean,
                    "se_a_only": a.se,
                    "method_a_only": a.method,
                    "loss_b_only": b.mean,
                    "se_b_only": b.se,
                    "method_b_only": b.method,
                    "loss_both": both.loss,
                    "excess_a_only": (a.mean - prob.noise_floor) / norm,
                    "excess_b_only": (b.mean - prob.noise_floor) / norm,
                    "excess_both": (both.loss - prob.noise_floor) / norm,
                    "n_samples": b.n_samples,
                }
            )
    return rows


def summarize_simulation(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One-line verdicts on the Theorem 4.3 message, per spectrum (at the largest r)."""
    lines = []
    for sp in dict.fromkeys(row["spectrum"] for row in rows):
        sub = [row for row in rows if row["spectrum"] == sp]
        last = max(sub, key=lambda row: row["r"])
        mid = sorted(sub, key=lambda row: row["r"])[len(sub) // 2]
        for row in (mid, last) if mid is not last else (last,):
            lines.append(
                f"{sp:>9} r={row['r']:<3} excess/‖M‖²: a-only {row['excess_a_only']:.3f}, "
                f"b-only {row['excess_b_only']:.3f}, both {row['excess_both']:.3f}"
                f"  (eff. rank Σ {row['effective_rank']:.1f})"
            )
    return lines
