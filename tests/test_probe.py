"""`asymlora probe`: per-layer §4 theory on real layer inputs, checked against asymlora.theory."""
from __future__ import annotations

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch
from torch import nn

from asymlora.analysis.probe import (
    LayerMoments,
    analyse_layer,
    collect_moments,
    layer_group,
    proxy_problem,
    smallest_rank,
    summarize,
)
from asymlora.analysis.probe_run import classification_loss, find_targets
from asymlora.cli.main import main
from asymlora.errors import UserError
from asymlora.theory import (
    LinearProblem,
    effective_rank,
    expected_loss_b_only,
    make_covariance,
    optimal_both,
)
from conftest import tiny_bert

D_IN, D_OUT, R, N_TOKENS = 24, 16, 4, 240


# ---- synthetic linear layer with a known Σ ----------------------------------------------------
def inputs_with_second_moment(sigma: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n × d inputs whose empirical second moment XᵀX/n is exactly Σ: X = √n·Z·Σ^{1/2}, ZᵀZ = I."""
    rng = np.random.default_rng(seed)
    z, _ = np.linalg.qr(rng.standard_normal((n, sigma.shape[0])))
    lam, v = np.linalg.eigh(sigma)
    return np.sqrt(n) * z @ (v * np.sqrt(np.clip(lam, 0, None))) @ v.T


def linear_layer_moments(sigma: np.ndarray, seed: int = 0) -> tuple[LayerMoments, LinearProblem, np.ndarray]:
    """Probe a bias-free linear layer W0 trained toward y = W_t·x (squared loss, no noise):
    the paper's §4 setting exactly. Returns the moments, the true problem and Δ = W_t − W0."""
    rng = np.random.default_rng([seed, 1])
    w0, wt = rng.standard_normal((D_OUT, D_IN)), rng.standard_normal((D_OUT, D_IN))
    x = torch.tensor(inputs_with_second_moment(sigma, N_TOKENS, seed))
    y = x @ torch.tensor(wt).T
    layer = nn.Linear(D_IN, D_OUT, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(w0))
    model = nn.Sequential(layer)
    batches = [(x[i:i + 70], y[i:i + 70]) for i in range(0, N_TOKENS, 70)]  # uneven last batch
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum()  # noqa: E731
    moments = collect_moments(model, batches, loss, {"blocks.0.proj": layer}, mask_fn=lambda b: None)
    delta = wt - w0
    return moments["blocks.0.proj"], LinearProblem(np.zeros_like(delta), delta, sigma), delta


SPECTRA = {
    "isotropic": lambda: make_covariance("isotropic", D_IN),
    "rank-8": lambda: make_covariance("lowrank", D_IN, 3, k=8),
    "power-law": lambda: make_covariance("powerlaw", D_IN, 4, decay=1.5),
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_statistics_and_proxy_recover_the_linear_model(spectrum):
    sigma = SPECTRA[spectrum]()
    m, truth, delta = linear_layer_moments(sigma)
    assert m.n_tokens == N_TOKENS
    np.testing.assert_allclose(m.sigma, sigma, atol=1e-10)
    # G = Σ_t ∂L/∂y_t x_tᵀ = −2·Δ·Σ·N for the squared loss of y = W_t x
    np.testing.assert_allclose(m.gradient, -2 * delta @ sigma * N_TOKENS, atol=1e-8 * N_TOKENS)
    # Δ = −½·G·Σ⁺ recovers the true update (on range Σ): the same M = Δ·Σ^{1/2}
    prob = proxy_problem(m)
    np.testing.assert_allclose(prob.M / N_TOKENS, truth.M, atol=1e-8)
    if spectrum != "rank-8":
        np.testing.assert_allclose(prob.delta / N_TOKENS, delta, atol=1e-7)


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_layer_numbers_equal_the_theory_within_error(spectrum):
    sigma = SPECTRA[spectrum]()
    m, truth, _ = linear_layer_moments(sigma, seed=2)
    row = analyse_layer(m, R, n_samples=400, seed=5, method="mc")
    assert row["effective_rank"] == pytest.approx(effective_rank(sigma), rel=1e-9)
    assert row["frac_a_only"] == pytest.approx(R / D_OUT)  # Theorem 4.3, exact for every Σ
    assert row["frac_both"] == pytest.approx(optimal_both(truth, R).explained / truth.signal, rel=1e-8)
    b, se = row["frac_b_only"], row["se_b_only"]
    assert row["method_b_only"] == "mc" and se > 0
    if spectrum == "isotropic":
        expected, err = R / D_IN, se  # closed form r/d_in
    elif spectrum == "rank-8":
        expected, err = R / 8, se  # closed form r/k for k equal eigenvalues
    else:  # no closed form: the theory's own Monte Carlo with other draws
        ref = expected_loss_b_only(truth, R, method="mc", n_samples=400, seed=99)
        expected, err = ref.fraction, np.hypot(se, ref.se / truth.signal)
    assert abs(b - expected) <= 4 * err, (b, expected, err)


def test_r90_is_the_smallest_rank_by_brute_force():
    # isotropic Σ: the b-only fraction has the closed form r/d_in, so r90 is deterministic
    m, truth, _ = linear_layer_moments(make_covariance("isotropic", D_IN), seed=3)
    both = [optimal_both(truth, r).explained / truth.signal for r in range(1, D_OUT + 1)]
    brute = next((r for r in range(1, D_OUT + 1) if r / D_IN >= 0.9 * both[r - 1]), None)
    got = smallest_rank(proxy_problem(m), 0.9)
    assert got == brute
    # with d_in > d_out, b-only caps at d_out/d_in < 0.9 of both at r = d_out: never
    assert brute is None or brute <= D_OUT
    # rank-k inputs: b-only captures everything from r = k on, so r90 <= k
    m8, _, _ = linear_layer_moments(make_covariance("lowrank", D_IN, 3, k=8))
    r90 = smallest_rank(proxy_problem(m8), 0.9, n_samples=50)
    assert r90 is not None and r90 <= 8
    assert analyse_layer(m8, 8)["frac_b_only"] == pytest.approx(1.0)  # closed form: rank Σ <= r


def test_layer_groups_and_summary():
    assert layer_group("bert.encoder.layer.11.attention.self.query") == "bert.encoder.layer.*.attention.self.query"
    assert layer_group("h.2.mlp.c_fc") == "h.*.mlp.c_fc"
    rows = [{"group": "g", "signal": 1.0, "r": 4, "effective_rank": 3.0, "d_in": 8, "d_out": 8,
             "frac_a_only": 0.5, "frac_b_only": b, "frac_both": 0.9, "r90_b_only": r90}
            for b, r90 in ((0.9, 4), (0.85, 4), (0.2, None))]
    (s,) = summarize(rows)
    assert s["mean_frac_b_only"] == pytest.approx((0.9 + 0.85 + 0.2) / 3)
    assert "asymmetry predicted: b-only ahead of a-only on 2/3 layers" in s["recommendation"]
    assert "median r=4, never on 1 of 3 layers" in s["recommendation"]


# ---- a real transformer: hooks, masks, errors -------------------------------------------------
def bert_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(5, 64, (3, 7), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0  # padded example
        mask[2, 6:] = 0
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])})
    return out


