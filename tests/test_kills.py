"""Real kills: a process is SIGKILLed at a chosen moment of a write and what it leaves behind
is checked against independent truth.

The moment is chosen with ``asymlora.fileio.fault_point``: the environment variable
``ASYMLORA_FAULT_PAUSE=<point>[:<n>]`` makes the process stop (sleep) the n-th time it reaches
``<point>`` and write a marker file; the test waits for the marker and sends SIGKILL. Nothing
in the process sees the kill coming: no exception, no cleanup, no ``finally``.

Truth: an adapter folder left behind holds, byte for byte, either the complete previous save
or the complete new one (both written separately by the test), and loads; a resumed
``asymlora train`` ends with the adapter, tensor for tensor, of a run that was never killed.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import asymlora
from asymlora.errors import UserError
from asymlora.formats.native import CONFIG_NAME, WEIGHTS_NAME
from asymlora.formats.peft import convert_to_peft, import_peft

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import kill_worker  # noqa: E402
from kill_worker import adapter_model, base_model  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
START_TIMEOUT_S = 180  # a fresh interpreter imports torch and transformers first: slow on a loaded machine


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(TESTS), "src"), TESTS,
                                         os.environ.get("PYTHONPATH", "")])
    for name in ("ASYMLORA_FAULT_PAUSE", "ASYMLORA_FAULT_MARK"):
        env.pop(name, None)
    env.update(extra)
    return env


def kill_at(cmd: list[str], point: str, mark) -> None:
    """Run ``cmd`` until it stops at fault point ``point``, then SIGKILL it."""
    proc = subprocess.Popen(cmd, env=_env(ASYMLORA_FAULT_PAUSE=point, ASYMLORA_FAULT_MARK=str(mark)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not os.path.exists(mark):
            if proc.poll() is not None:
                pytest.fail(f"{cmd[1:3]} ended (exit {proc.returncode}) without reaching {point}:\n"
                            f"{proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{cmd[1:3]} did not reach {point} within {START_TIMEOUT_S} s")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished


def folder_bytes(folder) -> dict[str, object]:
    """Each file's content: its bytes, or for a safetensors file its header metadata and every
    tensor's dtype, shape and bytes (the writer orders the header keys arbitrarily)."""
    out: dict[str, object] = {}
    for n in sorted(os.listdir(folder)):
        path = os.path.join(folder, n)
        if n.endswith(".safetensors"):
            with safe_open(path, framework="pt") as fh:
                out[n] = (fh.metadata(), {k: (str(t.dtype), tuple(t.shape), t.numpy().tobytes())
                                          for k, t in sorted(load_file(path).items())})
        elif os.path.isfile(path):
            out[n] = open(path, "rb").read()
        else:
            out[n] = "<folder>"
    return out


