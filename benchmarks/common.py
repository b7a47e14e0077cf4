"""Shared tools: interleaved timing with medians, saved-for-backward memory accounting.

Timing: the machine is noisy, so every comparison runs its candidates in the same process,
interleaved round by round in a shuffled order; we report the median time of each candidate
and the median of the *per-round* ratios (a paired estimate that cancels slow drifts).

Memory (CPU, where there is no allocator high-water mark): the peak of a training step is
modelled as

    peak ≈ weights (parameters + buffers) + gradients + optimizer state + activations,

with "activations" the bytes of every tensor autograd saves for backward during the forward
pass, captured with ``torch.autograd.graph.saved_tensors_hooks`` and de-duplicated by storage
(two views of one buffer count once; a saved tensor that *is* a weight is not counted again).
At the end of the forward pass all saved activations are alive at once, which is when a
training step peaks (gradients and optimizer state of an adapter are tiny next to them).
On CUDA the real ``torch.cuda.max_memory_allocated`` is reported as well.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def setup_threads(n: int = 2) -> None:
    torch.set_num_threads(n)


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    for mod in ("transformers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            info[mod] = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["processor"] = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return info


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_times(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Seconds of each candidate over ``repeats`` rounds, in a shuffled order per round.

    Every candidate first runs ``warmup`` times (allocator / thread-pool warm-up, excluded).
    Returns name -> {"wall": [...], "cpu": [...]}, index i = round i (so rounds can be
    paired). "cpu" is the process CPU time (all threads): it counts the work done and is far
    less disturbed than wall-clock time by other processes competing for the cores.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    rng = random.Random(seed)
    times: dict[str, dict[str, list[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    for _ in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            gc.collect()
            _sync()
            c0, t0 = time.process_time(), time.perf_counter()
            candidates[name]()
            _sync()
            t1, c1 = time.perf_counter(), time.process_time()
            times[name]["wall"].append(t1 - t0)
            times[name]["cpu"].append(c1 - c0)
    return times


def summarize(times: dict[str, dict[str, list[float]]], ref: str | None = None) -> dict[str, dict]:
    """Per candidate: median wall/cpu seconds, noise, and paired ratios against ``ref``."""
    out: dict[str, dict] = {}
    for name, t in times.items():
        row = {
            "wall_s": median(t["wall"]),
            "cpu_s": median(t["cpu"]),
            "wall_spread": spread(t["wall"]),
            "n": len(t["wall"]),
        }
        if ref is not None and ref in times:
            row[f"wall_ratio_vs_{ref}"] = paired_ratio(t["wall"], times[ref]["wall"])
            row[f"cpu_ratio_vs_{ref}"] = paired_ratio(t["cpu"], times[ref]["cpu"])
        out[name] = row
    return out


def load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except OSError:  # pragma: no cover
        return None


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]."""
    return float(statistics.median(a / b for a, b in zip(num, den)))


def spread(xs: list[float]) -> float:
    """Relative half-range of the middle half (IQR / (2·median)): a robust noise estimate."""
    if len(xs) < 4:
        return float("nan") if len(xs) < 2 else (max(xs) - min(xs)) / (2 * median(xs))
    q = statistics.quantiles(xs, n=4)
    return float((q[2] - q[0]) / (2 * median(xs)))


# ---------------------------------------------------------------------------- memory
def storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


def storage_nbytes(t: torch.Tensor) -> int:
    return int(t.untyped_storage().nbytes())


class SavedTensorMeter:
    """Count the bytes of tensors saved for backward inside the ``with`` block.

    Each distinct storage is counted once (its full ``nbytes``); storages listed in
    ``exclude`` (e.g. the model's parameters and buffers) are skipped and reported apart.

        meter = SavedTensorMeter(exclude=model_storages(model))
        with meter:
            loss = model(x).sum()
        meter.bytes      # activation bytes kept alive for backward
    """

    def __init__(self, exclude: set[tuple[str, int]] | None = None) -> None:
        self.exclude = set(exclude or ())
        self.storages: dict[tuple[str, int], int] = {}
        self.excluded_hits = 0
        self.records: list[tuple[tuple[int, ...], str, int]] = []  # (shape, dtype, storage bytes) per new storage
        self._ctx = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key in self.exclude:
            self.excluded_hits += 1
        elif key not in self.storages:
            nbytes = storage_nbytes(t)
            self.storages[key] = nbytes
            self.records.append((tuple(t.shape), str(t.dtype).replace("torch.", ""), nbytes))
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._ctx is not None
        self._ctx.__exit__(*exc)
        self._ctx = None

    @property
    def bytes(self) -> int:
        return int(sum(self.storages.values()))


def model_storages(model: nn.Module) -> set[tuple[str, int]]:
    keys = {storage_key(p) for p in model.parameters()}
    keys |= {storage_key(b) for b in model.buffers()}
    return keys


def _unique_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or t.is_meta:
            continue
        seen.setdefault(storage_key(t), storage_nbytes(t))
    return int(sum(seen.values()))


def weight_bytes(model: nn.Module) -> int:
    return _unique_bytes(iter(list(model.parameters()) + list(model.buffers())))


def grad_bytes(model: nn.Module) -> int:
    return _unique_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(opt: torch.optim.Optimizer | None) -> int:
    if opt is None:
        return 0
    return _unique_bytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def fmt_bytes(n: float) -> str:
    if n != n:  # NaN
        return "nan"
    units = ["B", "KiB", "MiB", "GiB"]
    i = 0 if n <= 0 else min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024 ** i:.2f} {units[i]}" if i else f"{int(n)} B"


def table_parser(description: str, filename: str) -> argparse.ArgumentParser:
    """The flags of a benchmark that prints one markdown table. Its file goes into a folder, as
    every ``--output-dir/-o DIR`` of the ``asymlora`` command line: ``DIR/filename``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output-dir", "-o", default=None, metavar="DIR",
                        help=f"output folder: also write the markdown table to DIR/{filename} (default: print only)")
    return parser


def table_script(parser: argparse.ArgumentParser, filename: str, make_text: Callable[[], str],
                 argv: list[str] | None = None) -> int:
    """The ``main`` of a benchmark that prints one markdown table (``parser`` from
    :func:`table_parser`): ``--output-dir DIR`` also writes it to ``DIR/filename``."""
    from asymlora.fileio import atomic_write_text

    args = parser.parse_args(argv)
    text = make_text()
    print(text)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        atomic_write_text(os.path.join(args.output_dir, filename), text + "\n")
    return 0


@contextmanager
def cuda_peak() -> Iterator[dict]:
    """On CUDA: yields a dict filled with ``peak_bytes`` above the memory in use at entry."""
    out: dict = {}
    if not torch.cuda.is_available():
        yield out
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    yield out
    torch.cuda.synchronize()
    out["peak_bytes"] = int(torch.cuda.max_memory_allocated() - start)
    out["start_bytes"] = int(start)
