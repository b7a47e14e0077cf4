"""``evaluate_classifier`` sorts examples by length, predicts padded batches and scatters the
predictions back by index. Checked against a plain loop: one example at a time, unpadded."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from asymlora.compare.data import (
    PadCollator,
    classification_metrics,
    evaluate_classifier,
)


class Tokens:
    """The part of TokenizedDataset that evaluate_classifier uses."""

    def __init__(self, input_ids: list[list[int]], labels: list[int]) -> None:
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


class LastTokenClassifier(nn.Module):
    """Class = (last unpadded token id) mod k: depends on the content and on the mask."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(()))  # gives evaluate_classifier a device

    def forward(self, input_ids, attention_mask):
        last = input_ids.gather(1, (attention_mask.sum(1, keepdim=True) - 1)).squeeze(1)
        return type("Out", (), {"logits": nn.functional.one_hot(last % self.k, self.k).float() + self.dummy})()


def random_examples(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # lengths in random order with many ties, so sorting really permutes and stability matters
    return [rng.integers(1, 60, size=int(rng.integers(1, 12))).tolist() for _ in range(n)]


def plain_loop_predictions(model, input_ids) -> list[int]:
    with torch.no_grad():
        return [int(model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
                    .logits.argmax(-1)) for ids in input_ids]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_predictions_return_to_their_examples(batch_size):
    k, ids = 5, random_examples(50, seed=0)
    model = LastTokenClassifier(k)
    truth = plain_loop_predictions(model, ids)
    assert len(set(truth)) == k  # every class predicted: a misplaced prediction cannot hide
    # labels = the plain loop's predictions: accuracy 1 only if every prediction lands on its own example
    res = evaluate_classifier(model, Tokens(ids, truth), PadCollator(0), k, batch_size=batch_size, prefix="p_")
    assert res == {"p_accuracy": 1.0, "p_macro_f1": 1.0}
    # any other labels: the metrics of the plain loop's predictions
    labels = np.random.default_rng(1).integers(0, k, len(ids)).tolist()
    got = evaluate_classifier(model, Tokens(ids, labels), PadCollator(0), k, batch_size=batch_size)
    assert got == classification_metrics(labels, truth, k)


def test_real_bert_padded_batches_match_unpadded_examples():
    """With a real (tiny) BERT, padding + attention mask leave each prediction as it is alone."""
    from conftest import tiny_bert

    k, ids = 3, random_examples(40, seed=2)
    model = tiny_bert(num_labels=k)
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)  # spread the logits: predictions differ between examples
    truth = plain_loop_predictions(model, ids)
    assert len(set(truth)) >= 2
    was_training = model.train().training
    res = evaluate_classifier(model, Tokens(ids, truth), PadCollator(0), k, batch_size=8)
    assert res["accuracy"] == 1.0 and model.training == was_training  # train mode given back
