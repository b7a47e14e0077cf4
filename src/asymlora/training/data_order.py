"""The data order of a run as a pure function of ``(seed, step)`` (see ``asymlora.training.loop``,
"Determinism and resumption"): per-epoch Philox permutations, and length-grouped batches."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from asymlora.errors import UserError

# group_by_length sorts runs of this many batches by length (as transformers' length-grouped sampler).
LENGTH_GROUP_BATCHES = 50


def stream_indices(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Items ``start .. start+count-1`` of the infinite stream of per-epoch permutations."""
    out = np.empty(count, dtype=np.int64)
    filled = 0
    pos = start
    while filled < count:
        epoch, offset = divmod(pos, n)
        perm = np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFF, epoch])).permutation(n)
        take = min(n - offset, count - filled)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
        pos += take
    return out


def epoch_batches(lengths: np.ndarray, seed: int, epoch: int, batch: int) -> np.ndarray:
    """Length-grouped order of one epoch, as an array of shape ``(n // batch, batch)``.

    The epoch's permutation (the same Philox stream as the plain order) is cut into runs of
    ``LENGTH_GROUP_BATCHES`` batches; each run is sorted by length (longest first), cut into
    batches, and the batches of the epoch are shuffled. The ``n mod batch`` examples left over
    after sorting are dropped for this epoch only (a different remainder each epoch), so that
    every optimizer step takes one whole batch of similar lengths. A pure function of
    ``(seed, epoch)``, so resume stays exact."""
    n = len(lengths)
    rng = np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFF, epoch]))
    perm = rng.permutation(n)
    chunk = batch * LENGTH_GROUP_BATCHES
    runs = [perm[s:s + chunk] for s in range(0, n, chunk)]
    ordered = np.concatenate([r[np.argsort(-lengths[r], kind="stable")] for r in runs])
    nb = n // batch
    batches = ordered[: nb * batch].reshape(nb, batch)
    return batches[rng.permutation(nb)]


class GroupedStream:
    """Global batch ``k`` of the length-grouped stream (one epoch cached at a time)."""

    def __init__(self, lengths: Sequence[int], seed: int, batch: int) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) < batch:
            raise UserError(f"group_by_length needs at least one full global batch ({batch} examples), "
                             f"the dataset has {len(self.lengths)}")
        self.seed, self.batch = seed, batch
        self.per_epoch = len(self.lengths) // batch
        self._epoch, self._batches = -1, np.empty((0, batch), dtype=np.int64)

    def __call__(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.lengths, self.seed, epoch, self.batch)
        return self._batches[j]