def worker(*args: str) -> list[str]:
    return [sys.executable, kill_worker.__file__, *args]


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def loaded(folder) -> dict[str, torch.Tensor]:
    """The state of a fresh model after ``load_adapter`` (what a user would get)."""
    return plain_state(asymlora.load_adapter(base_model(), str(folder)))


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two complete saves of the same adapter with different values: the only valid outcomes."""
    root = tmp_path_factory.mktemp("versions")
    out = {}
    for v in (1, 2):
        asymlora.save_adapter(adapter_model(v), root / f"v{v}")
        convert_to_peft(root / f"v{v}", root / f"peft{v}")
        out[v] = {"folder": root / f"v{v}", "bytes": folder_bytes(root / f"v{v}"),
                  "peft": folder_bytes(root / f"peft{v}"), "state": loaded(root / f"v{v}")}
    assert out[1]["bytes"][CONFIG_NAME] != out[2]["bytes"][CONFIG_NAME]  # the versions differ in both files
    assert out[1]["bytes"][WEIGHTS_NAME] != out[2]["bytes"][WEIGHTS_NAME]
    return out


def assert_is_version(folder, versions, v: int) -> None:
    assert folder_bytes(folder) == versions[v]["bytes"], f"{folder} is not save {v} as a whole"
    state = loaded(folder)
    assert all(torch.equal(state[k], versions[v]["state"][k]) for k in state)


# ----------------------------------------------------------------------------- save_adapter, killed

# (fault point, which save the folder must hold afterwards)
ADAPTER_KILLS = [
    ("adapter.weights_written", 1),  # the new folder has its weights but not its config yet
    ("folder.filled", 1),            # the new folder is complete, not yet swapped in
    ("folder.swapped", 2),           # swapped in; the previous one not yet deleted
]


@pytest.mark.parametrize("point,expect", ADAPTER_KILLS, ids=[p for p, _ in ADAPTER_KILLS])
def test_save_adapter_killed_leaves_the_previous_or_the_new_adapter(tmp_path, versions, point, expect):
    target = tmp_path / "adapter"
    asymlora.save_adapter(adapter_model(1), target)
    kill_at(worker("adapter", str(target), "2"), point, tmp_path / "paused")
    assert_is_version(target, versions, expect)
    # the next save into the folder works and replaces it as a whole (leftovers are hidden siblings)
    asymlora.save_adapter(adapter_model(2), target)
    assert_is_version(target, versions, 2)


@pytest.mark.slow  # the fallback is not what runs on Linux
def test_save_adapter_killed_between_the_fallback_renames(tmp_path, versions):
    """Without the one-step swap (not Linux) a kill between the two renames leaves no adapter
    under the name, the previous one complete beside it, and a load that says where it is."""
    target = tmp_path / "adapter"
    asymlora.save_adapter(adapter_model(1), target)
    kill_at(worker("adapter", str(target), "2", "--no-exchange"), "folder.between", tmp_path / "paused")
    assert not target.exists()
    (kept,) = [p / "adapter" for p in tmp_path.iterdir() if p.name.startswith(".old-adapter-")]
    assert_is_version(kept, versions, 1)
    with pytest.raises(UserError, match=rf"a save into it was interrupted; the previous adapter is complete in "
                                        rf"'{kept}'"):
        asymlora.load_adapter(base_model(), str(target))


@pytest.mark.slow
def test_save_adapter_without_the_swap_is_still_whole(tmp_path, versions):
    """The fallback's other kill points leave the previous or the new folder, as the swap does."""
    target = tmp_path / "adapter"
    asymlora.save_adapter(adapter_model(1), target)
    kill_at(worker("adapter", str(target), "2", "--no-exchange"), "folder.filled", tmp_path / "paused")
    assert_is_version(target, versions, 1)


