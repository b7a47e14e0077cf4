"""One vocabulary on the command line: every subcommand of the real parser (nested ones like
``theory bound`` included) spells each concept the one way docs/cli.md names, no command keeps
an old spelling, every list flag takes commas and spaces, and docs/cli.md is the generator's
output (so it lists every flag of every command). The scripts under examples/ and benchmarks/
speak the same vocabulary: their parsers (``build_parser()``, built without running them) are
held to the same spellings, with no old name kept as an alias."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from asymlora.cli.bench import load_suite
from asymlora.cli.main import COMMANDS, build_parser
from asymlora.cli.options import _Flatten
from asymlora.cli.reference import render, subcommands

ROOT = Path(__file__).resolve().parents[1]

# concept -> the one spelling (all option strings of the flag, in order), and the commands that have it
VOCABULARY: dict[str, tuple[list[str], set[str]]] = {
    "rank": (["--rank", "-r"], {"compare", "sft", "train", "run", "probe", "similarity", "theory simulate",
                                "theory bound", "merge"}),
    "steps": (["--max-steps"], {"compare", "sft", "train", "run", "similarity"}),
    "training examples": (["--max-train"], {"compare", "sft", "run"}),
    "validation examples": (["--max-val"], {"compare", "sft"}),
    "test examples": (["--max-test"], {"compare", "sft", "run"}),
    "examples of one pool": (["--max-examples"], {"probe"}),
    "plots": (["--no-plots"], {"compare", "probe", "theory simulate"}),
    "precision": (["--mixed-precision"], {"compare", "sft", "train", "run", "eval"}),
    "threads": (["--threads"], {"compare", "sft", "train", "eval", "similarity", "bench"}),
    "adapted modules": (["--target-modules"], {"compare", "sft", "train", "probe", "theory bound"}),
    "output folder": (["--output-dir", "-o"], {"compare", "sft", "train", "run", "results", "eval", "probe",
                                               "theory simulate", "theory bound", "similarity", "merge", "export",
                                               "bench"}),
    "earlier output": (["--overwrite"], {"compare", "sft", "train", "run", "results", "eval", "probe",
                                         "theory simulate", "theory bound", "similarity", "export", "bench"}),
    "lm-eval benchmarks": (["--benchmarks"], {"eval", "sft"}),
    "recipe tasks": (["--tasks"], {"run"}),
}
# spellings no command may use (an old name, or a second name for a concept above)
FORBIDDEN = ["--ranks", "--r", "--lora-rank", "--adapter-rank", "--no-plot", "--bf16", "--fp16", "--targets", "--steps",
             "--num-steps", "--max-train-samples", "--max-eval-samples", "--max-eval", "--examples", "--n-examples",
             "--out-dir", "--outdir", "--precision", "--num-threads", "--modules", "--plot", "--seed-list",
             "--output", "--batch", "--test-limit", "--force"]
PRECISION_CHOICES = ["auto", "no", "fp16", "bf16"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    """'compare', 'theory bound', ...: every subcommand's parser (the ones with flags of their own)."""
    found = {line.removeprefix("asymlora "): parser for line, _, parser in subcommands(build_parser())}
    assert set(COMMANDS) <= set(found) and {"theory simulate", "theory bound"} <= set(found)
    return found


COMMAND_PARSERS = _commands()


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in _options(parser) if a.help != argparse.SUPPRESS]


def _find(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in _options(parser) if flag in a.option_strings), None)


@pytest.mark.parametrize("concept", list(VOCABULARY))
def test_each_concept_has_one_spelling_in_every_command(concept):
    spelling, commands = VOCABULARY[concept]
    for name, parser in COMMAND_PARSERS.items():
        action = _find(parser, spelling[0])
        if name in commands:
            assert action is not None, f"{name} lacks {spelling[0]}"
            assert action.option_strings == spelling, (name, action.option_strings)
        else:
            assert action is None, f"{name} has {spelling[0]}; add it to the vocabulary table if that is meant"


@pytest.mark.parametrize("name", list(COMMAND_PARSERS))
def test_no_command_uses_a_forbidden_spelling(name):
    flags = {f for a in _options(COMMAND_PARSERS[name]) for f in a.option_strings}
    assert not flags & set(FORBIDDEN), sorted(flags & set(FORBIDDEN))
    # -r only ever means the rank, and a rank flag always has -r
    for action in _options(COMMAND_PARSERS[name]):
        if "-r" in action.option_strings or "--rank" in action.option_strings:
            assert action.option_strings == ["--rank", "-r"], (name, action.option_strings)


@pytest.mark.parametrize("name", [n for n in COMMAND_PARSERS if _find(COMMAND_PARSERS[n], "--mixed-precision")])
def test_precision_offers_the_same_modes_everywhere(name):
    assert list(_find(COMMAND_PARSERS[name], "--mixed-precision").choices) == PRECISION_CHOICES


@pytest.mark.parametrize("name", [n for n in COMMAND_PARSERS if _find(COMMAND_PARSERS[n], "--tasks")
                                  or _find(COMMAND_PARSERS[n], "--benchmarks")])
def test_tasks_are_fine_tuning_problems_and_benchmarks_are_lm_evals(name):
    parser = COMMAND_PARSERS[name]
    if (tasks := _find(parser, "--tasks")) is not None:
        assert "benchmark" not in tasks.help and "task" in tasks.help
    if (bench := _find(parser, "--benchmarks")) is not None:
        assert bench.dest == "benchmarks" and "benchmark" in bench.help
        assert "mmlu" in bench.help  # lm-eval's names


