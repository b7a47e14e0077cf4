"""Atomic file writing: a file either appears complete or not at all.

Everything asymlora writes (adapters, checkpoints, reports, plots) goes through a temporary
file in the destination folder followed by ``os.replace``, which is atomic on POSIX and
Windows, so an interrupted run never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    Use for writers that want a file name (``plt.savefig``, ``torch.save``, safetensors)::

        with atomic_path("out/plot.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{stem}-", suffix=ext)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file owner-only (0600); give it the permissions open() would.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The file-creation mask of this process (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or an asset they must install) is not there.

    Both a :class:`UserError` (the CLI prints it in one line) and a ``FileNotFoundError``
    (what library callers catch for a missing file)."""