def test_replacing_a_folder_keeps_what_else_is_in_it(tmp_path, versions):
    """The swap replaces the adapter files only: other entries (PEFT's layout keeps further
    adapters in subfolders) are carried into the new folder."""
    target = tmp_path / "adapter"
    asymlora.save_adapter(adapter_model(1), target)
    asymlora.save_adapter(adapter_model(1), target / "other")
    (target / "notes.txt").write_text("mine")
    asymlora.save_adapter(adapter_model(2), target)
    assert {n: b for n, b in folder_bytes(target).items() if n in (CONFIG_NAME, WEIGHTS_NAME)} == versions[2]["bytes"]
    assert (target / "notes.txt").read_text() == "mine"
    assert_is_version(target / "other", versions, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no hidden leftovers


@pytest.mark.parametrize("point,expect", [("adapter.weights_written", 1), ("folder.swapped", 2)])
def test_convert_to_peft_killed_leaves_the_previous_or_the_new_folder(tmp_path, versions, point, expect):
    target = tmp_path / "peft"
    convert_to_peft(versions[1]["folder"], target)
    kill_at(worker("peft", str(versions[2]["folder"]), str(target)), point, tmp_path / "paused")
    assert folder_bytes(target) == versions[expect]["peft"]
    import_peft(base_model(), str(target))  # and it imports


@pytest.mark.slow  # several interpreter starts
def test_save_adapter_killed_at_random_moments(tmp_path, versions):
    """A process saving two versions in turn, killed at random times: the folder is always one
    of the two complete saves (the fault points above are the moments in between)."""
    target, rng = tmp_path / "adapter", random.Random(0)
    for i in range(6):
        ready = tmp_path / f"ready{i}"
        proc = subprocess.Popen(worker("loop", str(target), str(ready)), env=_env(), stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the saving loop did not start"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        got = folder_bytes(target)
        assert got in (versions[1]["bytes"], versions[2]["bytes"]), f"kill {i}: a mix of two saves"
        assert_is_version(target, versions, 1 if got == versions[1]["bytes"] else 2)


# ----------------------------------------------------------------------------- asymlora train, killed

from test_cli_train import assets, train  # noqa: E402,F401  (assets: a tiny BERT folder and a CSV)

TRAIN_CODE = "import sys; from asymlora.cli.main import main; sys.exit(main(sys.argv[1:]))"

# (fault point, the checkpoint step a resume must start from). The run: 6 steps, a checkpoint
# every 2; each checkpoint also saves an adapter inside it, so the 4th adapter folder written is
# OUTPUT/adapter, after training.
# Two of them run with -m "not slow" (each starts an interpreter and trains).
TRAIN_KILLS = [
    pytest.param("checkpoint.written:1", 2, marks=pytest.mark.slow),  # between two checkpoints
    ("checkpoint.writing:2", 2),           # while step 4's checkpoint files are being written
    ("checkpoint.between_renames:1", 2),   # step 2's moved aside, step 4's not yet in place (the
                                           # first checkpoint has nothing to move)
    pytest.param("folder.filled:4", 6, marks=pytest.mark.slow),  # while the trained adapter is written
]


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train(assets, out) == 0
    return out


@pytest.mark.parametrize("point,resume_step", TRAIN_KILLS)
def test_train_killed_then_resumed_equals_uninterrupted(assets, uninterrupted, tmp_path, monkeypatch,  # noqa: F811
                                                        point, resume_step):
    from asymlora.compare import data as tc
    from asymlora.training.loop import find_checkpoint

    model_dir, data = assets
    out = tmp_path / "run"
    kill_at([sys.executable, "-c", TRAIN_CODE, "train", "--model", model_dir, "--data", data, "--quick",
             "--max-steps", "6", "--eval-every", "2", "--checkpoint-every", "2", "--mixed-precision", "no",
             "--threads", "1", "--no-progress", "-o", str(out)], point, tmp_path / "paused")
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    found = find_checkpoint(str(out))
    assert found is not None
    assert json.loads(open(os.path.join(found, "trainer_state.json")).read())["step"] == resume_step

    # collate calls of the resumed run tell where it started: each step, each validation (every
    # 2 steps), the final test and the train sample (the train - test gap) take one
    real_call, calls = tc.PadCollator.__call__, []
    monkeypatch.setattr(tc.PadCollator, "__call__", lambda self, items: (calls.append(1), real_call(self, items))[1])
    assert train(assets, out, "--resume") == 0
    assert len(calls) == (6 - resume_step) + (6 - resume_step) // 2 + 2

    ref, got = (json.loads((d / "metrics.json").read_text()) for d in (uninterrupted, out))
    for key in ("test_accuracy", "test_macro_f1", "val_accuracy", "best_step", "steps"):
        assert got[key] == ref[key], key
    assert [h["loss"] for h in got["history"]] == [h["loss"] for h in ref["history"]]
    a, b = (load_file(str(d / "adapter" / WEIGHTS_NAME)) for d in (uninterrupted, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "adapter" / CONFIG_NAME).read_text() == (uninterrupted / "adapter" / CONFIG_NAME).read_text()