@pytest.mark.parametrize("name", list(COMMAND_PARSERS))
def test_the_output_flag_names_a_folder(name):
    action = _find(COMMAND_PARSERS[name], "--output-dir")
    if action is not None:
        assert action.dest == "output_dir" and action.metavar == "DIR"
        assert "folder" in action.help, action.help


def _lists(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in _options(parser) if a.nargs in ("+", "*")]


def _sample(action: argparse.Action) -> tuple[str, list]:
    """Two values of the option's kind, as one text: ("1,2", [1, 2]) or ("a,b", ["a", "b"])."""
    try:
        return "1,2", action.type("1,2")
    except argparse.ArgumentTypeError:
        return "a,b", action.type("a,b")


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    return ["x" for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction) and a.nargs != "*"]


LIST_FLAGS = [(name, a.option_strings[0]) for name, p in COMMAND_PARSERS.items() for a in _lists(p)]


def test_there_are_list_flags_to_check():
    assert {"--rank", "--seeds", "--strategies", "--lrs", "--benchmarks", "--tasks", "--labels", "--only",
            "--weights", "--n", "--spectra", "--target-modules", "--data"} <= {f for _, f in LIST_FLAGS}


@pytest.mark.parametrize("name,flag", LIST_FLAGS, ids=[f"{n} {f}" for n, f in LIST_FLAGS])
def test_every_list_flag_takes_commas_or_spaces(name, flag):
    parser = COMMAND_PARSERS[name]
    action = _find(parser, flag)
    assert isinstance(action, _Flatten), f"{name} {flag}: use asymlora.cli.options.add_list"
    text, want = _sample(action)
    assert len(want) == 2
    prefix = name.split() + _positionals(parser)
    for values in ([text], text.split(","), [text.split(",")[0] + ",", text.split(",")[1]]):
        argv = [*prefix, flag, *values]
        got = getattr(build_parser(argv).parse_args(argv), action.dest)
        assert got == want, (argv, got)


@pytest.mark.parametrize("name", list(COMMAND_PARSERS))
def test_every_flag_is_explained(name):
    for action in _visible(COMMAND_PARSERS[name]):
        assert action.help, f"{name} {action.option_strings[0]} has no help text"


def test_docs_cli_md_is_the_generated_reference():
    """docs/cli.md == `python -m asymlora.cli.reference` (regenerate it after changing a flag)."""
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == render()


def test_the_reference_lists_every_flag_of_every_command():
    text = render()
    for name, parser in COMMAND_PARSERS.items():
        section = text.split(f"## `asymlora {name}`\n", 1)[1].split("\n## ", 1)[0]
        for action in _visible(parser):
            assert f"- `{'/'.join(action.option_strings)}" in section, (name, action.option_strings)


# ----------------------------------------------------------------------------- the scripts

# every script under examples/ and benchmarks/ that runs as a program (it has a __main__ guard)
SCRIPTS = sorted(str(path.relative_to(ROOT)) for folder in ("examples", "benchmarks")
                 for path in (ROOT / folder).glob("*.py") if 'if __name__ == "__main__":' in path.read_text("utf-8"))
# the commands keep --out as a hidden alias of --output-dir (docs/cli.md); the scripts have no aliases
SCRIPT_FORBIDDEN = [*FORBIDDEN, "--out"]


def _load_script(relative: str) -> ModuleType:
    """The script as a module, without running its main: a benchmark through its package (loaded
    by path, as ``asymlora bench`` does), an example from its file. sys.path and sys.modules are
    left as they were (merge_adapters.py puts examples/ on sys.path to import multi_adapter.py)."""
    folder, name = relative.removesuffix(".py").split("/")
    if folder == "benchmarks":
        load_suite(ROOT)
        return importlib.import_module(f"benchmarks.{name}")
    path, modules = list(sys.path), set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location(f"_vocabulary_example_{name}", ROOT / relative)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = path
        for added in set(sys.modules) - modules:
            if added in ("multi_adapter",):  # imported by name from examples/ only
                del sys.modules[added]


def test_the_scripts_are_found():
    assert {"examples/trl_sft.py", "examples/multi_adapter.py", "examples/merge_adapters.py", "benchmarks/run.py",
            "benchmarks/gpu_check.py", "benchmarks/profile_step.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_speaks_the_command_lines_vocabulary(script):
    build = getattr(_load_script(script), "build_parser", None)
    assert callable(build), f"{script}: expose the parser as build_parser() so that this test can check it"
    parser = build()
    assert isinstance(parser, argparse.ArgumentParser)
    flags = {f for a in _options(parser) for f in a.option_strings}
    assert not flags & set(SCRIPT_FORBIDDEN), (script, sorted(flags & set(SCRIPT_FORBIDDEN)))
    for spelling, _ in VOCABULARY.values():
        action = _find(parser, spelling[0])
        assert action is None or action.option_strings == spelling, (script, action.option_strings)
    for action in _options(parser):
        if {"-r", "--rank"} & set(action.option_strings):
            assert action.option_strings == ["--rank", "-r"], (script, action.option_strings)
        if {"-o", "--output-dir"} & set(action.option_strings):
            assert action.option_strings == ["--output-dir", "-o"], (script, action.option_strings)
            assert action.dest == "output_dir" and action.metavar == "DIR", (script, action.dest, action.metavar)
            assert "folder" in action.help, (script, action.help)
