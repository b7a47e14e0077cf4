"""Atomic file writing: a file either appears complete or not at all.

Everything asymlora writes (adapters, checkpoints, reports, plots) goes through a temporary
file in the destination folder followed by ``os.replace``, which is atomic on POSIX and
Windows, so an interrupted run never leaves a half-written file behind.

A folder whose files must change together (an adapter: weights and config) is written with
``atomic_folder``: filled as a hidden sibling, then swapped in. On Linux the swap is one
``renameat2(RENAME_EXCHANGE)`` call, so a process killed at any moment leaves either the
previous folder or the new one under the name. Elsewhere (or on a file system without that
call) it is two renames, and a kill between them leaves no folder under the name, the
previous one complete in a hidden sibling ``.old-<name>-*``: never a mix of the two.

``fault_point`` is a hook for the kill tests (``tests/test_kills.py``): with the environment
variable ``ASYMLORA_FAULT_PAUSE`` set, the process stops at the named point so that a test can
SIGKILL it there. Unset, it does nothing.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import functools
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from asymlora.errors import UserError

FAULT_ENV = "ASYMLORA_FAULT_PAUSE"  # "<point>" or "<point>:<n>": stop the n-th time (default 1st)
FAULT_MARK_ENV = "ASYMLORA_FAULT_MARK"  # a file written when the process stops there
_fault_hits: dict[str, int] = {}


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
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, tmp):
            # a full disk while writing the temporary file: name the file the user asked for
            raise OSError(err.errno, err.strerror, path) from err
        raise


def fault_point(name: str) -> None:
    """Stop here, for good, when ``ASYMLORA_FAULT_PAUSE`` names this point (and this is the
    n-th time it is reached): write the file ``ASYMLORA_FAULT_MARK`` names, then sleep until
    killed. A test uses it to SIGKILL a real process at a chosen moment of a write."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] != int(nth or 1):
        return
    mark = os.environ.get(FAULT_MARK_ENV)
    if mark:
        with open(mark, "w", encoding="utf-8") as fh:
            fh.write(f"{name} {os.getpid()}\n")
    while True:  # only a signal ends this
        time.sleep(60)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, owned: Collection[str]) -> Iterator[str]:
    """Yield a new hidden folder beside ``path`` to fill; on success it replaces ``path`` in
    one step (see the module docstring). The entries ``owned`` are the ones the caller writes;
    any other entry of an existing ``path`` (another adapter's subfolder, a README) is carried
    over into the new folder first, as hard links where the file system has them. A symlink
    ``path`` is followed: the folder it points to is replaced."""
    path = os.path.abspath(os.fspath(path))
    if os.path.islink(path):
        path = os.path.realpath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{path} exists and is not a folder: pick a folder name for the adapter")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    try:
        if os.path.isdir(path):
            shutil.copytree(path, tmp, symlinks=True, dirs_exist_ok=True, copy_function=_link_or_copy,
                            ignore=lambda folder, names: [n for n in names if folder == path and n in owned])
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it owner-only
        fault_point("folder.filled")
        _switch(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the unused new folder, or the replaced old one


def _switch(new: str, path: str) -> None:
    """Put folder ``new`` under the name ``path``; afterwards ``new`` holds what was replaced
    (or nothing)."""
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    if _exchange(new, path):
        fault_point("folder.swapped")
        return
    parent, name = os.path.split(path)
    old = tempfile.mkdtemp(dir=parent, prefix=f".old-{name}-")
    os.rename(path, os.path.join(old, name))
    fault_point("folder.between")
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(os.path.join(old, name), path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's ``renameat2`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: str, b: str) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one step; False where that is unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def unwritable_folder(path: str | os.PathLike) -> str | None:
    """Why the folder ``path`` could not be created or written into, as ``"<OS error> (<why>)"``
    (None when it can): a file where a folder is needed on the way, a read-only file system, no
    permission. Checked before a command's work; writes nothing (the probe is an unnamed
    temporary file where the OS has them)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{os.strerror(errno.ENOTDIR)} ({path} is a file)"
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{os.strerror(errno.ENOTDIR)} ({existing} is a file)"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{err.strerror} ({existing})"
    return None


def current_umask() -> int:
    """The file-creation mask of this process (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return Path(path)


def atomic_write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as CSV (a header of the first row's keys, ``\n`` line ends) atomically;
    returns ``path``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def read_json(path: str) -> Any:
    """The JSON value in the file at ``path``; a file that is not JSON (or not UTF-8) is the
    user's: ``UserError`` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
