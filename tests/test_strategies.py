"""The strategy registry (``asymlora.strategies``): every entry adapts a model, trains what it
says (our rows: closed-form counts; PEFT's rows: PEFT's own count), saves a file that loads
back to the same outputs, and is named the same way by compare, sft and train. A user's
module is a row like ours; what cannot run is refused in one line before any run."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from asymlora.errors import UserError
from asymlora.strategies import REGISTRY, AdaptRequest, get_strategy, parse_strategy
from asymlora.sweep.config import SweepConfig
from conftest import require, tiny_bert

ROOT = Path(__file__).resolve().parents[1]
R, D, LAYERS = 4, 32, 4  # tiny_bert: hidden 32, query and value of 2 layers
EXAMPLE = str(ROOT / "examples" / "custom_strategy.py")
HEAD = 32 * 3 + 3  # tiny_bert's classifier: 32 -> 3 labels

# adapter parameters per strategy on tiny_bert's query/value at rank R, in closed form
CLOSED_FORM = {
    "lora": LAYERS * R * (D + D),
    "b-only": LAYERS * R * D,          # B: d_out × r
    "a-only": LAYERS * R * D,          # A: r × d_in
    "head-only": 0,
    "peft:lora": LAYERS * R * (D + D),
    "peft:lora-fa": LAYERS * R * D,    # A frozen
    "peft:dora": LAYERS * (R * (D + D) + D),  # and a magnitude per output
    "peft:rslora": LAYERS * R * (D + D),
    "peft:pissa": LAYERS * R * (D + D),
    "peft:olora": LAYERS * R * (D + D),
    "peft:mica": LAYERS * R * D,       # B frozen, A trained
    "peft:vera": LAYERS * (D + R),     # lambda_d (r) and lambda_b (d_out)
}


def _request(seed: int = 0) -> AdaptRequest:
    return AdaptRequest(rank=R, seed=seed, targets=["query", "value"], head="classifier")


def test_every_registered_strategy_has_a_closed_form_count_here():
    assert set(REGISTRY) == set(CLOSED_FORM)


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_each_strategy_trains_its_closed_form_count(name):
    if name.startswith("peft:"):
        require("peft")
    strategy = get_strategy(name)
    model = tiny_bert(seed=1)
    if not strategy.is_adapter:
        assert strategy.adapter_params(model, "classifier") == 0
        return
    adapted = strategy.adapt(model, _request())
    assert strategy.adapter_params(adapted.model, "classifier") == CLOSED_FORM[name]
    head = [p for n, p in adapted.model.named_parameters() if "classifier" in n.split(".") and p.requires_grad]
    assert sum(p.numel() for p in head) == HEAD  # the head trains in every row
    if strategy.family == "peft":  # PEFT's own count: adapter + the head's trained copy
        assert adapted.model.get_nb_trainable_parameters()[0] == CLOSED_FORM[name] + HEAD


def _nudge_trained(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", sorted(n for n, s in REGISTRY.items() if s.is_adapter and not s.mutates_base))
def test_each_adapter_file_loads_back_to_the_same_outputs(tmp_path, name):
    """The file the size column measures is the adapter a user keeps: loaded onto a fresh base
    it gives the trained model's logits."""
    if name.startswith("peft:"):
        require("peft")
    strategy = get_strategy(name)
    model = strategy.adapt(tiny_bert(seed=1), _request()).model.eval()
    _nudge_trained(model, 0)
    strategy.save(model, str(tmp_path / "a"))
    assert strategy.file_bytes(model) == sum(f.stat().st_size for f in (tmp_path / "a").rglob("*") if f.is_file())
    loaded = strategy.load(tiny_bert(seed=1), str(tmp_path / "a")).eval()
    ids = torch.randint(1, 64, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)