def test_hooks_leave_the_model_unchanged_and_match_autograd():
    model = tiny_bert(num_labels=3)
    batches = bert_batches()
    before = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.detach() for b in batches]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()  # must come back in train mode too
    targets = find_targets(model, ["query", "value"], 4)
    moments = collect_moments(model, batches, classification_loss, targets)

    assert model.training and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    after = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.detach() for b in batches]
    assert all(torch.equal(x, y) for x, y in zip(before, after))

    # independent truth: autograd's weight gradient of the summed loss, and Σ of layer 0's query
    # input (the embedding output) over the real tokens only
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    model.zero_grad()
    sum(classification_loss(model, b) for b in batches).backward()
    hidden = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
              .hidden_states[0][b["attention_mask"].bool()].detach().double() for b in batches]
    h = torch.cat(hidden)
    for name, m in moments.items():
        assert m.n_tokens == n_real
        np.testing.assert_allclose(m.gradient, targets[name].weight.grad.double().numpy(), atol=1e-5, rtol=1e-4)
    q0 = moments["bert.encoder.layer.0.attention.self.query"]
    np.testing.assert_allclose(q0.sigma, (h.T @ h / n_real).numpy(), atol=1e-5)


def test_meta_model_and_missing_layers_are_clear_errors():
    model = tiny_bert()
    meta = tiny_bert().to("meta")
    with pytest.raises(UserError, match="meta"):
        collect_moments(meta, bert_batches(), classification_loss, find_targets(meta, ["query"], 4))
    with pytest.raises(UserError, match="'attn_q'.*matches no module"):
        find_targets(model, ["attn_q"], 4)
    with pytest.raises(UserError, match="regex"):
        find_targets(model, [r".*\.nothing\d"], 4)
    with pytest.raises(UserError, match=r"rank 33 exceeds .*valid: 1\.\.32"):
        find_targets(model, ["query"], 33)
    # the classifier head is never a target, even with all-linear
    assert "classifier" not in find_targets(model, ["all-linear"], 4)


# ---- the command, end to end --------------------------------------------------------------------
WORDS = ["good", "bad", "great", "awful", "day", "film", "very", "not", "plot", "acting"]


