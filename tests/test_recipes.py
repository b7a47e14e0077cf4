"""Every recipe in recipes/ loads and validates; recipe errors are clear; results tables aggregate by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from asymlora.cli.main import main
from asymlora.core.config import PRESETS
from asymlora.recipes import base as R

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
EXPECTED = {"glue-roberta-large", "xsum-bart-large", "cnndm-bart-large", "alpaca-mmlu-llama2-7b", "domainbed-vit-b16"}


def test_all_paper_tables_have_a_recipe():
    assert {p.stem for p in RECIPES} >= EXPECTED


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_valid(path):
    rec = R.load_recipe(path)
    assert rec.name == path.stem
    for s in rec.strategies:
        assert s.preset in PRESETS
        for r in s.ranks or rec.ranks:
            cfg = R.adapter_config(rec, s, r, seed=0)
            assert cfg.alpha == 2 * r  # the paper: alpha = 2r
    assert len(rec.seeds) >= 1 and rec.train["lr"] > 0
    for t in rec.tasks:
        rec.for_task(t)


def test_paper_settings():
    g = R.load_recipe("glue-roberta-large")
    assert g.model == "roberta-large" and g.ranks == [8, 16] and g.seeds == [0, 1, 2]
    assert g.train["lr"] == 4e-4 and g.train["epochs"] == 20 and g.data_args["max_length"] == 128
    assert g.target_modules == ["query", "value"] and g.modules_to_save == ["classifier"]
    assert set(g.tasks) == {"mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"}
    assert {"b-only", "a-only", "lora"} <= {s.name for s in g.strategies}
    for name, epochs, beams in (("xsum-bart-large", 25, 8), ("cnndm-bart-large", 15, 4)):
        b = R.load_recipe(name)
        assert b.model == "facebook/bart-large" and b.train["lr"] == 5e-4 and b.train["epochs"] == epochs
        assert b.train["batch_size"] * b.train.get("grad_accum", 1) == 48 and b.eval_args["num_beams"] == beams
        assert b.target_modules == ["q_proj", "k_proj", "v_proj"]
    m = R.load_recipe("alpaca-mmlu-llama2-7b")
    assert m.model == "meta-llama/Llama-2-7b-hf" and m.ranks == [32, 64] and 5 in m.eval_args["shots"]
    d = R.load_recipe("domainbed-vit-b16")
    assert d.model == "google/vit-base-patch16-224"
    assert d.for_task("VLCS").data_args["train_envs"] == ["LabelMe"]
    assert d.for_task("PACS").data_args["train_envs"] == ["cartoon"]
    assert d.for_task("OfficeHome").data_args["train_envs"] == ["Clipart"]
    assert d.data_args["holdout_fraction"] == 0.2


def _base() -> dict:
    return yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "glue-roberta-large.yaml").read_text())


@pytest.mark.parametrize("change, match", [
    ({"family": "vision"}, "unknown family 'vision'"),
    ({"tasks": ["sst2", "wnli"]}, "unknown glue task 'wnli'"),
    ({"strategies": ["b-only", "c-only"]}, "c-only"),
    ({"alpha": "twice"}, "alpha must be"),
    ({"train": {"lr": 1e-3, "learning_rate": 1}}, "learning_rate"),
    ({"ranks": [0]}, ">= 1"),
    ({"colour": 1}, "unknown recipe keys"),
    ({"dtype": "int8"}, "int8"),
    ({"quantize": "int4"}, "recipe field 'quantize': 'int4' is not a quantization scheme"),
    ({"train": {"lr": "fast"}}, "train.lr must be a number"),
    ({"data_args": {"max_len": 3}}, "max_len"),
    ({"strategies": [{"name": "x", "preset": "b-only", "init_A": "bogus"}]}, "bogus"),
])
def test_invalid_recipes(change, match):
    data = _base()
    data.update(change)
    with pytest.raises(ValueError, match=match):
        R.recipe_from_dict(data)


def test_alpha_value():
    assert R.alpha_value("2r", 8) == 16 and R.alpha_value("0.5r", 8) == 4 and R.alpha_value(32, 8) == 32


def test_set_overrides():
    rec = R.load_recipe("glue-roberta-large", ["train.lr=1e-3", "seeds=[5]", "task_overrides.rte={train: {epochs: 2}}"])
    assert rec.train["lr"] == 1e-3 and rec.seeds == [5] and rec.for_task("rte").train["epochs"] == 2
    with pytest.raises(ValueError, match="KEY=VALUE"):
        R.load_recipe("glue-roberta-large", ["train.lr"])


def test_unknown_recipe_name():
    with pytest.raises(FileNotFoundError, match="glue-roberta-large"):
        R.find_recipe("no-such-recipe")


def test_dry_run_plan(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "SST-2").mkdir()
    for f in ("train.tsv", "dev.tsv"):
        (tmp_path / "SST-2" / f).write_text("sentence\tlabel\n")
    rc = main(["run", "glue-roberta-large", "--model", str(model), "--data", str(tmp_path), "--tasks", "sst2",
               "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 4 * 2 * 3  # strategies x ranks x seeds
    assert lines[0] == "sst2\tb-only\tr=8\talpha=16\tseed=0"


ORDER = {"cola": 3, "rte": 6, "b-only": 0, "a-only": 1}


def _write_result(root: Path, task: str, strategy: str, r: int, seed: int, cols: dict, avg: list[str]) -> None:
    d = root / task / f"{strategy}-r{r}" / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"recipe": "glue-roberta-large", "table": "T2", "task": task,
                                               "strategy": strategy, "r": r, "seed": seed, "columns": cols,
                                               "task_index": ORDER[task], "strategy_index": ORDER[strategy],
                                               "avg_columns": avg}))


def test_results_table_by_hand(tmp_path, capsys):
    from asymlora.recipes import results

    for seed, (rte, cola) in enumerate([(0.80, 0.60), (0.84, 0.64), (0.82, 0.59)]):
        _write_result(tmp_path, "rte", "b-only", 8, seed, {"RTE": rte}, ["RTE"])
        _write_result(tmp_path, "cola", "b-only", 8, seed, {"CoLA": cola}, ["CoLA"])
    _write_result(tmp_path, "rte", "a-only", 8, 0, {"RTE": 0.70}, ["RTE"])  # a-only lacks CoLA: no Avg
    _write_result(tmp_path, "rte", "b-only", 4, 0, {"RTE": 0.50}, ["RTE"])
    tables = results.build_tables(results.collect([tmp_path]))
    t = tables["glue-roberta-large"]
    assert list(t["rows"]) == ["b-only r=4", "b-only r=8", "a-only r=8"]  # recipe strategy order, then rank
    assert t["columns"] == ["CoLA", "RTE", "Avg"]  # recipe task order (paper: ... CoLA, QNLI, QQP, RTE ...)
    m, s, n = t["rows"]["b-only r=8"]["RTE"]
    assert m == pytest.approx(82.0) and s == pytest.approx(2.0) and n == 3  # std of 80, 84, 82 (ddof=1) = 2
    m, s, n = t["rows"]["b-only r=8"]["CoLA"]
    assert m == pytest.approx(61.0) and s == pytest.approx(math.sqrt(7.0))  # (1+9+4)/2 = 7
    assert t["rows"]["b-only r=8"]["Avg"][0] == pytest.approx((82.0 + 61.0) / 2)
    assert "Avg" not in t["rows"]["a-only r=8"]
    rc = main(["results", str(tmp_path), "-o", str(tmp_path / "tab")])
    md = capsys.readouterr().out
    assert rc == 0 and "| b-only r=8 | 61.00 ± 2.65 | 82.00 ± 2.00 | 71.50 |" in md
    assert "| a-only r=8 | – | 70.00 | – |" in md
    csv_text = (tmp_path / "tab" / "results.csv").read_text().splitlines()
    assert "glue-roberta-large,b-only r=8,RTE,82.000000,2.000000,3" in csv_text


def test_results_errors(tmp_path, capsys):
    assert main(["results", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"asymlora results: error: DIR '{tmp_path / 'missing'}' does not exist"
    assert main(["results", str(tmp_path)]) == 2  # no result at all: a mistake in the input, not a failure
    assert capsys.readouterr().err.strip() == (f"asymlora results: error: no result.json under {tmp_path}: give the "
                                               "--output-dir of `asymlora run`")
    assert sorted(tmp_path.iterdir()) == []  # nothing written