def test_b_only_stores_only_what_it_trains():
    lora, b_only = get_strategy("lora"), get_strategy("b-only")
    sizes = {s.name: s.file_bytes(s.adapt(tiny_bert(seed=1), _request()).model) for s in (lora, b_only)}
    # b-only's frozen A is rebuilt from its seed: about half of lora's factors are not stored
    assert sizes["b-only"] < sizes["lora"] - 0.8 * LAYERS * R * D * 4


@pytest.mark.parametrize("name", ["peft:pissa", "peft:olora"])
def test_a_strategy_that_rewrites_the_base_says_so(name):
    """PiSSA and OLoRA replace W0 by its residual: a run must own its copy of those layers
    (``mutates_base``), or it would change the base every other run shares."""
    require("peft")
    base = tiny_bert(seed=1)
    before = base.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model = copy.deepcopy(base)
    get_strategy(name).adapt(model, _request())
    after = model.bert.encoder.layer[0].attention.self.query.base_layer.weight  # PEFT adapts in place
    assert get_strategy(name).mutates_base and not torch.allclose(before, after)
    assert not get_strategy("peft:dora").mutates_base


def test_mica_freezes_b_at_the_minor_singular_vectors():
    require("peft")
    base = tiny_bert(seed=1)
    w0 = base.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model = get_strategy("peft:mica").adapt(base, _request()).model
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    assert not b.requires_grad and a.requires_grad and torch.count_nonzero(a) == 0
    u = torch.linalg.svd(w0.double())[0][:, -R:]  # the r left singular vectors of the smallest values
    proj = b.double() @ torch.linalg.pinv(b.double())  # B spans the same subspace (up to sign/scale)
    assert torch.allclose(proj @ u, u, atol=1e-5)


def test_vera_rates_live_ten_times_higher():
    cfg = SweepConfig(lrs=[1e-3, 3e-3, 1e-2])
    assert cfg.lr_grid(parse_strategy("peft:vera", 8)) == [1e-2, 3e-2, 1e-1]
    assert cfg.lr_grid(parse_strategy("b-only", 8)) == [1e-3, 3e-3, 1e-2]
    assert SweepConfig(lr=5e-3).lr_grid(parse_strategy("peft:vera", 8)) == [5e-3]  # --lr: one rate for all


def test_old_names_still_parse_as_the_same_rows():
    spec = parse_strategy("peft-lora-fa", 8)
    assert spec.preset == "peft:lora-fa" and spec.label == "peft-lora-fa r=8"
    assert parse_strategy("b-only@2r", 8).rank == 16 and parse_strategy("b-only@2r", 8).base_rank == 8
    assert parse_strategy("head-only", 8).preset is None
    runs = SweepConfig(strategies=["peft-lora", "peft:lora"], ranks=[8]).runs()
    assert [s.label for s in runs] == ["peft-lora r=8"]  # one strategy, not two rows


def test_verdicts_are_against_the_reference_strategy():
    assert [n for n, s in REGISTRY.items() if s.reference] == ["lora"]


@pytest.mark.parametrize("bad, words", [("peft:nope", "not valid"), ("head-only@2r", "no rank"),
                                        ("nosuchmodule_xyz:f", "cannot be imported"),
                                        (f"{EXAMPLE}:missing", "has no 'missing'")])
def test_bad_strategy_names_are_one_line_errors(bad, words):
    with pytest.raises(UserError, match=words):
        parse_strategy(bad, 8)
    assert any(words in p for p in SweepConfig(strategies=[bad]).problems())


def test_a_method_peft_cannot_apply_is_refused_before_any_run():
    require("peft")
    big = AdaptRequest(rank=40, seed=0, targets=["query", "value"], head="classifier")  # rank > d = 32
    problem = get_strategy("peft:mica").problem(tiny_bert(seed=1), big)
    assert problem is not None and problem.startswith("strategy 'peft:mica' cannot adapt this model: ")
    assert "\n" not in problem
    assert get_strategy("peft:dora").problem(tiny_bert(seed=1), _request()) is None