@pytest.fixture
def tiny_model_dir(tmp_path):
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    path = tmp_path / "tiny-bert"
    tiny_bert(num_labels=2).save_pretrained(path)
    BertTokenizer(vocab=vocab).save_pretrained(path)
    return path


@pytest.fixture
def tiny_csv(tmp_path):
    p = tmp_path / "reviews.csv"
    rng = np.random.default_rng(0)
    with open(p, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "stars"])
        for i in range(60):
            w.writerow([" ".join(rng.choice(WORDS, size=3 + i % 6)), "5" if i % 2 else "1"])
    return p


def test_cli_end_to_end_on_a_tiny_bert(tiny_model_dir, tiny_csv, tmp_path, capsys):
    out = tmp_path / "probe"
    rc = main(["probe", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-column", "review",
               "--label-column", "stars", "--target-modules", "query, value", "-r", "4", "--max-examples", "40",
               "--batch-size", "8", "--mc-samples", "50", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "Summary" in text and "attention.self.query:" in text and "attention.self.value:" in text
    rows = list(csv.DictReader(open(out / "probe.csv")))
    assert [r["layer"] for r in rows] == [f"bert.encoder.layer.{i}.attention.self.{k}"
                                         for k in ("query", "value") for i in range(2)]
    res = json.loads((out / "probe.json").read_text())
    assert res["config"]["examples"] == 40 and res["config"]["r"] == 4
    for r in res["rows"]:
        assert r["frac_a_only"] == pytest.approx(4 / 32)
        assert 0 <= r["frac_b_only"] <= r["frac_both"] + 4 * r["se_b_only"] and r["frac_both"] <= 1 + 1e-9
        assert r["n_tokens"] > 40 and 1 <= r["effective_rank"] <= 32
    assert len(res["summary"]) == 2
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(out) if n.startswith(".")]


@pytest.mark.parametrize("args, message", [
    (["-r", "0"], "--rank 0"),
    (["--max-examples", "0"], "--max-examples 0"),
    (["--mc-samples", "1"], "--mc-samples 1"),
    (["--data", "no-such-data"], "'no-such-data' is neither"),
    (["--target-modules", "attn_q"], "'attn_q' matches no module"),
    (["-r", "40"], "rank 40 exceeds"),
])
def test_cli_bad_input_fails_before_work(tiny_model_dir, tiny_csv, tmp_path, capsys, args, message):
    out = tmp_path / "probe"
    base = ["probe", "--model", str(tiny_model_dir), "--data", str(tiny_csv), "--text-column", "review",
            "--label-column", "stars", "-o", str(out)]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_model_without_weights(tmp_path, tiny_csv, capsys):
    path = tmp_path / "config-only"
    tiny_bert().config.save_pretrained(path)
    assert main(["probe", "--model", str(path), "--data", str(tiny_csv), "--text-column", "review",
                 "--label-column", "stars", "-o", str(tmp_path / "o")]) == 2
    assert "cannot load" in capsys.readouterr().err


# ---- the real bundled model ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.needs_assets("minilm", "fortunes")
def test_probe_on_the_bundled_minilm(tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["probe", "--max-examples", "64", "--mc-samples", "50", "--target-modules",
                 r".*layer\.5\.(intermediate|output)\.dense", "-o", str(out), "--no-plots"]) == 0
    res = json.loads((out / "probe.json").read_text())
    names = [r["layer"] for r in res["rows"]]
    assert names == [f"bert.encoder.layer.{i}.{k}.dense" for i in (5,) for k in ("intermediate", "output")]
    for r in res["rows"]:
        assert (r["d_in"], r["d_out"]) == ((384, 1536) if "intermediate" in r["layer"] else (1536, 384))
        assert r["frac_a_only"] == pytest.approx(8 / r["d_out"])
        # Eckart-Young: no rank-8 update beats the best one (b-only within its Monte-Carlo error),
        # and the best keeps at least the top 8 of min(d_in, d_out) singular values' share, 8/384
        assert r["frac_b_only"] <= r["frac_both"] + 3 * r["se_b_only"] and r["frac_a_only"] <= r["frac_both"] + 1e-9
        assert 8 / min(r["d_in"], r["d_out"]) <= r["frac_both"] <= 1 + 1e-9
        assert r["b_over_both"] == pytest.approx(r["frac_b_only"] / r["frac_both"])
        assert r["frac_b_only"] > 0 and r["se_b_only"] < 0.1 * r["frac_b_only"]
        assert r["n_tokens"] > 1000  # ≈ 64 fortunes × ~30 tokens
    assert "intermediate.dense:" in capsys.readouterr().out
