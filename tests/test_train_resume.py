"""``fit``'s resume guards and failure paths.

Each test checks the behaviour against independent truth: a refused resume leaves the model
and every checkpoint byte as they were; an accepted one ends where an uninterrupted run
ends; a gradient scaler's scale follows the arithmetic of its growth/backoff rule.
"""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

import asymlora.training.loop as train_mod
from asymlora.training.loop import NonFiniteLossError, TrainArgs, fit
from test_train import Toy, _crashing_loss, collate, toy_data, trainable_state

KW = dict(lr=1e-2, batch_size=8, progress=False)


def files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def ckpt_step(folder) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["step"]


@pytest.fixture
def finished_run(tmp_path):
    """A finished 4-step run (global batch 8) with its checkpoint in tmp_path/run."""
    out = tmp_path / "run"
    fit(Toy(), toy_data(), collate, TrainArgs(output_dir=str(out), max_steps=4, checkpoint_every=2, **KW))
    return out


# ----------------------------------------------------------------------------- refused resumes


@pytest.mark.parametrize("change,now", [
    ({"batch_size": 4}, "global batch 4, 4 steps"),
    ({"grad_accum": 2}, "global batch 16, 4 steps"),
    ({"max_steps": 6}, "global batch 8, 6 steps"),
])
def test_resume_refuses_another_global_batch_or_length(finished_run, change, now):
    before = files(finished_run)
    model = Toy(seed=1)
    w0 = trainable_state(model)
    args = TrainArgs(output_dir=str(finished_run), resume=True,
                     **{**KW, "max_steps": 4, "checkpoint_every": 2, **change})
    expect = f"written with world_size=1, global batch 8, 4 steps; this run has world_size=1, {now}: they must match"
    with pytest.raises(ValueError, match=re.escape(expect)):
        fit(model, toy_data(), collate, args)
    assert files(finished_run) == before  # nothing rewritten
    assert_same_weights(trainable_state(model), w0)  # nothing loaded


def test_resume_refuses_another_world_size(finished_run):
    """A checkpoint of 2 processes × batch 4 has the same global batch as 1 process × batch 8,
    but per-process RNG files for ranks 0 and 1: resuming it in one process is refused."""
    state_path = finished_run / "checkpoint" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["world_size"] = 2
    state_path.write_text(json.dumps(state))
    before = files(finished_run)
    model = Toy(seed=1)
    w0 = trainable_state(model)
    with pytest.raises(ValueError, match=re.escape("written with world_size=2, global batch 8, 4 steps; this run "
                                                   "has world_size=1, global batch 8, 4 steps")):
        fit(model, toy_data(), collate, TrainArgs(output_dir=str(finished_run), resume=True, max_steps=4, **KW))
    assert files(finished_run) == before
    assert_same_weights(trainable_state(model), w0)


# ----------------------------------------------------------------------------- accepted resumes


@pytest.mark.parametrize("leftover", [None, ".checkpoint.tmp"])
def test_resume_without_a_checkpoint_warns_and_starts_fresh(tmp_path, leftover):
    """``resume=True`` on an empty folder (first start of a job that always passes --resume),
    or one holding only a half-written first checkpoint: a warning, then a run from step 0
    identical to one without ``resume``."""
    data = toy_data()
    ref = Toy()
    r_ref = fit(ref, data, collate, TrainArgs(max_steps=3, **KW))
    out = tmp_path / "run"
    if leftover:
        (out / leftover).mkdir(parents=True)
        (out / leftover / "optimizer.pt").write_bytes(b"half")
    model = Toy()
    with pytest.warns(UserWarning, match=r"resume=True but .*run' holds no complete checkpoint \(checkpoint/"
                                         r"trainer_state.json\): starting from step 0"):
        res = fit(model, data, collate, TrainArgs(output_dir=str(out), resume=True, max_steps=3, **KW))
    assert res.resumed_from_step == 0 and res.steps == 3
    assert [h["loss"] for h in res.history] == [h["loss"] for h in r_ref.history]
    assert_same_weights(trainable_state(model), trainable_state(ref))
    assert ckpt_step(out / "checkpoint") == 3 and not (out / ".checkpoint.tmp").exists()


