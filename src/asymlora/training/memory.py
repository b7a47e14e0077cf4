"""Peak memory of a run (CUDA ``max_memory_allocated``; on CPU the process's ``VmHWM``, reset per run)
and the bytes autograd keeps for backward in one step."""
from __future__ import annotations

import torch


def peak_memory_start(device: torch.device) -> str:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "cpu_peak_rss_vmhwm"
    except OSError:
        return "cpu_process_lifetime_max_rss"


def peak_memory_end(device: torch.device, kind: str) -> int:
    if kind == "cuda_max_memory_allocated":
        return int(torch.cuda.max_memory_allocated(device))
    if kind == "cpu_peak_rss_vmhwm":
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class SavedTensorBytes:
    """Counts the bytes of distinct storages saved for backward (see FitResult)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.seen: set[int] = set()
        self.total = 0
        self.peak = 0

    def reset(self) -> None:
        self.peak = max(self.peak, self.total)
        self.seen.clear()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensor types
            return t
        if key and key not in self.seen and key not in self.exclude:
            self.seen.add(key)
            self.total += st.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t
