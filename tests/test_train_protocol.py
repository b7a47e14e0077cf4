"""Engine features the compare protocol relies on: best-step restore, early stopping, the
constant schedule and length-grouped batches (all checked against a hand computation)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from asymlora.training.data_order import epoch_batches
from asymlora.training.loop import TrainArgs, constant_after_warmup, fit


class Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Linear(4, 2)

    def forward(self, x, y):
        logits = self.w(x)
        return type("Out", (), {"loss": nn.functional.cross_entropy(logits, y), "logits": logits})()


def data(n: int = 32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "y": (x[i, 0] > 0).long()} for i in range(n)]


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_constant_schedule_after_warmup():
    f = constant_after_warmup(4)
    assert [f(k) for k in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_restore_best_returns_the_weights_of_the_best_evaluation():
    """Snapshot the weights at every evaluation by hand; the model fit returns must equal the
    snapshot taken at the evaluation with the highest score, not the last weights."""
    scores = iter([0.2, 0.7, 0.4, 0.3, 0.1, 0.0])
    snaps: list[dict[str, torch.Tensor]] = []

    def ev(m):
        snaps.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"score": next(scores)}

    model = Lin()
    res = fit(model, data(), collate, TrainArgs(lr=0.1, max_steps=30, batch_size=8, eval_every=2,
                                                early_stopping_patience=3, restore_best=True, progress=False),
              eval_fn=ev)
    assert res.stopped_early and res.steps == 10 and res.best_step == 4 and res.restored_best
    assert res.best_metric == 0.7 and res.final_metrics["score"] == 0.7
    for k, v in model.state_dict().items():
        assert torch.equal(v, snaps[1][k])
        assert not torch.equal(v, snaps[-1][k])  # the last weights differ: restoring mattered


def test_restore_best_is_a_no_op_when_the_last_evaluation_is_best():
    scores = iter([0.1, 0.2, 0.3])
    model = Lin()
    res = fit(model, data(), collate, TrainArgs(lr=0.1, max_steps=6, batch_size=8, eval_every=2,
                                                restore_best=True, progress=False),
              eval_fn=lambda m: {"score": next(scores)})
    assert res.best_step == 6 and not res.restored_best and res.steps == 6


def test_early_stopping_stops_after_patience_evaluations_without_a_new_best():
    scores = iter([0.5, 0.5, 0.6, 0.6, 0.59, 0.61, 0.3, 0.3, 0.3, 0.9])
    res = fit(Lin(), data(), collate, TrainArgs(max_steps=100, batch_size=8, eval_every=5,
                                                early_stopping_patience=3, progress=False),
              eval_fn=lambda m: {"score": next(scores)})
    # bests at evals 1, 3, 6 (0.5, 0.6, 0.61; equal is not better); evals 7-9 fail -> stop at eval 9
    assert res.stopped_early and res.steps == 45 and res.best_metric == 0.61


def test_length_grouped_epoch_is_a_permutation_of_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=1003)
    b = epoch_batches(lengths, seed=3, epoch=0, batch=8)
    assert b.shape == (1003 // 8, 8)
    flat = b.ravel()
    assert len(set(flat.tolist())) == flat.size  # no example twice
    spread = (lengths[b].max(1) - lengths[b].min(1)).mean()
    rnd = lengths[rng.permutation(1003)[:1000].reshape(-1, 8)]
    random_spread = (rnd.max(1) - rnd.min(1)).mean()
    assert spread < 0.2 * random_spread  # batches hold similar lengths
    assert np.array_equal(b, epoch_batches(lengths, seed=3, epoch=0, batch=8))  # pure function
    assert not np.array_equal(b, epoch_batches(lengths, seed=3, epoch=1, batch=8))
    # padding is what it saves: the padded size of the grouped epoch is close to the real size
    assert (lengths[b].max(1) * 8).sum() < 1.1 * lengths[flat].sum()


class LenData(list):
    def lengths(self):
        return [int(it["n"]) for it in self]


def grouped_items():
    g = torch.Generator().manual_seed(2)
    return LenData({"x": torch.randn(4, generator=g), "y": torch.tensor(i % 2), "n": torch.tensor(i % 7)}
                   for i in range(40))


def make_collate(seen: list, crash_at: int | None = None):
    def coll(batch):
        if crash_at is not None and len(seen) == crash_at:
            raise KeyboardInterrupt("simulated crash")
        seen.append([int(it["n"]) for it in batch])
        return {"x": torch.stack([it["x"] for it in batch]), "y": torch.stack([it["y"] for it in batch])}

    return coll


def test_group_by_length_trains_on_whole_grouped_batches_and_resumes_exactly(tmp_path):
    kw = dict(lr=0.05, max_steps=12, batch_size=8, group_by_length=True, progress=False, seed=5)
    seen: list[list[int]] = []
    ref = Lin()
    fit(ref, grouped_items(), make_collate(seen), TrainArgs(**kw))
    assert len(seen) == 12 and all(len(s) == 8 for s in seen)
    assert np.mean([max(s) - min(s) for s in seen]) < 3  # lengths 0..6: grouped batches are narrow
    ck = dict(output_dir=str(tmp_path), checkpoint_every=5)
    with pytest.raises(KeyboardInterrupt):  # killed during step 8, after the step-5 checkpoint
        fit(Lin(), grouped_items(), make_collate([], crash_at=7), TrainArgs(**ck, **kw))
    resumed, seen2 = Lin(), []
    res = fit(resumed, grouped_items(), make_collate(seen2), TrainArgs(resume=True, **ck, **kw))
    assert res.resumed_from_step == 5 and seen2 == seen[5:]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k])


def scorer(values):
    it = iter(values)
    return lambda m: {"score": next(it)}


def test_restore_best_survives_resume(tmp_path):
    """The best weights are part of the checkpoint: a run resumed after its best evaluation
    still restores them."""
    kw = dict(lr=0.1, max_steps=8, batch_size=8, eval_every=2, restore_best=True, progress=False)
    ref = Lin()
    full = fit(ref, data(), collate, TrainArgs(**kw), eval_fn=scorer([0.1, 0.9, 0.2, 0.3]))
    assert full.best_step == 4 and full.restored_best
    ck = dict(output_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(StopIteration):  # crashes at the third evaluation, after step 4's checkpoint
        fit(Lin(), data(), collate, TrainArgs(**ck, **kw), eval_fn=scorer([0.1, 0.9]))
    resumed = Lin()
    res = fit(resumed, data(), collate, TrainArgs(resume=True, **ck, **kw), eval_fn=scorer([0.2, 0.3]))
    assert res.resumed_from_step == 4 and res.best_step == 4 and res.restored_best
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k])


def test_early_stopping_waits_for_min_steps():
    """A flat start (accuracy stuck at the majority class) is not a plateau."""
    scores = [0.3, 0.3, 0.3, 0.3, 0.5, 0.6, 0.6, 0.6, 0.6, 0.9]
    res = fit(Lin(), data(), collate, TrainArgs(max_steps=100, batch_size=8, eval_every=5, early_stopping_patience=2,
                                                early_stopping_min_steps=20, progress=False),
              eval_fn=scorer(scores))
    # without the minimum it would stop at step 15 (evals 2, 3 fail); with it: bests at 25, 30, stop at 40
    assert res.stopped_early and res.steps == 40 and res.best_metric == 0.6


def test_min_delta_counts_small_improvements_as_a_plateau_but_restores_the_true_best():
    """A loss creeping down by less than min_delta uses up patience; the weights restored are
    still those of the lowest loss seen."""
    losses = iter([3.0, 2.5, 2.49, 2.485, 2.481, 1.0])
    snaps: list[dict[str, torch.Tensor]] = []

    def ev(m):
        snaps.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"val_loss": next(losses)}

    model = Lin()
    res = fit(model, data(), collate, TrainArgs(lr=0.1, max_steps=100, batch_size=8, eval_every=5,
                                                early_stopping_patience=3, early_stopping_min_delta=0.02,
                                                greater_is_better=False, restore_best=True, progress=False),
              eval_fn=ev)
    # 2.5 resets (−0.5); 2.49, 2.485, 2.481 are within 0.02 of 2.5 → 3 evaluations without progress
    assert res.stopped_early and res.steps == 25 and res.best_metric == 2.481 and res.best_step == 25
    without = fit(Lin(), data(), collate, TrainArgs(lr=0.1, max_steps=30, batch_size=8, eval_every=5,
                                                    early_stopping_patience=3, greater_is_better=False,
                                                    progress=False),
                  eval_fn=scorer([3.0, 2.5, 2.49, 2.485, 2.48, 2.47, 2.46, 2.45]))
    assert not without.stopped_early  # each small step down is a new best without min_delta
    for k, v in model.state_dict().items():
        assert torch.equal(v, snaps[4][k])


def test_warmup_stable_decay_by_hand():
    """T = 20, w = 4, the last quarter (5 steps) decays: 1/4 .. 4/4, eleven ones, then 5/5 .. 1/5."""
    from asymlora.training.schedules import warmup_stable_decay

    f = warmup_stable_decay(20, 4)
    got = [f(k) for k in range(20)]
    want = [0.25, 0.5, 0.75, 1.0] + [1.0] * 11 + [5 / 5, 4 / 5, 3 / 5, 2 / 5, 1 / 5]
    assert got == pytest.approx(want)


def test_fit_follows_the_wsd_schedule():
    from asymlora.training.schedules import warmup_stable_decay

    model = Lin()
    data = [{"x": torch.randn(4), "y": torch.tensor(i % 2)} for i in range(16)]
    collate = lambda items: {"x": torch.stack([d["x"] for d in items]), "y": torch.stack([d["y"] for d in items])}  # noqa: E731
    res = fit(model, data, collate, TrainArgs(lr=0.1, max_steps=12, batch_size=4, warmup_steps=2, lr_schedule="wsd",
                                             progress=False))
    f = warmup_stable_decay(12, 2)
    assert [h["lr"] for h in res.history] == pytest.approx([0.1 * f(k) for k in range(12)])
