"""Resuming never unpickles code: a booby-trapped state file in a checkpoint is refused and its
trap never fires (issue 11)."""
from __future__ import annotations

import os

import pytest
import torch

from asymlora.errors import UserError
from asymlora.train import TrainArgs, fit
from test_train import collate, token_data, trainable_state, wrapped_bert

STATE_FILES = ["rng_state_0.pt", "optimizer.pt", "scheduler.pt"]


class Trap:
    """Unpickling this calls open(marker, "w"): the marker file is the evidence it fired."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: str, marker: str) -> None:
    torch.save({"state": Trap(marker)}, path)


def test_the_trap_is_armed(tmp_path):
    """The planted file really runs code under a plain unpickler (so the tests below can fail)."""
    marker = tmp_path / "fired"
    plant(str(tmp_path / "x.pt"), str(marker))
    assert not marker.exists()
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def _checkpointed_run(out: str) -> None:
    fit(wrapped_bert(), token_data(), collate,
        TrainArgs(output_dir=out, max_steps=3, batch_size=8, checkpoint_every=2, progress=False, seed=1))


@pytest.mark.parametrize("name", STATE_FILES)
def test_resume_refuses_a_pickle_with_code_and_changes_nothing(tmp_path, name):
    out = str(tmp_path / "run")
    _checkpointed_run(out)
    marker = tmp_path / "fired"
    plant(os.path.join(out, "checkpoint", name), str(marker))
    model = wrapped_bert()
    before = trainable_state(model)
    with pytest.raises(UserError, match=rf"refusing to resume from .*{name}"):
        fit(model, token_data(), collate,
            TrainArgs(output_dir=out, max_steps=3, batch_size=8, checkpoint_every=2, progress=False, seed=1,
                      resume=True))
    assert not marker.exists(), "the trap fired: the file was unpickled"
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no weight was copied in


def test_a_clean_checkpoint_still_resumes_with_weights_only(tmp_path, monkeypatch):
    """Every file the trainer writes loads under weights_only=True (no fallback exists)."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    out = str(tmp_path / "run")
    _checkpointed_run(out)
    monkeypatch.setattr(torch, "load", spy)
    res = fit(wrapped_bert(), token_data(), collate,
              TrainArgs(output_dir=out, max_steps=3, batch_size=8, checkpoint_every=2, progress=False, seed=1,
                        resume=True))
    assert res.resumed_from_step == 3 and res.steps == 3  # the last checkpoint, at the end
    assert len(calls) == 3 and all(w is True for w in calls)  # rng state, optimizer, scheduler


@pytest.mark.slow
@pytest.mark.needs_assets("minilm", "fortunes")
def test_cli_train_resume_refuses_trap(tmp_path, capsys):
    from asymlora.cli import main

    out = tmp_path / "run"
    assert main(["train", "--quick", "--no-progress", "--threads", "1", "-o", str(out)]) == 0
    capsys.readouterr()
    marker = tmp_path / "fired"
    plant(str(out / "checkpoint" / "rng_state_0.pt"), str(marker))
    assert main(["train", "--quick", "--no-progress", "--threads", "1", "-o", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("asymlora train: error: refusing to resume from ")
    assert "rng_state_0.pt" in err and "Traceback" not in err
    assert not marker.exists()
