"""Atomic file writing: a file either appears complete or not at all.

Everything asymlora writes (adapters, checkpoints, reports, plots) goes through a temporary
file in the destination folder followed by ``os.replace``, which is atomic on POSIX and
Windows, so an interrupted run never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
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
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success rename it to ``path``, so the
    folder appears complete or not at all. ``path`` must not exist, or be an empty folder
    (checked before the block runs: a UserError). On failure the temporary folder is removed."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise UserError(f"output folder {path!r} already exists and is not empty; remove it or pick another folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(path)}-")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        if os.path.isdir(path):
            os.rmdir(path)  # the empty folder that was there (fails if something was written meanwhile)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
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
