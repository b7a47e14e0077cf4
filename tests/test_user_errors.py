"""Every mistake in what a caller of the public API gives is an ``asymlora.UserError`` whose
message names the bad value (the CLI prints it in one line; library callers catch one type)."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import asymlora
from asymlora import AsymLoraConfig, TrainArgs, UserError
from conftest import tiny_bert


def _wrapped():
    return asymlora.wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=2))


def _peft_folder(tmp_path, **config):
    """A PEFT folder whose adapter_config.json holds ``config`` (weights are never reached)."""
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def _fit(args):
    model = _wrapped()
    data = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor(0)}]
    return asymlora.fit(model, data, lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}, args)


# (what is called, the words its message must hold)
BAD_INPUTS = [
    (lambda tmp: asymlora.wrap(tiny_bert(), AsymLoraConfig.preset("b-only", target_modules=["nope"])),
     "target module 'nope' matches no module"),
    (lambda tmp: asymlora.wrap(tiny_bert(), AsymLoraConfig.preset("b-only", target_modules=r".*\.nothing")),
     "matched no linear layer"),
    (lambda tmp: asymlora.wrap(tiny_bert(), AsymLoraConfig.preset("b-only", target_modules="query[")),
     "does not compile"),
    (lambda tmp: asymlora.wrap(tiny_bert(), AsymLoraConfig.preset("b-only", r=999)), "rank r=999 for layer"),
    (lambda tmp: AsymLoraConfig(r=0), "r must be >= 1"),
    (lambda tmp: AsymLoraConfig(r="8"), "r must be an integer"),
    (lambda tmp: AsymLoraConfig(target_modules=5), "target_modules must be"),
    (lambda tmp: AsymLoraConfig(trainable="C"), "trainable must be one of"),
    (lambda tmp: AsymLoraConfig.preset("c-only"), "unknown preset 'c-only'"),
    (lambda tmp: AsymLoraConfig.from_dict({"rank": 4}), "unknown AsymLoraConfig field(s) ['rank']"),
    (lambda tmp: AsymLoraConfig.from_json(str(tmp / "missing.json")), "missing.json: no such config file"),
    (lambda tmp: asymlora.wrap(_wrapped(), AsymLoraConfig.preset("b-only", r=2)), "already has asymlora adapters"),
    (lambda tmp: asymlora.wrap(tiny_bert(), {"r": 2}), "config must be an AsymLoraConfig"),
    (lambda tmp: asymlora.load_adapter(tiny_bert(), tmp / "no-such-folder"), "no-such-folder"),
    (lambda tmp: asymlora.save_adapter(tiny_bert(), tmp / "out"), "no asymlora adapter"),
    (lambda tmp: asymlora.import_peft(tiny_bert(), tmp / "no-such-folder"), "no adapter_config.json"),
    (lambda tmp: asymlora.import_peft(tiny_bert(), _peft_folder(tmp, peft_type="LORA"), trainable="BA"),
     "trainable must be one of"),
    (lambda tmp: asymlora.import_peft(tiny_bert(), _peft_folder(tmp, peft_type="IA3")), "peft_type='IA3'"),
    (lambda tmp: asymlora.export_peft(tiny_bert(), tmp / "out"), "no asymlora adapter"),
    (lambda tmp: asymlora.quantize_model(tiny_bert(), "int3"), "'int3' is not a quantization scheme"),
    (lambda tmp: _fit(TrainArgs(mixed_precision="fp8")), "TrainArgs.mixed_precision='fp8' is invalid"),
    (lambda tmp: _fit(TrainArgs(lr=-1.0)), "TrainArgs.lr=-1.0 is invalid"),
    (lambda tmp: _fit({"lr": 1e-3}), "args must be a TrainArgs"),
    (lambda tmp: asymlora.merge_and_unload(_wrapped(), adapter_names=["nope"]), "nope"),
]


@pytest.mark.parametrize("call,words", BAD_INPUTS, ids=[w[:40] for _, w in BAD_INPUTS])
def test_bad_input_to_public_api_is_a_user_error(tmp_path, call, words):
    with pytest.raises(UserError, match=re.escape(words)):
        call(tmp_path)


class _Spy:
    """Stands in for a public callable: records that the table reached it, then calls it (a
    class's own attributes, ``AsymLoraConfig.preset``, count as reaching the class)."""

    def __init__(self, name: str, target, reached: set[str]) -> None:
        self._name, self._target, self._reached = name, target, reached

    def __call__(self, *args, **kwargs):
        self._reached.add(self._name)
        return self._target(*args, **kwargs)

    def __getattr__(self, attr: str):
        self._reached.add(self._name)
        return getattr(self._target, attr)


def test_every_public_function_is_covered(tmp_path, monkeypatch):
    """The table above reaches each callable of ``asymlora.__all__`` that takes user values:
    every entry runs with the public names replaced by spies, and the names reached are counted."""
    here = sys.modules[__name__]
    reached: set[str] = set()
    for name in asymlora.__all__:
        target = getattr(asymlora, name)
        if not callable(target) or name == "UserError":
            continue
        spy = _Spy(name, target, reached)
        monkeypatch.setattr(asymlora, name, spy)
        if getattr(here, name, None) is target:  # imported into this module by name
            monkeypatch.setattr(here, name, spy)
    for i, (call, _) in enumerate(BAD_INPUTS):
        (tmp_path / str(i)).mkdir()
        with pytest.raises(UserError):
            call(tmp_path / str(i))
    untested = {"PRESETS", "UserError", "__version__", "parameter_report", "unload"}  # nothing to get wrong
    assert reached == set(asymlora.__all__) - untested
