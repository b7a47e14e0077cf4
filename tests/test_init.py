"""Seeded factors: orthonormal, Haar, deterministic across processes, distinct per layer."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from asymlora.core.init import (
    INITIALIZERS,
    factor_generator,
    fingerprint,
    fingerprints_match,
    haar_orthonormal,
    init_factor,
)


def test_orthogonal_A_rows_and_B_columns_orthonormal():
    a = init_factor("orthogonal", (8, 96), "A", seed=0, layer_name="l")
    b = init_factor("orthogonal", (80, 8), "B", seed=0, layer_name="l")
    assert torch.allclose(a @ a.T, torch.eye(8), atol=1e-5)
    assert torch.allclose(b.T @ b, torch.eye(8), atol=1e-5)


def test_full_rank_square_case():
    q = init_factor("orthogonal", (16, 16), "A", seed=3, layer_name="sq")
    assert torch.allclose(q @ q.T, torch.eye(16), atol=1e-5)


def test_rank_larger_than_dimension_rejected():
    with pytest.raises(ValueError, match="rank must be <= 4"):
        haar_orthonormal(4, 5, factor_generator(0, "x", "A"))


def test_same_seed_same_layer_bit_identical_and_independent_of_global_rng():
    a1 = init_factor("orthogonal", (4, 32), "A", seed=7, layer_name="enc.0.q")
    torch.manual_seed(999)
    torch.randn(100)
    a2 = init_factor("orthogonal", (4, 32), "A", seed=7, layer_name="enc.0.q")
    assert torch.equal(a1, a2)


def test_different_layers_seeds_and_factors_differ():
    base = init_factor("orthogonal", (4, 32), "A", seed=7, layer_name="enc.0.q")
    assert not torch.equal(base, init_factor("orthogonal", (4, 32), "A", seed=7, layer_name="enc.0.v"))
    assert not torch.equal(base, init_factor("orthogonal", (4, 32), "A", seed=8, layer_name="enc.0.q"))
    b = init_factor("orthogonal", (32, 4), "B", seed=7, layer_name="enc.0.q")
    assert not torch.allclose(base, b.T)


_CHILD = (
    "import hashlib, torch; from asymlora.core.init import init_factor;"
    "t = init_factor('orthogonal', (8, 64), 'A', seed=11, layer_name='model.layers.3.self_attn.q_proj');"
    "print(hashlib.sha256(t.numpy().tobytes()).hexdigest())"
)


def test_determinism_across_two_processes():
    digests = {subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True).stdout.strip()
               for _ in range(2)}
    here = init_factor("orthogonal", (8, 64), "A", seed=11, layer_name="model.layers.3.self_attn.q_proj")
    assert len(digests) == 1
    assert digests == {fingerprint(here)["sha256"]}


def test_haar_sign_correction_present():
    # With the sign fix, diag(R) of the QR of the result's Gaussian is positive, which makes the first
    # entry of each column symmetric around 0 over seeds. Without it LAPACK's convention biases the sign
    # (Householder QR gives negative diag(R) -> columns aligned against G). Check both the mechanism and
    # the distribution: E[Q] = 0 entrywise for a Haar matrix.
    g = factor_generator(0, "x", "A")
    gauss = torch.randn(6, 3, generator=g, dtype=torch.float64)
    q = haar_orthonormal(6, 3, factor_generator(0, "x", "A")).double()
    # q columns = raw columns times sign(diag R): the projection of G's column j on q_j is |R_jj| > 0
    assert torch.all(torch.diagonal(q.T @ gauss) > 0)
    mean_first = torch.stack([haar_orthonormal(5, 2, factor_generator(s, "x", "A"))[0] for s in range(3000)]).mean(0)
    assert mean_first.abs().max() < 4 * (1 / 5) ** 0.5 / 3000 ** 0.5


def test_haar_matches_known_second_moment():
    # For Haar Q (d x r), E[Q_ij^2] = 1/d.
    d, r = 7, 3
    sq = torch.stack([haar_orthonormal(d, r, factor_generator(s, "m", "B")) ** 2 for s in range(2000)]).mean(0)
    assert torch.allclose(sq, torch.full((d, r), 1 / d), atol=0.02)


def test_kaiming_and_gaussian_scales():
    k = init_factor("kaiming", (64, 400), "A", seed=0, layer_name="l")
    assert k.abs().max() <= 1 / 400 ** 0.5 + 1e-7
    assert abs(k.var().item() - 1 / (3 * 400)) < 0.1 / (3 * 400)
    g = init_factor("gaussian", (64, 400), "A", seed=0, layer_name="l")
    assert abs(g.var().item() - 1 / 400) < 0.1 / 400


def test_svd_uses_V_rows_and_U_columns_of_pretrained_weight():
    torch.manual_seed(0)
    w = torch.randn(12, 20)
    a = init_factor("svd", (3, 20), "A", seed=0, layer_name="l", weight=w)
    b = init_factor("svd", (12, 3), "B", seed=0, layer_name="l", weight=w)
    u, s, vh = torch.linalg.svd(w.double())
    # W·v_i = s_i·u_i for the top-3 right singular vectors (rows of A) — fails if Vh columns were used.
    assert torch.allclose((w.double() @ a.double().T), (b.double() * s[:3]), atol=1e-5)
    assert torch.allclose(a @ a.T, torch.eye(3), atol=1e-5)
    with pytest.raises(ValueError, match="needs the layer's pretrained weight"):
        init_factor("svd", (3, 20), "A", seed=0, layer_name="l")


def test_registry_and_fingerprints():
    assert set(INITIALIZERS) == {"orthogonal", "kaiming", "gaussian", "zero", "svd"}
    with pytest.raises(ValueError, match="unknown initialiser 'nope'"):
        init_factor("nope", (2, 2), "A", 0, "l")
    t = init_factor("orthogonal", (4, 16), "A", seed=0, layer_name="l")
    fp = fingerprint(t)
    assert fingerprints_match(fp, fingerprint(t.clone()))
    nudged = t.clone()
    nudged[0, 0] = torch.nextafter(nudged[0, 0], torch.tensor(2.0))    # one ulp: a different LAPACK build
    assert fingerprints_match(fp, fingerprint(nudged))
    assert not fingerprints_match(fp, fingerprint(init_factor("orthogonal", (4, 16), "A", seed=1, layer_name="l")))