def test_a_user_module_is_a_row_like_ours():
    """examples/custom_strategy.py: a factory returning a PEFT config (IA3) and one adapting
    with our core (b-only at half the rank)."""
    require("peft")
    ia3 = get_strategy(f"{EXAMPLE}:ia3")
    model = ia3.adapt(tiny_bert(seed=1), _request()).model
    # (IA)³ on query and value (not feed-forward): one scaling per output, d_out numbers a layer
    assert ia3.family == "user" and ia3.adapter_params(model, "classifier") == LAYERS * D
    assert ia3.file_bytes(model) > 0
    half = get_strategy(f"{EXAMPLE}:half_b_only")
    model = half.adapt(tiny_bert(seed=1), _request()).model
    assert half.adapter_params(model, "classifier") == LAYERS * (R // 2) * D
    spec = parse_strategy(f"{EXAMPLE}:half_b_only@2r", R)
    assert spec.rank == 2 * R and spec.strategy is half


def test_a_user_module_on_the_import_path(tmp_path, monkeypatch):
    (tmp_path / "mymethods.py").write_text(
        "import asymlora\n"
        "def mine(model, request):\n"
        "    return asymlora.wrap(model, asymlora.AsymLoraConfig.preset('a-only', r=request.rank, seed=request.seed,\n"
        "        target_modules=request.targets, modules_to_save=[request.head]))\n")
    monkeypatch.chdir(tmp_path)  # as with `python -m`: the current folder is on the path
    strategy = get_strategy("mymethods:mine")
    model = strategy.adapt(tiny_bert(seed=1), _request()).model
    assert strategy.adapter_params(model, "classifier") == CLOSED_FORM["a-only"]


def test_cli_refuses_a_bad_strategy_in_one_line(tmp_path, capsys):
    from asymlora.cli.main import main

    out = tmp_path / "out"
    assert main(["compare", "--quick", "--strategies", "lora,peft:nope", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'peft:nope' is not valid" in err
    assert not out.exists()  # nothing half-written


def test_backends_are_registered_once():
    """--backend, the settings check and the first line read ``BACKENDS``; a name not in it is
    one message naming the ones that are."""
    from asymlora.cli.main import build_parser
    from asymlora.sweep.backends import BACKENDS, describe_backend

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["compare"]._actions
                  if "--backend" in a.option_strings)
    assert list(action.choices) == list(BACKENDS) == ["local", "ray"]
    assert SweepConfig(backend="nope").problems() == ["--backend 'nope': use local or ray"]
    assert "goes with --backend ray" in SweepConfig(ray_address="auto").problems()[0]
    assert describe_backend(SweepConfig(), 2, 1) == "2 worker processes × 1 thread"


def test_sft_benchmarks_go_through_the_chosen_backend(monkeypatch):
    """sft's benchmark phase asks the sweep's backend (``--backend``) for its executor, as the
    tuning phase does, and sends it the base model and every run's adapter with its strategy."""
    import asymlora.sft.protocol as sp
    from asymlora.sft.config import SFTConfig
    from asymlora.sweep.backends import InProcess

    asked, ran = [], []

    def fake_backend(cfg, workers, prepare, execute, phase="runs"):
        asked.append((cfg.backend, workers, phase, execute))

        def run(state, cfg, job, tag):
            ran.append(job)
            return (None if job is None else job[0]), {"arc_easy": {"acc": 0.5}}, 0.0

        return InProcess(None, cfg, run)

    monkeypatch.setattr(sp, "adapter_backend", fake_backend)
    runs = [{"adapter_dir": "/a/1", "preset": "b-only"}, {"adapter_dir": "/a/2", "preset": "peft:lora"},
            {"adapter_dir": "/a/3", "preset": "lora", "diverged": True}]
    out = sp._run_benchmarks(SFTConfig(backend="local"), runs, 2, lambda: None)
    assert asked == [("local", 2, "benchmarks", sp._execute_bench)]
    assert ran == [None, ("/a/1", "b-only"), ("/a/2", "peft:lora")]  # a diverged run has no adapter to score
    assert set(out) == {None, "/a/1", "/a/2"}
