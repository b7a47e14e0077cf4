"""No message or docstring sends the user to a name that does not exist: every ``asymlora.NAME``
(or ``asymlora.pkg.NAME``) written in a string or docstring under src/ is imported and resolved
(an attribute of the package, or a submodule)."""
from __future__ import annotations

import importlib
import os
import re
import tokenize

import asymlora

SRC = os.path.dirname(os.path.abspath(asymlora.__file__))
DOTTED = re.compile(r"\basymlora(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
STRINGS = {tokenize.STRING} | ({tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set())


def named_references() -> list[tuple[str, int, str]]:
    """(file, line, dotted name) of every ``asymlora.…`` in a string token of the package."""
    out = []
    for folder, _, files in os.walk(SRC):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as fh:
                    for tok in tokenize.tokenize(fh.readline):
                        if tok.type in STRINGS:
                            out += [(path, tok.start[0], m.group(0)) for m in DOTTED.finditer(tok.string)]
    return out


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ModuleNotFoundError:
            return False
    return True


def test_the_scan_finds_the_names_it_should():
    found = {n for _, _, n in named_references()}
    assert {"asymlora.core.init.fingerprint", "asymlora.sweep.interrupt.ignore_in_worker"} <= found
    assert resolves("asymlora.load_adapter") and not resolves("asymlora.add_adapter")


def test_every_asymlora_name_in_a_string_exists():
    missing = [f"{os.path.relpath(p, SRC)}:{line}: {name}" for p, line, name in named_references()
               if not resolves(name)]
    assert missing == []
