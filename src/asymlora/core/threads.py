"""torch's intra-op thread count, set for one block and put back afterwards."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[int]:
    """Run a block with ``torch.set_num_threads(n)`` (``None``: keep the current count, e.g. when
    the block sets it itself); the caller's count is restored afterwards, whatever happens.
    Yields the count in effect at the start of the block."""
    import torch

    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