def test_crash_between_the_two_renames_resumes_from_the_old_checkpoint(tmp_path, monkeypatch):
    """A checkpoint update renames checkpoint -> .checkpoint.old, then .checkpoint.tmp ->
    checkpoint. Killed between the two (at the step-4 update), the run resumes from the step-2
    checkpoint left in .checkpoint.old and ends where an uninterrupted run ends."""
    data = toy_data()
    kw = dict(max_steps=6, checkpoint_every=2, **KW)
    ref = Toy()
    r_ref = fit(ref, data, collate, TrainArgs(output_dir=str(tmp_path / "ref"), **kw))

    out = tmp_path / "run"
    real_replace = os.replace
    commits = {"n": 0}

    def replace(src, dst):
        if str(src).endswith(".checkpoint.tmp") and str(dst).endswith(os.sep + "checkpoint"):
            commits["n"] += 1
            if commits["n"] == 2:
                raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(train_mod.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        fit(Toy(), data, collate, TrainArgs(output_dir=str(out), **kw))
    monkeypatch.undo()
    assert not (out / "checkpoint").exists()
    assert ckpt_step(out / ".checkpoint.old") == 2 and ckpt_step(out / ".checkpoint.tmp") == 4

    model = Toy(seed=1)  # a new process rebuilds the model; weights come from the checkpoint
    res = fit(model, data, collate, TrainArgs(output_dir=str(out), resume=True, **kw))
    assert res.resumed_from_step == 2 and res.steps == 6
    assert_same_weights(trainable_state(model), trainable_state(ref))
    assert [h["loss"] for h in res.history] == [h["loss"] for h in r_ref.history]
    assert ckpt_step(out / "checkpoint") == 6
    assert not (out / ".checkpoint.old").exists() and not (out / ".checkpoint.tmp").exists()


def test_resume_after_early_stop_trains_no_further(tmp_path):
    scores = iter([0.5, 0.6, 0.55, 0.54])  # best at step 4, two worse evals: stops at step 8
    kw = dict(max_steps=20, eval_every=2, early_stopping_patience=2, **KW)
    first_model = Toy()
    first = fit(first_model, toy_data(), collate, TrainArgs(output_dir=str(tmp_path), **kw),
                eval_fn=lambda m: {"score": next(scores)})
    assert first.stopped_early and first.steps == 8
    assert ckpt_step(tmp_path / "checkpoint") == 8
    before = files(tmp_path)

    calls = {"eval": 0, "loss": 0}

    def eval_fn(m):
        calls["eval"] += 1
        return {"score": 1.0}

    def loss_fn(m, batch):
        calls["loss"] += 1
        return m(**batch).loss

    model = Toy(seed=1)
    res = fit(model, toy_data(), collate, TrainArgs(output_dir=str(tmp_path), resume=True, **kw),
              eval_fn=eval_fn, loss_fn=loss_fn)
    assert calls == {"eval": 0, "loss": 0}  # no step, no evaluation
    assert res.stopped_early and res.steps == 8 and res.resumed_from_step == 8
    assert res.best_metric == 0.6 and res.final_metrics["score"] == 0.54
    assert res.history == first.history
    assert_same_weights(trainable_state(model), trainable_state(first_model))
    assert files(tmp_path) == before


# ----------------------------------------------------------------------------- gradient scaler


def _with_cpu_grad_scaler(monkeypatch, **scaler_kw):
    """fp16 needs CUDA; its loss scaling does not. Give fit's (real) Accelerator a real
    GradScaler on CPU so the scaler's checkpointing and skipped-step handling run here."""
    real = train_mod._make_accelerator

    def make(mixed_precision):
        accelerator, mp = real("no")
        accelerator.scaler = torch.amp.GradScaler("cpu", **scaler_kw)
        return accelerator, mp

    monkeypatch.setattr(train_mod, "_make_accelerator", make)


def test_grad_scaler_state_is_checkpointed_and_restored(tmp_path, monkeypatch):
    """Scale 1024, ×2 after every finite step, ×0.5 after a non-finite one (step 3, skipped):
    2048, 4096, 2048, 4096, 8192, 16384. A run killed in step 5 resumes from step 4 with
    scale 4096; a resume that dropped the scaler state would restart at 1024 and end at 4096."""
    _with_cpu_grad_scaler(monkeypatch, init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=1)
    data = toy_data()

    def nan_grad_at(step: int, kill_at: int | None = None):
        n = {"calls": 0}

        def loss_fn(m, batch):
            n["calls"] += 1
            if n["calls"] == kill_at:
                raise KeyboardInterrupt("simulated kill")
            loss = m(**batch).loss
            if n["calls"] == step:  # finite loss, NaN gradient: d sqrt(u)/du = inf at u = 0, times du/dw = 0
                loss = loss + (m.net[0].weight.sum() * 0).sqrt()
            return loss

        return loss_fn

    kw = dict(max_steps=6, checkpoint_every=2, **KW)
    ref = Toy()
    r_ref = fit(ref, data, collate, TrainArgs(output_dir=str(tmp_path / "ref"), **kw), loss_fn=nan_grad_at(3))
    assert math.isfinite(r_ref.history[2]["loss"]) and not math.isfinite(r_ref.history[2]["grad_norm"])
    final = torch.load(tmp_path / "ref" / "checkpoint" / "scaler.pt")
    assert final["scale"] == 16384.0

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(Toy(), data, collate, TrainArgs(output_dir=str(run), **kw), loss_fn=nan_grad_at(3, kill_at=5))
    assert ckpt_step(run / "checkpoint") == 4
    assert torch.load(run / "checkpoint" / "scaler.pt")["scale"] == 4096.0

    model = Toy(seed=1)
    res = fit(model, data, collate, TrainArgs(output_dir=str(run), resume=True, **kw))
    assert res.resumed_from_step == 4
    assert torch.load(run / "checkpoint" / "scaler.pt") == final
    assert_same_weights(trainable_state(model), trainable_state(ref))
    assert [h["loss"] for h in res.history] == [h["loss"] for h in r_ref.history]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a CUDA GPU")
def test_fp16_on_cuda_resume_matches_uninterrupted(tmp_path):
    data = toy_data()
    kw = dict(max_steps=6, checkpoint_every=2, mixed_precision="fp16", **KW)
    ref = Toy()
    fit(ref, data, collate, TrainArgs(output_dir=str(tmp_path / "ref"), **kw))
    with pytest.raises(KeyboardInterrupt):
        fit(Toy(), data, collate, TrainArgs(output_dir=str(tmp_path / "run"), **kw), loss_fn=_crashing_loss(5))
    scaler = torch.load(tmp_path / "run" / "checkpoint" / "scaler.pt")
    assert scaler["scale"] > 0 and ckpt_step(tmp_path / "run" / "checkpoint") == 4
    model = Toy(seed=1)
    res = fit(model, data, collate, TrainArgs(output_dir=str(tmp_path / "run"), resume=True, **kw))
    assert res.resumed_from_step == 4
    assert_same_weights(trainable_state(model), trainable_state(ref))
    assert torch.load(tmp_path / "run" / "checkpoint" / "scaler.pt") == torch.load(
        tmp_path / "ref" / "checkpoint" / "scaler.pt")


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_non_finite_gradient_norm_stops_before_the_update(tmp_path, max_grad_norm):
    """A finite loss whose gradient is NaN (step 3) stops the run before the optimizer applies
    it, with or without clipping, and the step-2 checkpoint stays the last one."""
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = m(**batch).loss
        if calls["n"] == 3:
            loss = loss + (m.net[0].weight.sum() * 0).sqrt()  # value 0, gradient inf·0 = NaN
        return loss

    model = Toy()
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \(nan\) at step 3/6") as err:
        fit(model, toy_data(), collate, TrainArgs(output_dir=str(tmp_path), max_steps=6, checkpoint_every=1,
                                                  max_grad_norm=max_grad_norm, **KW), loss_fn=loss_fn)
    assert err.value.step == 3 and err.value.checkpoint == str(tmp_path / "checkpoint")
    assert ckpt_step(tmp_path / "checkpoint") == 2
    from safetensors.torch import load_file

    assert_same_weights(trainable_state(model), load_file(str(tmp_path / "checkpoint" / "trainable.safetensors")))


def test_unknown_early_stopping_metric_is_named_at_the_first_evaluation():
    calls = {"eval": 0}

    def eval_fn(m):
        calls["eval"] += 1
        return {"acc": 0.5, "loss": 1.0}

    with pytest.raises(ValueError, match=re.escape("early_stopping_metric='f1' is not among the eval metrics "
                                                   "['acc', 'loss']")):
        fit(Toy(), toy_data(), collate, TrainArgs(max_steps=6, eval_every=2, early_stopping_patience=1,
                                                  early_stopping_metric="f1", **KW), eval_fn=eval_fn)
    assert calls["eval"] == 1


def test_empty_dataset_is_refused_before_any_work(tmp_path):
    model = Toy()
    w0 = trainable_state(model)
    with pytest.raises(ValueError, match="train_dataset is empty: need at least one example"):
        fit(model, [], collate, TrainArgs(output_dir=str(tmp_path / "out"), max_steps=2, **KW))
    assert not (tmp_path / "out").exists()
    assert_same_weights(trainable_state(model), w0)
