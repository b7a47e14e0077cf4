"""A diverging run is a result, not a crash (``asymlora.sweep.divergence``): a run whose loss
becomes non-finite is recorded as diverged at its step, never chosen, drawn as such in
lr_selection.png, and the sweep goes on; a strategy whose every rate diverges says so in its row.
The loss is made non-finite by a poisoned batch: from a chosen training step on, the model's
loss is multiplied by NaN, so the real training loop meets a NaN loss and raises
``NonFiniteLossError`` as it would on an fp16 overflow."""
from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from asymlora.training import loop
from test_sft import _pairs, tiny_chat_llama  # noqa: F401 - the fixture is used by name

needs_real = pytest.mark.needs_assets("minilm", "fortunes")


def poison(monkeypatch, at: dict[str, int]) -> None:
    """Runs whose progress description (``TrainArgs.desc``: "[3/8] lora r=4 lr 0.01") matches a
    pattern of ``at`` get a NaN loss from that training step on."""
    real_fit = loop.fit

    def fit(model, data, collate, args, **kw):
        step = next((s for pattern, s in at.items() if re.search(pattern, args.desc or "")), None)
        if step is not None:
            calls = [0]

            def nan_loss(module, _inputs, out):
                if module.training:
                    calls[0] += 1
                    if calls[0] >= step:
                        out.loss = out.loss * float("nan")
                return out

            model.register_forward_hook(nan_loss)
        return real_fit(model, data, collate, args, **kw)

    monkeypatch.setattr(loop, "fit", fit)


@pytest.mark.slow
@needs_real
def test_a_diverging_compare_pilot_is_never_chosen_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    import matplotlib.axes

    from asymlora.compare import CompareConfig, format_report, run_compare

    notes: list[str] = []
    real_annotate = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: (notes.append(text), real_annotate(self, text, *a, **k))[1])
    # lora: its larger rate diverges at step 7 (before the rung at 15), and its second seed at step 4;
    # b-only: every rate diverges
    poison(monkeypatch, {r"lora r=4 lr 0\.01$": 7, r"lora r=4 seed 1$": 4, r"b-only r=4 lr": 9})
    cfg = CompareConfig(strategies=["lora", "b-only"], ranks=[4], seeds=[0, 1], lrs=[3e-3, 1e-2], max_lr_extensions=0,
                        max_steps=30, eval_every=5, warmup_steps=2, batch_size=16, max_length=32, max_train=160,
                        max_val=48, max_test=48, workers=1, mixed_precision="no", progress=False, quick=True,
                        output_dir=str(tmp_path / "out"))
    res = run_compare(cfg)
    log = capsys.readouterr().out
    lora, bonly = res["lr_selection"]
    assert lora["chosen_lr"] == 3e-3
    assert [(g["lr"], g.get("diverged_at_step")) for g in lora["grid"]] == [(3e-3, None), (1e-2, 7)]
    assert bonly["chosen_lr"] is None and bonly["all_diverged"]
    assert [(g["lr"], g["diverged_at_step"]) for g in bonly["grid"]] == [(3e-3, 9), (1e-2, 9)]
    assert re.search(r"lora r=4 +seed 0 lr 0\.01 +diverged at step 7 \(non-finite training loss \(nan\)", log)
    (run0, run1) = res["runs"]
    assert run0["seed"] == 0 and run0["lr"] == 3e-3 and not run0.get("diverged") and run0["test_accuracy"] > 0
    assert run1["seed"] == 1 and run1["diverged"] and run1["diverged_at_step"] == 4
    row_lora, row_bonly = res["summary"]
    assert row_lora["n"] == 1 and row_lora["diverged"] == 1
    assert row_lora["test_accuracy_mean"] == run0["test_accuracy"]
    assert row_bonly == {"strategy": "b-only r=4", "all_diverged": True, "n": 0,
                         "diverged_at": [[3e-3, 9], [1e-2, 9]]}
    report = format_report(res, cfg)
    assert "every rate diverged (lr 0.003 at step 9, lr 0.01 at step 9)" in report
    assert "lr for b-only r=4: none, every rate diverged" in report and "0.01: diverged at step 7" in report
    assert notes.count("diverged at step 7") == 1 and notes.count("diverged at step 9") == 2  # lr_selection.png
    assert (tmp_path / "out" / "lr_selection.png").is_file()


def test_a_diverging_sft_pilot_is_never_chosen_and_the_sweep_goes_on(tiny_chat_llama, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    from asymlora.sft import SFTConfig, run_sft
    from asymlora.sft import run as R
    from asymlora.sft.protocol import format_report

    monkeypatch.setattr(R, "load_qa", lambda sources: _pairs(200))
    poison(monkeypatch, {r"lora r=8 lr 0\.01$": 6, r"b-only r=8 lr": 3})
    cfg = SFTConfig(model=str(tiny_chat_llama), strategies=["lora", "b-only"], ranks=[8], seeds=[0],
                    lrs=[3e-3, 1e-2], max_lr_extensions=0, max_steps=12, eval_every=4, patience=2, min_steps=8,
                    warmup_steps=2, batch_size=8, max_length=48, max_val=16, max_test=16, tasks=[], workers=1,
                    mixed_precision="no", output_dir=str(tmp_path / "out"), progress=False,
                    target_modules=["all-linear"])
    res = run_sft(cfg)
    lora, bonly = res["lr_selection"]
    assert lora["chosen_lr"] == 3e-3 and [g.get("diverged_at_step") for g in lora["grid"]] == [None, 6]
    assert bonly["chosen_lr"] is None and [g["diverged_at_step"] for g in bonly["grid"]] == [3, 3]
    assert [(r["strategy"], r["lr"]) for r in res["runs"]] == [("lora r=8", 3e-3)]
    assert res["summary"][1]["all_diverged"]
    report = format_report(res, cfg)
    assert "every rate diverged (lr 0.003 at step 3, lr 0.01 at step 3)" in report
    assert (tmp_path / "out" / "results.md").read_text().count("diverged at step 3") == 2
