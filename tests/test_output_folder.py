"""A second run never destroys the first (``asymlora.sweep.outdir``): a sweep into a folder that
holds an earlier one is refused without --resume or --overwrite; with --overwrite the earlier
results stay until the new ones are complete; nothing the user put in the folder is removed."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from asymlora.cli.main import main
from asymlora.sweep.outdir import PARTIAL, SweepFolder, check_output_dir

needs_real = pytest.mark.needs_assets("minilm", "fortunes")

EARLIER = {"complete": True, "settings": {"seeds": [7]}, "runs": [{"strategy": "lora r=4", "seed": 7}]}


def earlier_sweep_with_user_files(folder):
    """A folder holding an earlier complete sweep and files of the user's own (``runs/`` too)."""
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(EARLIER))
    (folder / "runs").mkdir()
    (folder / "runs" / "mine.txt").write_text("my notes")
    (folder / "notes.md").write_text("mine too")
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["compare", "sft"])
def test_a_sweep_into_a_folder_with_an_earlier_one_is_refused_before_any_work(tmp_path, capsys, command):
    out = tmp_path / "d"
    before = earlier_sweep_with_user_files(out)
    assert main([command, "--quick", "--no-progress", "--seeds", "3", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"asymlora {command}: error: {out} holds an earlier sweep ({out}/results.json)")
    assert "--resume" in err[0] and "--overwrite" in err[0]
    assert files_of(out) == before  # nothing changed, nothing removed


def test_resume_and_overwrite_together_are_refused(tmp_path):
    from asymlora.errors import UserError

    with pytest.raises(UserError, match="--resume and --overwrite"):
        check_output_dir(str(tmp_path), resume=True, overwrite=True)


def test_a_fresh_sweep_keeps_its_checkpoints_in_a_folder_of_its_own(tmp_path):
    """A user's own runs/ is neither used nor removed; the sweep's subfolder is, and runs/ only
    when the sweep made it."""
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    folder = SweepFolder(str(tmp_path), None)
    assert os.path.dirname(folder.checkpoints) == str(tmp_path / "runs") and not folder.made_runs
    os.makedirs(os.path.join(folder.checkpoints, "lora-seed0-lr0.01"))
    folder.finish()
    assert not os.path.exists(folder.checkpoints) and mine.is_dir()
    empty = tmp_path / "e"
    empty.mkdir()
    folder = SweepFolder(str(empty), None)
    assert folder.made_runs and folder.partial_path == str(empty / "results.json")
    os.makedirs(folder.checkpoints)
    folder.finish()
    assert list(empty.iterdir()) == []
    # resumed: the same folder again, from what the partial results kept
    again = SweepFolder(str(empty), {"sweep_folder": folder.state()["sweep_folder"]})
    assert again.checkpoints == folder.checkpoints and again.made_runs


@pytest.mark.slow
@needs_real
def test_overwrite_replaces_the_earlier_sweep_only_once_complete(tmp_path, monkeypatch, capsys):
    """--overwrite interrupted part-way leaves the earlier results.json as it was (the new partial
    results beside it); --resume completes the new sweep, which then replaces it. The user's own
    files, runs/ included, are there throughout."""
    from asymlora.compare import protocol

    out = tmp_path / "d"
    before = earlier_sweep_with_user_files(out)
    flags = ["compare", "--quick", "--no-progress", "--no-plots", "--strategies", "lora", "--seeds", "0",
             "--lrs", "0.003,0.03", "--max-steps", "40", "--eval-every", "5", "--workers", "1", "-o", str(out)]
    real, calls = protocol.Schedule.book, []

    def book_then_stop(self, job, result, tag):  # stop the sweep part-way, as Ctrl-C does
        calls.append(job)
        if len(calls) == 3:  # the two pilots' first segments are booked and saved
            raise KeyboardInterrupt
        return real(self, job, result, tag)

    monkeypatch.setattr(protocol.Schedule, "book", book_then_stop)
    assert main([*flags, "--overwrite"]) == 128 + 2
    assert "the finished runs are kept in " + str(out / PARTIAL) in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == EARLIER
    assert json.loads((out / PARTIAL).read_text())["complete"] is False
    assert {k: v for k, v in files_of(out).items() if k in before} == before
    monkeypatch.setattr(protocol.Schedule, "book", real)
    assert main([*flags, "--resume"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True and res["settings"]["seeds"] == [0]
    assert not (out / PARTIAL).exists()
    kept = files_of(out)
    assert kept[Path("runs", "mine.txt")] == b"my notes" and kept[Path("notes.md")] == b"mine too"
    assert sorted(os.listdir(out / "runs")) == ["mine.txt"]  # the sweep's checkpoints are gone, nothing else


@pytest.mark.parametrize("earlier", ["metrics.json", "adapter", "checkpoint"])
def test_train_into_a_folder_with_an_earlier_run_is_refused_before_any_work(tmp_path, capsys, earlier):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    if earlier == "metrics.json":
        (out / earlier).write_text("{}")
    else:
        (out / earlier).mkdir()
        (out / earlier / "kept.txt").write_text("kept")
    before = files_of(out)
    assert main(["train", "--quick", "--no-progress", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"asymlora train: error: {out} holds an earlier run ({out}/{earlier}); add --resume to go on "
                   "with it, --overwrite to replace it once this run completes, or choose another --output-dir"]
    assert files_of(out) == before


# ------------------------------------------------------------------ every other command with -o
# command line (DIR for the folder), a file its earlier run left there, and what the refusal calls it
EARLIER_OUTPUT = {
    "eval": (["eval", "-o", "DIR"], "results.json", "evaluation"),
    "probe": (["probe", "-o", "DIR"], "probe.json", "probe"),
    "similarity": (["similarity", "RUNS", "RUNS", "-o", "DIR"], "similarity.csv", "similarity report"),
    "similarity --demo": (["similarity", "--demo", "-o", "DIR"], "verdict.json", "demo"),
    "theory simulate": (["theory", "simulate", "--d-in", "8", "--d-out", "8", "--rank", "2", "--mc-samples", "20",
                         "--no-plots", "-o", "DIR"], "simulation.csv", "simulation"),
    "theory bound": (["theory", "bound", "--shapes", "64x64*2", "-o", "DIR"], "bound.json", "bound table"),
    "results": (["results", "RUNS", "-o", "DIR"], "results.md", "table"),
    "export": (["export", "ADAPTER", "-o", "DIR"], "adapter_config.json", "adapter"),
    "bench": (["bench", "--only", "checkpoint", "--quick", "-o", "DIR"], "results.json", "benchmark results"),
}


def _tiny_adapter(folder: Path) -> Path:
    """A b-only adapter saved from a two-layer model: what export converts."""
    import torch
    from torch import nn

    import asymlora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    asymlora.wrap(model, asymlora.AsymLoraConfig.preset("b-only", r=2, alpha=4, target_modules=["0", "2"]))
    asymlora.save_adapter(model, folder)
    return folder


def _argv(template: list[str], tmp_path: Path, out: Path) -> list[str]:
    runs = tmp_path / "runs-in"
    runs.mkdir(exist_ok=True)
    adapter = tmp_path / "adapter-in"
    if "ADAPTER" in template and not adapter.exists():
        _tiny_adapter(adapter)
    return [{"DIR": str(out), "RUNS": str(runs), "ADAPTER": str(adapter)}.get(a, a) for a in template]


@pytest.mark.parametrize("command", list(EARLIER_OUTPUT))
def test_every_command_with_an_output_folder_refuses_an_earlier_ones_output(tmp_path, capsys, command):
    """One line naming the earlier file and --overwrite, exit 2, before any work; nothing in the
    folder changed."""
    template, marker, what = EARLIER_OUTPUT[command]
    out = tmp_path / "d"
    out.mkdir()
    (out / marker).write_text("the earlier run's")
    (out / "notes.md").write_text("mine")
    before = files_of(out)
    assert main(_argv(template, tmp_path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = " ".join(template[:2]) if template[0] == "theory" else template[0]
    assert len(err) == 1 and err[0].startswith(f"asymlora {name}: error: "), err
    assert (f"{out} holds an earlier {what} ({out / marker}); add --overwrite to replace it once this {what} "
            "completes, or choose another --output-dir") in err[0]
    assert "--resume" not in err[0]  # none of these commands can go on with an earlier run
    assert files_of(out) == before


@pytest.mark.parametrize("command", ["theory simulate", "theory bound", "export"])
def test_overwrite_replaces_the_earlier_output_and_keeps_the_users_files(tmp_path, capsys, command):
    template, marker, _ = EARLIER_OUTPUT[command]
    out = tmp_path / "d"
    assert main(_argv(template, tmp_path, out)) == 0
    first = files_of(out)
    (out / marker).write_text("edited since")
    (out / "notes.md").write_text("mine")
    assert main(_argv(template, tmp_path, out)) == 2  # refused: the earlier output is there
    assert main([*_argv(template, tmp_path, out), "--overwrite"]) == 0
    now = files_of(out)
    assert now[Path(marker)] == first[Path(marker)]  # the same deterministic output, written again
    assert now[Path("notes.md")] == b"mine"


def test_publishing_a_sweeps_adapters_replaces_only_same_named_ones(tmp_path):
    """What a sweep staged joins the output folder entry by entry: an earlier sweep's adapter of
    the same name is replaced, every other entry stays; a link to a folder is followed; a file
    of the user's where the folder should go is left alone (one-line refusal naming both)."""
    from asymlora.errors import UserError

    out = tmp_path / "d"
    (out / "adapters" / "lora-seed0").mkdir(parents=True)
    (out / "adapters" / "lora-seed0" / "w").write_text("earlier")
    (out / "adapters" / "lora-seed9").mkdir()
    (out / "adapters" / "lora-seed9" / "w").write_text("earlier, not run again")
    (out / "adapters" / "mine.txt").write_text("mine")
    folder = SweepFolder(str(out), None)
    for name in ("lora-seed0", "lora-seed1"):
        os.makedirs(os.path.join(folder.staged, "adapters", name))
        Path(folder.staged, "adapters", name, "w").write_text("new")
    staged = os.path.abspath(os.path.join(folder.staged, "adapters", "lora-seed0"))
    results = folder.publish({"runs": [{"adapter_dir": staged}], "bench": {staged: 1}, "other": "text"})
    assert results == {"runs": [{"adapter_dir": str(out / "adapters" / "lora-seed0")}],
                       "bench": {str(out / "adapters" / "lora-seed0"): 1}, "other": "text"}
    assert {str(k): v for k, v in files_of(out / "adapters").items()} == {
        "lora-seed0/w": b"new", "lora-seed1/w": b"new", "lora-seed9/w": b"earlier, not run again",
        "mine.txt": b"mine"}
    assert not os.path.exists(folder.staged)
    # a link to a folder: the adapters go into the folder it names
    linked, target = tmp_path / "l", tmp_path / "elsewhere"
    target.mkdir()
    linked.mkdir()
    (linked / "adapters").symlink_to(target)
    folder = SweepFolder(str(linked), None)
    os.makedirs(os.path.join(folder.staged, "adapters", "lora-seed0"))
    folder.publish({})
    assert (target / "lora-seed0").is_dir() and (linked / "adapters").is_symlink()
    # a file of the user's named adapters
    blocked = tmp_path / "b"
    blocked.mkdir()
    (blocked / "adapters").write_text("the user's file")
    folder = SweepFolder(str(blocked), None)
    os.makedirs(os.path.join(folder.staged, "adapters", "lora-seed0"))
    with pytest.raises(UserError, match="is not a folder"):
        folder.publish({})
    assert (blocked / "adapters").read_text() == "the user's file"
    assert os.path.isdir(os.path.join(folder.staged, "adapters", "lora-seed0"))
