"""Resuming never unpickles code: a booby-trapped state file in a checkpoint is refused and its
trap never fires (issue 11)."""
from __future__ import annotations

import os

import pytest
import torch

from asymlora.errors import UserError
from asymlora.training.loop import TrainArgs, fit
from conftest import require
from test_train import collate, token_data, trainable_state, wrapped_bert

# scaler.pt: written only with fp16 loss scaling (CUDA), but read whenever a checkpoint holds one
STATE_FILES = ["rng_state_0.pt", "optimizer.pt", "scheduler.pt", "scaler.pt"]


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


def _resume_refused(out: str, message: str) -> None:
    model = wrapped_bert()
    before = trainable_state(model)
    with pytest.raises(UserError, match=message) as err:
        fit(model, token_data(), collate,
            TrainArgs(output_dir=out, max_steps=3, batch_size=8, checkpoint_every=2, progress=False, seed=1,
                      resume=True))
    assert "\n" not in str(err.value)
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_clean_scaler_state_in_a_run_without_loss_scaling_is_refused(tmp_path):
    """A checkpoint with fp16 loss scaling does not continue exactly without it: refused, not ignored."""
    out = str(tmp_path / "run")
    _checkpointed_run(out)
    torch.save(torch.amp.GradScaler("cpu").state_dict(), os.path.join(out, "checkpoint", "scaler.pt"))
    _resume_refused(out, r"it has scaler.pt \(fp16 loss scaling\) but this run \(mixed_precision='no'\) has none")


def _set(t, key, value):
    t[key] = value


def _b(t) -> str:
    return sorted(k for k in t if "lora_B" in k)[0]


@pytest.mark.parametrize("tamper,message", [
    (lambda t: t[_b(t)].view(-1).__setitem__(0, float("nan")), r"tensor '.*lora_B.*' holds non-finite values"),
    (lambda t: _set(t, "bert.embeddings.word_embeddings.weight", torch.zeros(64, 32)),
     r"tensor 'bert.embeddings.word_embeddings.weight' is not a trainable parameter of the model"),
    (lambda t: t.pop(_b(t)), r"tensor '.*lora_B.*' is missing"),
    (lambda t: _set(t, _b(t), t[_b(t)][:1].contiguous()),
     r"tensor '.*lora_B.*' is torch.float32 of shape \(1, 4\), expected a floating-point tensor of shape \(32, 4\)"),
], ids=["nan", "extra-base-weight", "missing", "wrong-shape"])
def test_resume_refuses_tampered_trainable_weights(tmp_path, tamper, message):
    from safetensors.torch import load_file, save_file

    out = str(tmp_path / "run")
    _checkpointed_run(out)
    path = os.path.join(out, "checkpoint", "trainable.safetensors")
    tensors = load_file(path)
    tamper(tensors)
    save_file(tensors, path)
    _resume_refused(out, rf"refusing to resume from .*trainable.safetensors: {message}")


def test_resume_refuses_trainable_weights_cut_short(tmp_path):
    out = str(tmp_path / "run")
    _checkpointed_run(out)
    path = os.path.join(out, "checkpoint", "trainable.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    _resume_refused(out, r"refusing to resume from .*trainable.safetensors: not a readable safetensors file")


@pytest.mark.slow
@pytest.mark.needs_assets("minilm", "fortunes")
def test_cli_train_resume_refuses_trap(tmp_path, capsys):
    from asymlora.cli.main import main

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


# ----------------------------------------------------------------------------- sharded checkpoints


@pytest.mark.slow  # three processes (torchrun and two ranks); DeepSpeed JIT-builds an op on first use
@pytest.mark.parametrize("sharding", ["fsdp2", "zero2", "zero3"])
def test_sharded_resume_refuses_pickle_traps_on_every_process(tmp_path, sharding):
    """FSDP2 / ZeRO checkpoints (the gathered optimizer state, each rank's RNG file): a trap in
    any of them never fires, and every process refuses the resume in one line (a refusal on
    rank 1 alone must not leave rank 0 waiting in a collective)."""
    import json
    import sys

    from test_sharding import TIMEOUT_S, _env
    from test_train import _run_within
    from trap_worker import FILES

    if sharding != "fsdp2":
        require("deepspeed")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trap_worker.py")
    _run_within([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
                 str(tmp_path), sharding], _env(), f"the 2-process {sharding} trap run", TIMEOUT_S[sharding])
    ranks = [json.loads((tmp_path / f"traps_{r}.json").read_text()) for r in (0, 1)]
    for name in FILES:
        assert not (tmp_path / f"fired-{name}").exists(), f"the trap in {name} fired: it was unpickled"
        reader = int(name[-4]) if name.startswith("rng_state_") else None  # None: every rank reads it
        for rank, got in enumerate(ranks):
            message = got[name]["refused"]
            assert message is not None, f"rank {rank} resumed from a checkpoint with a trapped {name}"
            assert "\n" not in message and message.startswith("refusing to resume from ")
            if reader is None or reader == rank:
                assert name in message and "not a plain state file" in message
            else:
                assert f"process {reader} refused its state files" in message
            assert got[name]["unchanged"]
    assert [got["clean_resume_from"] for got in ranks] == [4, 4]  # the restored checkpoint resumes
