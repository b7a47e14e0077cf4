"""Seeded factor initialisers, kept in a registry.

Every initialiser has the signature ``(shape, factor, generator, weight) -> Tensor`` where
``shape`` is ``(r, d_in)`` for A and ``(d_out, r)`` for B, ``factor`` is ``"A"`` or ``"B"``,
``generator`` a CPU ``torch.Generator`` already seeded for this (seed, layer, factor), and
``weight`` the layer's pretrained weight as a (d_out × d_in) tensor (only ``svd`` reads it).
The result is float32 on CPU; the layer casts and moves it.

Determinism: the generator is seeded from a SHA-256 of ``"{seed}/{layer}/{factor}"``, so the
same config gives the same random numbers on any machine, independent of the global RNG, the
order in which layers are visited, and the device the model lives on.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator

import torch

from asymlora.core.threads import torch_threads
from asymlora.errors import UserError

Initializer = Callable[[tuple[int, int], str, torch.Generator, torch.Tensor | None], torch.Tensor]

INITIALIZERS: dict[str, Initializer] = {}

# Initialisers whose result depends only on (seed, layer name, shape): such a frozen factor
# need not be stored in a checkpoint, it is rebuilt on load.
SEED_REPRODUCIBLE = {"orthogonal", "kaiming", "gaussian", "zero"}


def register(name: str) -> Callable[[Initializer], Initializer]:
    def deco(fn: Initializer) -> Initializer:
        INITIALIZERS[name] = fn
        return fn

    return deco


def factor_generator(seed: int, layer_name: str, factor: str) -> torch.Generator:
    """A CPU generator seeded by (global seed, layer name, factor) through SHA-256."""
    digest = hashlib.sha256(f"{seed}/{layer_name}/{factor}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run a block on one intra-op thread: threaded LAPACK QR of a tall, thin matrix is far slower
    than one thread when cores are shared (BENCHMARKS.md: 67 s -> 2.6 s for a LLaMA-2-7B r=64 init).
    The result is bit-identical."""
    with torch_threads(1):
        yield


def haar_orthonormal(d: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """A d×r matrix with orthonormal columns, Haar-distributed on the Stiefel manifold.

    G ~ N(0, 1)^{d×r}; G = Q·R (reduced QR); Q·diag(sign(diag R)). Without the sign
    correction the distribution of Q depends on the QR implementation's sign convention and is
    not Haar (Mezzadri 2007). Cost O(d·r²), versus O(d_out·d_in·min) for the full SVD of a
    random d_out×d_in matrix. Computed in float64 so that rounding to float32 hides the last
    bits in which LAPACK builds may differ.
    """
    if r > d:
        raise UserError(f"cannot draw {r} orthonormal vectors in dimension {d}: rank must be <= {d}")
    gaussian = torch.randn(d, r, generator=generator, dtype=torch.float64)
    with single_thread():
        q, rr = torch.linalg.qr(gaussian, mode="reduced")
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0
    return (q * signs).to(torch.float32)


@register("orthogonal")
def orthogonal(shape: tuple[int, int], factor: str, generator: torch.Generator, weight=None) -> torch.Tensor:
    """A: orthonormal rows (A·Aᵀ = I_r); B: orthonormal columns (Bᵀ·B = I_r)."""
    rows, cols = shape
    if factor == "A":  # (r, d_in)
        return haar_orthonormal(cols, rows, generator).T.contiguous()
    return haar_orthonormal(rows, cols, generator)  # (d_out, r)


@register("kaiming")
def kaiming(shape: tuple[int, int], factor: str, generator: torch.Generator, weight=None) -> torch.Tensor:
    """Kaiming-uniform with a=√5 over the factor's own fan-in (nn.Linear's default init).

    bound = sqrt(6 / ((1 + a²)·fan_in)) = 1/sqrt(fan_in); fan_in = d_in for A, r for B.
    """
    fan_in = shape[1]
    bound = 1.0 / math.sqrt(fan_in)
    out = torch.empty(shape, dtype=torch.float32)
    out.uniform_(-bound, bound, generator=generator)
    return out


@register("gaussian")
def gaussian(shape: tuple[int, int], factor: str, generator: torch.Generator, weight=None) -> torch.Tensor:
    """N(0, 1/fan_in): variance-preserving Gaussian (fan_in = d_in for A, r for B)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(shape[1])


@register("zero")
def zero(shape: tuple[int, int], factor: str, generator: torch.Generator, weight=None) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float32)


@register("svd")
def svd(shape: tuple[int, int], factor: str, generator: torch.Generator, weight=None) -> torch.Tensor:
    """Top-r singular vectors of the *pretrained* weight W0 = U·S·Vᵀ (d_out×d_in).

    A = Vᵀ[:r] (top right singular vectors as rows), B = U[:, :r]. Note torch returns Vᵀ
    ("Vh"); its first r rows are the top r right singular vectors — the paper's code took the
    first r *columns* of Vh instead.
    """
    if weight is None:
        raise UserError("init 'svd' needs the layer's pretrained weight")
    if weight.is_meta:
        raise UserError("init 'svd' needs real pretrained weights, but the model is on the meta device")
    w = weight.detach().to("cpu", torch.float64)
    u, _s, vh = torch.linalg.svd(w, full_matrices=False)
    if factor == "A":
        r = shape[0]
        return vh[:r].to(torch.float32).contiguous()
    r = shape[1]
    return u[:, :r].to(torch.float32).contiguous()


def init_factor(
    name: str,
    shape: tuple[int, int],
    factor: str,
    seed: int,
    layer_name: str,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Build one factor (float32, CPU) with initialiser ``name`` for ``layer_name``."""
    if name not in INITIALIZERS:
        raise UserError(f"unknown initialiser {name!r}; valid: {', '.join(sorted(INITIALIZERS))}")
    if factor not in ("A", "B"):
        raise UserError(f"factor must be 'A' or 'B', got {factor!r}")
    gen = factor_generator(seed, layer_name, factor)
    return INITIALIZERS[name](shape, factor, gen, weight)


def fingerprint(t: torch.Tensor) -> dict:
    """A check value of a factor: exact SHA-256 of its float32 bytes plus float64 moments.

    The moments (sum, sum of squares, and an index-weighted sum) let a rebuilt factor be
    accepted when a different LAPACK build changed only its last bits, while a wrong seed,
    layer name or init gives entirely different values.
    """
    x = t.detach().to("cpu", torch.float32).contiguous()
    flat = x.reshape(-1).to(torch.float64)
    with single_thread():
        weights = torch.cos(torch.arange(flat.numel(), dtype=torch.float64) * 0.618033988749895)
        wsum = float((flat * weights).sum())
    return {
        "sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),
        "shape": list(x.shape),
        "sum": float(flat.sum()),
        "sumsq": float((flat * flat).sum()),
        "wsum": wsum,
    }


def fingerprints_match(expected: dict, actual: dict, rtol: float = 1e-5) -> bool:
    if list(expected.get("shape", [])) != list(actual["shape"]):
        return False
    if expected.get("sha256") == actual["sha256"]:
        return True
    scale = math.sqrt(max(expected.get("sumsq", 0.0), 1e-30))
    return all(abs(expected[k] - actual[k]) <= rtol * max(scale, 1.0) for k in ("sum", "wsum")) and abs(
        expected["sumsq"] - actual["sumsq"]
    ) <= rtol * max(expected["sumsq"], 1.0)
