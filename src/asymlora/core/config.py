"""The adapter configuration: which factor trains, how each starts, where adapters go.

An adapted linear map is ``y = W0·x + s·B·(A·x)`` with ``A`` (r×d_in), ``B`` (d_out×r) and
``s = alpha/r`` ("standard") or ``alpha/sqrt(r)`` ("rslora"). ``trainable`` says which factors
are optimised; the other one is frozen at its initial value (docs/design.md §1).

Everything that can be checked without a model is checked in ``__post_init__``; what needs the
model (ranks against layer shapes, targets that match nothing) is checked by ``asymlora.core.inject``
before any module is replaced.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from asymlora.core.init import INITIALIZERS
from asymlora.errors import MissingFileError, UserError
from asymlora.fileio import atomic_write_text

TRAINABLE_CHOICES = ("A", "B", "AB")
SCALING_CHOICES = ("standard", "rslora")

# name -> (trainable, init_A, init_B). Same table as docs/design.md §1.
PRESETS: dict[str, tuple[str, str, str]] = {
    "lora": ("AB", "kaiming", "zero"),
    "b-only": ("B", "orthogonal", "zero"),
    "a-only": ("A", "zero", "orthogonal"),
}


@dataclass
class AsymLoraConfig:
    """Configuration of an asymmetric low-rank adapter.

    Attributes:
        r: rank of the update ``B·A``.
        alpha: scaling numerator; the update is multiplied by ``alpha/r`` (or ``alpha/sqrt(r)``).
        scaling: ``"standard"`` (alpha/r) or ``"rslora"`` (alpha/sqrt(r)).
        dropout: dropout on the adapter input (0 keeps the O(r)-per-token activation memory
            of a frozen A; any other value stores an x-sized mask for backward).
        trainable: which factors are trained: ``"B"`` (ours), ``"A"``, or ``"AB"`` (standard LoRA).
        init_A, init_B: initialiser names from ``asymlora.core.init.INITIALIZERS``.
        seed: global seed; each factor's generator is seeded by (seed, layer name, factor).
        target_modules: ``None`` (per-architecture default), a list of module names (a name
            matches a module whose qualified name equals it or ends with ``.name``), a regular
            expression string (full match against the qualified name), or ``"all-linear"``.
        modules_to_save: modules (by name, same matching as a list of targets) kept fully
            trainable and stored with the adapter, e.g. a new classification head.
        rank_pattern, alpha_pattern: per-layer overrides ``{pattern: value}``; a pattern is a
            regular expression searched at a module-name boundary (``"layer\\.0\\."`` etc.).
    """

    r: int = 8
    alpha: float = 16.0
    scaling: str = "standard"
    dropout: float = 0.0
    trainable: str = "B"
    init_A: str = "orthogonal"
    init_B: str = "zero"
    seed: int = 0
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AsymLoraConfig:
        """A named strategy: ``lora``, ``b-only`` or ``a-only`` (docs/design.md §1), with overrides.

        ``alpha`` defaults to ``2r`` as in the paper's experiments.
        """
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        trainable, init_a, init_b = PRESETS[name]
        values: dict[str, Any] = {"trainable": trainable, "init_A": init_a, "init_B": init_b}
        values.update(overrides)
        if "alpha" not in overrides:
            values["alpha"] = 2.0 * values.get("r", cls.r)
        return cls(**values)

    def replace(self, **changes: Any) -> AsymLoraConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ per-layer values
    def rank_for(self, module_name: str) -> int:
        return int(_pattern_lookup(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_lookup(self.alpha_pattern, module_name, self.alpha))

    def scaling_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.scaling == "rslora" else alpha / r

    @property
    def trains_A(self) -> bool:
        return "A" in self.trainable

    @property
    def trains_B(self) -> bool:
        return "B" in self.trainable

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Reject every combination that cannot work, naming the field, value and what is allowed."""
        _check_int("r", self.r, minimum=1)
        _check_number("alpha", self.alpha)
        if self.alpha <= 0:
            raise UserError(f"alpha must be > 0, got {self.alpha!r}")
        if self.scaling not in SCALING_CHOICES:
            raise UserError(f"scaling must be one of {SCALING_CHOICES}, got {self.scaling!r}")
        _check_number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.trainable not in TRAINABLE_CHOICES:
            raise UserError(f"trainable must be one of {TRAINABLE_CHOICES}, got {self.trainable!r}")
        for field_name in ("init_A", "init_B"):
            value = getattr(self, field_name)
            if value not in INITIALIZERS:
                raise UserError(
                    f"{field_name}={value!r} is not a known initialiser; valid: {', '.join(sorted(INITIALIZERS))}"
                )
        _check_int("seed", self.seed, minimum=0)
        if self.init_A == "zero" and self.init_B == "zero":
            raise UserError(
                "init_A='zero' and init_B='zero': both factors start at zero, so every gradient of "
                "B·A is zero and nothing can learn; give the frozen (or one) factor a non-zero init"
            )
        if not self.trains_A and self.init_A == "zero":
            raise UserError(
                f"trainable={self.trainable!r} freezes A but init_A='zero': the update B·A would stay zero; "
                "use init_A='orthogonal' (or kaiming/gaussian/svd)"
            )
        if not self.trains_B and self.init_B == "zero":
            raise UserError(
                f"trainable={self.trainable!r} freezes B but init_B='zero': the update B·A would stay zero; "
                "use init_B='orthogonal' (or kaiming/gaussian/svd)"
            )
        self._validate_targets()
        if isinstance(self.modules_to_save, str):
            raise UserError(
                f"modules_to_save must be a list of module names, got the string {self.modules_to_save!r}"
            )
        self.modules_to_save = list(self.modules_to_save or [])
        for name in self.modules_to_save:
            if not isinstance(name, str) or not name:
                raise UserError(f"modules_to_save entries must be non-empty strings, got {name!r}")
        for attr, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            mapping = getattr(self, attr)
            if not isinstance(mapping, Mapping):
                raise UserError(f"{attr} must be a dict {{pattern: value}}, got {type(mapping).__name__}")
            for pattern, value in mapping.items():
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise UserError(f"{attr} key {pattern!r} is not a valid regular expression: {err}") from None
                if kind is int:
                    _check_int(f"{attr}[{pattern!r}]", value, minimum=1)
                else:
                    _check_number(f"{attr}[{pattern!r}]", value)
                    if value <= 0:
                        raise UserError(f"{attr}[{pattern!r}] must be > 0, got {value!r}")

    def _validate_targets(self) -> None:
        targets = self.target_modules
        if targets is None or targets == "all-linear":
            return
        if isinstance(targets, str):
            if not targets:
                raise UserError("target_modules is an empty string; give names, a regex, 'all-linear' or None")
            try:
                re.compile(targets)
            except re.error as err:
                raise UserError(f"target_modules regex {targets!r} does not compile: {err}") from None
            return
        if not isinstance(targets, (list, tuple)):
            raise UserError(
                f"target_modules must be None, a list of names, a regex string or 'all-linear', "
                f"got {type(targets).__name__}"
            )
        if not targets:
            raise UserError("target_modules is an empty list: nothing would be adapted")
        for name in targets:
            if not isinstance(name, str) or not name:
                raise UserError(f"target_modules entries must be non-empty strings, got {name!r}")
        self.target_modules = list(targets)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AsymLoraConfig:
        """The inverse of :meth:`to_dict`. Also reads the dicts that asymlora 0.1.0 wrote into
        adapter folders (format version 1), where ``trainable`` was stored under the key
        ``"train"``; :meth:`to_dict` writes ``"trainable"``."""
        data = dict(data)
        if "train" in data:
            if "trainable" in data:
                raise UserError("the config has both 'train' (format version 1) and 'trainable'; keep 'trainable'")
            data["trainable"] = data.pop("train")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown AsymLoraConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**dict(data))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> AsymLoraConfig:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            if not os.path.isfile(text_or_path):
                raise MissingFileError(f"{text}: no such config file (give a JSON file or a JSON string)")
            with open(text_or_path, encoding="utf-8") as fh:
                text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{text_or_path}: not valid JSON: {err}") from None
        return cls.from_dict(data)


def pattern_matches(pattern: str, module_name: str) -> bool:
    """A per-layer override pattern matches at a name boundary (``layer\\.0`` hits
    ``encoder.layer.0.attention.self.query``) or as a full regular-expression match."""
    return bool(re.search(rf"(^|\.){pattern}($|\.)", module_name) or re.fullmatch(pattern, module_name))


def _pattern_lookup(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """First pattern (in insertion order) that matches wins."""
    for pattern, value in patterns.items():
        if pattern_matches(pattern, module_name):
            return value
    return default


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise UserError(f"{name} must be finite, got {value!r}")
