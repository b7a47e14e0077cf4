"""The package's layout holds (docs/design.md §3): no module inside the package imports the
package facade, no private name crosses a module boundary, and the facade stays small. The
layer order itself is the import-linter contract in pyproject.toml (``lint-imports`` in CI)."""
from __future__ import annotations

import ast
import importlib
import pathlib

import asymlora

SRC = pathlib.Path(asymlora.__file__).parent


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def _absolute(path: pathlib.Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = ["asymlora", *path.relative_to(SRC).parts[:-1]]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def test_no_module_imports_the_package_facade():
    offenders = []
    for path, tree in _modules():
        if path == SRC / "__init__.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "asymlora" for a in node.names):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} import asymlora")
            if isinstance(node, ast.ImportFrom) and _absolute(path, node) == "asymlora":
                names = [a.name for a in node.names]
                submodules = [n for n in names if (SRC / n).is_dir() or (SRC / f"{n}.py").is_file()]
                if names != submodules:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} from asymlora import {names}")
    assert offenders == []


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _absolute(path, node).startswith("asymlora"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {private}")
    assert offenders == []


def test_the_facade_is_the_daily_path_and_every_name_resolves():
    assert len(asymlora.__all__) <= 15, asymlora.__all__
    for name in asymlora.__all__:
        assert getattr(asymlora, name) is not None
    adapters = importlib.import_module("asymlora.adapters")
    for name in adapters.__all__:
        assert getattr(adapters, name) is not None
    # the daily path's verbs are where the README's quick start says
    for name in ("wrap", "fit", "TrainArgs", "save_adapter", "load_adapter", "export_peft", "import_peft"):
        assert name in asymlora.__all__


def test_no_source_file_cites_a_document_outside_the_repository():
    cited = [str(p.relative_to(SRC)) for p, _ in _modules() if "DESIGN.md" in p.read_text(encoding="utf-8")]
    assert cited == []
