"""What only a CUDA GPU can show (skipped elsewhere; `python -m benchmarks.gpu_check` runs these
with the other CUDA-dependent tests): training runs on the GPU and its reported peak is the
CUDA allocator's, which counts a known tensor exactly."""
from __future__ import annotations

import pytest
import torch

from asymlora.training.loop import TrainArgs, fit
from test_train import Toy, collate, toy_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fit_runs_on_the_gpu_and_its_peak_counts_a_known_tensor_exactly():
    extra = 256 * 2**20
    devices = []

    def loss_fn(big):
        def fn(m, batch):
            devices.append(batch["x"].device.type)
            if big:
                blob = torch.ones(extra // 4, device=batch["x"].device)
                assert blob.sum().item() == extra // 4
            return m(**batch).loss
        return fn

    args = TrainArgs(max_steps=3, batch_size=8, progress=False)
    big = fit(Toy(), toy_data(), collate, args, loss_fn=loss_fn(True))
    small = fit(Toy(), toy_data(), collate, args, loss_fn=loss_fn(False))
    assert set(devices) == {"cuda"}
    assert big.peak_memory_kind == small.peak_memory_kind == "cuda_max_memory_allocated"
    # the allocator rounds a request up to 2 MiB blocks at most: the blob adds 256 MiB, exactly
    assert extra <= big.peak_memory_bytes - small.peak_memory_bytes <= extra + 2 * 2**20


def test_bf16_on_cuda_tracks_float32():
    data = toy_data()
    r32 = fit(Toy(), data, collate, TrainArgs(max_steps=3, batch_size=8, progress=False))
    r16 = fit(Toy(), data, collate, TrainArgs(max_steps=3, batch_size=8, mixed_precision="bf16", progress=False))
    assert [h["loss"] for h in r16.history] == pytest.approx([h["loss"] for h in r32.history], rel=2e-2)
    assert [h["loss"] for h in r16.history] != [h["loss"] for h in r32.history]  # it ran in bf16
