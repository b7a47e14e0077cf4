"""One failure path for every command (issue 11): a mistake in the input gives exit status 2 and
one line ``asymlora <command>: error: <message naming the bad value>`` on stderr, no traceback,
and no output folder left behind. Plus the shared conventions: -o/--output-dir (with the hidden
--out alias), lists with commas or spaces, --debug, and similarity's folder search."""
from __future__ import annotations

import csv
import json
import os

import pytest

from asymlora import AsymLoraConfig, save_adapter, wrap
from asymlora.cli.main import build_parser, main
from asymlora.errors import UserError
from asymlora.formats.native import CONFIG_NAME
from conftest import perturb_trained_factors, tiny_bert


def _adapter(folder, seed: int = 0):
    model = wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=4, seed=seed))
    perturb_trained_factors(model, seed=seed + 10)
    return save_adapter(model, folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the bad calls refer to (read only, built once)."""
    tmp_path = tmp_path_factory.mktemp("inputs")
    (tmp_path / "nolabel.csv").write_text("text,topic\nhello,a\nworld,b\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "fake-model").mkdir()  # passes the config.json check; the data fails first
    (tmp_path / "fake-model" / "config.json").write_text("{}")
    _adapter(tmp_path / "good")
    _adapter(tmp_path / "tampered")
    meta = json.loads((tmp_path / "tampered" / CONFIG_NAME).read_text())
    meta["config"]["r"] = 8
    (tmp_path / "tampered" / CONFIG_NAME).write_text(json.dumps(meta))
    for i in range(3):  # a folder holding three final adapters
        _adapter(tmp_path / "many" / f"run{i}" / "adapter", seed=i)
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tiny_bert(num_labels=2).save_pretrained(tmp_path / "tiny-bert")  # a real (tiny) model folder
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tiny-bert")
    (tmp_path / "topics.csv").write_text("text,label\n" + "".join(f"a b {i},{i % 2}\n" for i in range(40)))
    (tmp_path / "badresults").mkdir()
    (tmp_path / "badresults" / "result.json").write_text("{oops")
    return tmp_path


# (argv, substrings the one-line message must contain, output folder that must not appear)
# "{t}" is the test's tmp folder; "OUT" the output folder.
CASES = [
    # compare (the list)
    (["compare", "--strategies", "nonsense", "-o", "OUT"], ["'nonsense'"], "OUT"),
    (["compare", "-r", "0", "-o", "OUT"], ["--rank [0]"], "OUT"),
    (["compare", "--rank", "-3", "-o", "OUT"], ["--rank [-3]"], "OUT"),
    (["compare", "--max-steps", "0", "-o", "OUT"], ["--max-steps 0"], "OUT"),
    (["compare", "--lr", "-1", "-o", "OUT"], ["--lr -1.0"], "OUT"),
    (["compare", "--threads", "0", "-o", "OUT"], ["--threads 0"], "OUT"),
    (["compare", "--model", "/nonexistent", "-o", "OUT"], ["'/nonexistent'"], "OUT"),
    (["compare", "--data", "/nonexistent.csv", "-o", "OUT"], ["'/nonexistent.csv'"], "OUT"),
    (["compare", "--model", "{t}/fake-model", "--data", "{t}/nolabel.csv", "--threads", "1", "-o", "OUT"],
     ["'label'", "--label-column"], "OUT"),
    (["compare", "--model", "{t}/fake-model", "--data", "{t}/empty.csv", "--threads", "1", "-o", "OUT"],
     ["empty.csv", "no rows"], "OUT"),
    (["compare", "--seeds", "1,1", "-o", "OUT"], ["--seeds [1, 1]"], "OUT"),
    # sft: the protocol's flags are compare's; its own are the model, the QA data and the plateau rule
    (["sft", "--data", "squad", "--benchmarks", "none", "-o", "OUT"], ["--data 'squad'"], "OUT"),
    (["sft", "--strategies", "head-only", "--benchmarks", "none", "-o", "OUT"], ["'head-only'"], "OUT"),
    (["sft", "--model", "/nonexistent", "--benchmarks", "none", "-o", "OUT"], ["'/nonexistent'"], "OUT"),
    (["sft", "--min-delta", "-1", "--max-steps", "0", "--benchmarks", "none", "-o", "OUT"],
     ["--min-delta -1.0", "--max-steps 0"], "OUT"),
    (["compare", "--max-steps", "abc", "-o", "OUT"], ["'abc'"], "OUT"),
    (["compare", "--max-steps", "0", "--lr", "-1", "-o", "OUT"], ["--max-steps 0", "--lr -1.0"], "OUT"),  # both named
    (["compare", "--model", "{t}/tiny-bert", "--data", "{t}/topics.csv", "--target-modules", "nope",
      "--threads", "1", "-o", "OUT"], ["--target-modules", "'nope'"], "OUT"),
    # train
    (["train", "--strategy", "qlora", "-o", "OUT"], ["'qlora'"], "OUT"),
    (["train", "-r", "0", "-o", "OUT"], ["--rank must be >= 1, got 0"], "OUT"),
    (["train", "--checkpoint-every", "0", "-o", "OUT"], ["--checkpoint-every", "0"], "OUT"),
    (["train", "--quantize", "int4", "-o", "OUT"], ["--quantize 'int4'", "nf4, fp4, int8, torchao-int8"], "OUT"),
    (["compare", "--quantize", "q4", "-r", "0", "-o", "OUT"], ["--quantize 'q4'", "--rank [0]"], "OUT"),
    (["train", "--data", "/nonexistent.csv", "--model", "/nonexistent", "-o", "OUT"],
     ["'/nonexistent.csv'", "'/nonexistent'"], "OUT"),
    # theory
    (["theory", "bound", "--q", "0", "--n", "-5", "-o", "OUT"], ["--q", "0", "--n", "-5"], "OUT"),
    (["theory", "bound", "--shapes", "12y", "-o", "OUT"], ["'12y'"], "OUT"),
    (["theory", "bound", "--model", "/nonexistent/model", "-o", "OUT"], ["'/nonexistent/model'"], "OUT"),
    (["theory", "simulate", "--d-in", "0", "--no-plots", "-o", "OUT"], ["--d-in", "0"], "OUT"),
    (["theory", "simulate", "--spectra", "foo", "--no-plots", "-o", "OUT"], ["'foo'"], "OUT"),
    # similarity
    (["similarity", "{t}/good", "-o", "OUT"], ["at least 2"], "OUT"),
    (["similarity", "/nonexistent", "{t}/good", "-o", "OUT"], ["'/nonexistent'"], "OUT"),
    (["similarity", "{t}/many", "{t}/good", "-o", "OUT"], ["holds 3 adapters", "run0", "run1", "run2"], "OUT"),
    (["similarity", "{t}/tampered", "{t}/good", "-o", "OUT"], ["r=8", "r=4"], "OUT"),
    (["similarity", "{t}/good", "{t}/good", "--max-steps", "3", "-o", "OUT"], ["--max-steps"], "OUT"),
    # export
    (["export", "/nonexistent", "-o", "OUT"], ["'/nonexistent'"], "OUT"),
    (["export", "{t}/tampered", "-o", "OUT"], ["r=8", "r=4"], "OUT"),
    (["export", "{t}/good"], ["--output-dir"], None),
    # merge
    (["merge", "{t}/good", "/nonexistent/ad", "--weights", "1", "-o", "OUT"],
     ["'/nonexistent/ad' is not an adapter folder", "--weights has 1 value [1.0] for 2 adapters"], "OUT"),
    (["merge", "{t}/good", "{t}/tampered", "-o", "OUT"], ["r=8", "r=4"], "OUT"),
    (["merge", "{t}/good", "{t}/many/run1/adapter", "-o", "OUT"], ["has another frozen A"], "OUT"),
    # run
    (["run", "nosuchrecipe", "-o", "OUT"], ["'nosuchrecipe'"], "OUT"),
    (["run", "nosuchrecipe", "--seeds", "-1", "-o", "OUT"], ["'nosuchrecipe'", "--seeds", "-1"], "OUT"),
    (["similarity", "{t}/many", "{t}/empty.csv", "-o", "OUT"], ["holds 3 adapters", "empty.csv"], "OUT"),
    (["run", "glue-roberta-large", "--seeds", "-1", "-o", "OUT"], ["--seeds", "-1"], "OUT"),
    (["run", "glue-roberta-large", "--model", "/nonexistent/m", "--data", "{t}", "-o", "OUT"],
     ["'/nonexistent/m'", "hf download"], "OUT"),
    (["run", "glue-roberta-large", "--set", "novalue", "-o", "OUT"], ["'novalue'"], "OUT"),
    (["run", "glue-roberta-large", "--quantize", "int4", "-o", "OUT"], ["--quantize 'int4'"], "OUT"),
    (["run", "glue-roberta-large", "--set", "quantize=int4", "-o", "OUT"], ["recipe field 'quantize': 'int4'"], "OUT"),
    # results
    (["results", "/nonexistent", "-o", "OUT"], ["/nonexistent"], "OUT"),
    (["results", "{t}/badresults", "-o", "OUT"], ["result.json", "not valid JSON"], "OUT"),
    # eval (every check before anything loads)
    (["eval", "--benchmarks", "arc_easy,nope", "-o", "OUT"], ["'nope'", "arc_easy", "mmlu"], "OUT"),
    (["eval", "--benchmarks", "sciq", "--shots", "3", "-o", "OUT"], ["--shots 3", "mmlu"], "OUT"),
    (["eval", "--benchmarks", "mmlu", "--shots", "6", "--limit", "0", "-o", "OUT"], ["--shots 6", "0..5", "--limit"],
     "OUT"),
    (["eval", "--model", "/nonexistent", "--adapter", "/nonexistent/ad", "-o", "OUT"],
     ["'/nonexistent'", "--adapter '/nonexistent/ad'"], "OUT"),
    (["eval", "--adapter", "{t}/good", "--adapter", "{t}/good", "--batch-size", "0", "-o", "OUT"],
     ["--adapter", "repeats", "--batch-size"], "OUT"),
    (["eval", "--seed", "1", "--threads", "0", "-o", "OUT"], ["--seed only applies with --limit", "--threads"], "OUT"),
    (["eval", "--base", "--benchmarks", "piqa,piqa", "-o", "OUT"], ["--base only applies with --adapter", "repeats"],
     "OUT"),
    (["eval", "--mixed-precision", "fp16", "-o", "OUT"], ["--mixed-precision fp16", "CPU"], "OUT"),
    # bench
    (["bench", "--only", "nope", "-o", "OUT"], ["'nope'"], "OUT"),
    (["bench", "--threads", "0", "-o", "OUT"], ["--threads", "0"], "OUT"),
]


def test_enough_cases_cover_every_command():
    """Every command the real parser registers has a case (probe's are in test_probe.py), and for
    each command at least one case gets past argparse, so the command's own checks are tested and
    not only argparse's type/choices errors."""
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    registered = set(sub.choices)
    assert registered, "no commands registered"
    covered = {argv[0] for argv, _, _ in CASES}
    assert covered == registered - {"probe"}
    past_argparse = set()
    for argv, _, _ in CASES:
        try:
            build_parser(argv).parse_args([a.replace("{t}", "/t") for a in argv])
        except SystemExit:
            continue
        past_argparse.add(argv[0])
    assert past_argparse == covered


@pytest.mark.parametrize("argv,expect,out", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_input_is_one_line_exit_2(files, tmp_path, capsys, monkeypatch, argv, expect, out):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ASYMLORA_DEBUG", raising=False)
    out_path = tmp_path / "OUT"
    argv = [str(out_path) if a == "OUT" else a.replace("{t}", str(files)) for a in argv]
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"asymlora {argv[0]}") and ": error: " in err, err
    assert "Traceback" not in captured.err + captured.out
    for text in expect:
        assert text.replace("{t}", str(files)) in err, (text, err)
    if out is not None:
        assert not out_path.exists(), f"{out_path} left behind"


# --------------------------------------------------------------------------- the error path itself
def _fake_command(monkeypatch, fn):
    """Make `asymlora bench` run ``fn(args)`` (bench has an --output-dir and cheap imports)."""
    import asymlora.cli.bench as bench

    monkeypatch.setattr(bench, "run", fn)


def test_output_folder_created_by_the_failing_call_is_removed(tmp_path, monkeypatch, capsys):
    def fails_midway(args):
        os.makedirs(args.output_dir)
        (tmp_path / "new" / "half.json").write_text("{")
        raise UserError("bad thing 'x'")

    _fake_command(monkeypatch, fails_midway)
    assert main(["bench", "-o", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()
    assert capsys.readouterr().err == "asymlora bench: error: bad thing 'x'\n"


def test_existing_output_folder_is_kept(tmp_path, monkeypatch):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")

    def fails(args):
        raise UserError("no")

    _fake_command(monkeypatch, fails)
    assert main(["bench", "-o", str(tmp_path / "old")]) == 2
    assert (tmp_path / "old" / "keep.txt").read_text() == "mine"


def test_internal_value_error_is_not_swallowed(monkeypatch):
    def bug(args):
        raise ValueError("an internal bug")

    _fake_command(monkeypatch, bug)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["bench"])


@pytest.mark.parametrize("how", ["flag-first", "flag-last", "env"])
def test_debug_shows_the_traceback(monkeypatch, how):
    def fails(args):
        raise UserError("bad 'x'")

    _fake_command(monkeypatch, fails)
    monkeypatch.delenv("ASYMLORA_DEBUG", raising=False)
    argv = {"flag-first": ["--debug", "bench"], "flag-last": ["bench", "--debug"], "env": ["bench"]}[how]
    if how == "env":
        monkeypatch.setenv("ASYMLORA_DEBUG", "1")
    with pytest.raises(UserError, match="bad 'x'"):
        main(argv)


def test_multiline_messages_become_one_line(monkeypatch, capsys):
    _fake_command(monkeypatch, lambda args: (_ for _ in ()).throw(UserError("first\nsecond")))
    assert main(["bench"]) == 2
    assert capsys.readouterr().err == "asymlora bench: error: first second\n"


def test_bench_outside_a_source_checkout_says_what_it_needs(tmp_path, monkeypatch, capsys):
    """An installed package has no benchmarks/: one line saying where to run it, exit 2."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--only", "train"]) == 2
    assert capsys.readouterr().err == (
        "asymlora bench: error: the benchmarks are part of a source checkout, not of the installed package: run "
        f"asymlora bench from the repository root (benchmarks/ not found in {tmp_path})\n")


def test_bench_takes_the_benchmark_names_from_the_suite(monkeypatch, capsys):
    from pathlib import Path

    from asymlora.cli.bench import load_suite

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    suite = load_suite(root)
    assert "multi_adapter" in suite.BENCHMARKS  # the sixth, which a second list once missed
    assert main(["bench", "--only", "nope"]) == 2
    assert f"valid: {', '.join(suite.BENCHMARKS)}" in capsys.readouterr().err


# --------------------------------------------------------------------------- one convention
OUTPUT_COMMANDS = [["compare"], ["sft"], ["train"], ["run", "r"], ["theory", "bound"], ["theory", "simulate"],
                   ["similarity"], ["export", "a"], ["merge", "a", "b"], ["bench"], ["results", "d"]]


@pytest.mark.parametrize("prefix", OUTPUT_COMMANDS, ids=[" ".join(p) for p in OUTPUT_COMMANDS])
def test_output_dir_short_long_and_hidden_alias(prefix, capsys):
    for flag in ("-o", "--output-dir"):
        argv = [*prefix, flag, "X"]
        assert build_parser(argv).parse_args(argv).output_dir == "X"
    argv = [*prefix, "--out", "X"]
    assert build_parser(argv).parse_args(argv).output_dir == "X"
    with pytest.raises(SystemExit):
        build_parser([*prefix, "--help"]).parse_args([*prefix, "--help"])
    text = capsys.readouterr().out
    assert "--output-dir" in text and "-o" in text and "--out " not in text and "--out\n" not in text


LISTS = [(["compare"], "--seeds"), (["compare"], "--rank"), (["sft"], "--seeds"), (["run", "r"], "--seeds"),
         (["run", "r"], "--rank"), (["theory", "bound"], "--rank"), (["theory", "bound"], "--n"),
         (["theory", "simulate"], "--rank"), (["merge", "a", "b", "c"], "--weights")]
DESTS = {("compare", "--rank"): "ranks", ("run", "--rank"): "ranks"}  # the sweep's field; one rank elsewhere


@pytest.mark.parametrize("prefix,flag", LISTS, ids=[f"{' '.join(p)} {f}" for p, f in LISTS])
def test_lists_take_commas_or_spaces(prefix, flag):
    dest = DESTS.get((prefix[0], flag), flag.lstrip("-").replace("-", "_"))
    for values in (["1,2,3"], ["1", "2", "3"], ["1,", "2", "3"], ["1, 2", "3"]):
        argv = [*prefix, flag, *values]
        assert getattr(build_parser(argv).parse_args(argv), dest) == [1, 2, 3], values


def test_theory_bound_writes_nothing_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["theory", "bound", "--shapes", "64x64*2", "--rank", "1,2"]) == 0
    assert "ratio/both" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    assert main(["theory", "bound", "--shapes", "64x64*2", "-o", "b"]) == 0
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["bound.csv", "bound.json"]


# --------------------------------------------------------------------------- similarity's folder search
def test_similarity_takes_train_folders_and_says_which_adapter(tmp_path, capsys):
    """`asymlora train` leaves OUT/adapter (final) and OUT/checkpoint/adapter: the final one is used."""
    for i in range(2):
        _adapter(tmp_path / f"train{i}" / "adapter", seed=i)
        _adapter(tmp_path / f"train{i}" / "checkpoint" / "adapter", seed=50 + i)
    out = tmp_path / "sim"
    assert main(["similarity", str(tmp_path / "train0"), str(tmp_path / "train1"), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    for i in range(2):
        adapter = tmp_path / f"train{i}" / "adapter"
        assert f"train{i}: using {adapter} (the final adapter; skipped 1 checkpoint copy)" in text
    assert "2 runs, 1 pair, 4 shared adapted layers" in text
    assert (out / "similarity.csv").is_file()


def test_similarity_run_folder_of_asymlora_run(tmp_path, capsys):
    """`asymlora run` leaves .../seed<k>/adapter and .../seed<k>/checkpoint/adapter."""
    for s in (0, 1):
        _adapter(tmp_path / "glue" / "sst2" / "b-only-r4" / f"seed{s}" / "adapter", seed=s)
        _adapter(tmp_path / "glue" / "sst2" / "b-only-r4" / f"seed{s}" / "checkpoint" / "adapter", seed=9)
    dirs = [str(tmp_path / "glue" / "sst2" / "b-only-r4" / f"seed{s}") for s in (0, 1)]
    assert main(["similarity", *dirs, "-o", str(tmp_path / "sim")]) == 0
    text = capsys.readouterr().out
    for d in dirs:
        assert f"{d}: using {d}/adapter (the final adapter; skipped 1 checkpoint copy)" in text
    # and it compared those: the B cosine in the table is the one of the two final adapters' B,
    # by hand (the checkpoint copies are identical, seed 9, and would give 1)
    from asymlora.formats.native import load_factors

    final = [load_factors(f"{d}/adapter") for d in dirs]
    rows = {r["layer"]: float(r["value"]) for r in csv.DictReader(open(tmp_path / "sim" / "similarity.csv"))
            if r["factor"] == "B" and r["measure"] == "cosine"}
    assert set(rows) == set(final[0]) and len(rows) == 4
    for layer, value in rows.items():
        b0, b1 = (f[layer][1].double().flatten() for f in final)
        assert value == pytest.approx(float(b0 @ b1 / (b0.norm() * b1.norm())), abs=1e-5)


def test_similarity_lists_candidates_and_how_many_more(tmp_path, capsys):
    for i in range(12):
        (tmp_path / "big" / f"r{i:02d}").mkdir(parents=True)
        (tmp_path / "big" / f"r{i:02d}" / CONFIG_NAME).write_text("{}")
    _adapter(tmp_path / "good")
    assert main(["similarity", str(tmp_path / "big"), str(tmp_path / "good")]) == 2
    err = capsys.readouterr().err
    assert "holds 12 adapters" in err and "r09" in err and "r10" not in err and "and 2 more" in err


def test_similarity_searches_two_levels_only(tmp_path, capsys):
    _adapter(tmp_path / "deep" / "a" / "b" / "c")  # three levels down: not searched
    _adapter(tmp_path / "good")
    assert main(["similarity", str(tmp_path / "deep"), str(tmp_path / "good")]) == 2
    assert "no saved adapter" in capsys.readouterr().err
    _adapter(tmp_path / "two" / "a" / "b")  # two levels down: found
    assert main(["similarity", str(tmp_path / "two"), str(tmp_path / "good"), "-o", str(tmp_path / "s")]) == 0


def test_no_singular_plural_mistakes():
    from asymlora.cli.options import plural

    assert plural(1, "thread") == "1 thread" and plural(2, "pair") == "2 pairs"
    assert plural(1, "copy", "copies") == "1 copy" and plural(0, "copy", "copies") == "0 copies"


def test_python_dash_m_asymlora_is_the_command():
    """`python -m asymlora` is the `asymlora` command (here: its version, exit status 0)."""
    import subprocess
    import sys

    from asymlora.version import __version__

    done = subprocess.run([sys.executable, "-m", "asymlora", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"asymlora {__version__}"
