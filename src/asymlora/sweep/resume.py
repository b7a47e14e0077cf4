"""Going on with an interrupted sweep (``--resume``): every finished job is kept, only the
unfinished ones are redone, and the sweep ends with the records an uninterrupted one would have
(docs/design.md).

While a sweep runs, its partial ``results.json`` holds a *journal* — the outcome of every
finished job (a whole run, or a pilot's segment up to a rung) in the order they finished — and
three *fingerprints*: of the protocol's settings, of the data splits' contents and of the model
(config and weight files). ``--resume`` refuses, in one line, when any of them differs now;
otherwise the journal is replayed (:class:`Journal`: a job already done is not computed again,
its saved outcome is booked instead) and every other job runs as usual — a pilot paused at a
rung continues from its checkpoint under ``<output_dir>/runs/<sweep id>/``. The schedule's decisions depend
only on the outcomes, never on the order they arrive in, so a resumed sweep ends equal to an
uninterrupted one."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from asymlora.errors import UserError

__all__ = ["fingerprint", "settings_fingerprint", "data_fingerprint", "model_fingerprint", "Journal",
           "load_partial", "check_fingerprints"]

# weight files of a model folder (a model's fingerprint: these and its config.json)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def fingerprint(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def settings_fingerprint(cfg: Any, ignore: Iterable[str] = ()) -> str:
    """The protocol's settings: every field of the config dataclass ``cfg`` except ``ignore``
    (where the sweep runs and how it shows progress, which do not change a record)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in set(ignore)}
    return fingerprint(fields)


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(str(k).encode() + b":")
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for x in obj:
            _feed(h, x)
        h.update(b"]")
    elif hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a tensor
        arr = obj.detach().cpu().contiguous().numpy()
        h.update(f"T{arr.dtype}{arr.shape}".encode() + arr.tobytes())
    elif hasattr(obj, "tobytes") and hasattr(obj, "dtype"):  # a numpy array
        h.update(f"A{obj.dtype}{obj.shape}".encode() + obj.tobytes())
    else:
        h.update(repr(obj).encode())


def data_fingerprint(*splits: Any) -> str:
    """sha256 of the contents of the data splits (each a sequence of examples or batches:
    dicts, lists, tensors, numbers, strings), in order."""
    h = hashlib.sha256()
    for split in splits:
        h.update(b"|")
        for i in range(len(split)):
            _feed(h, split[i])
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """sha256 of a model folder's config.json and weight files (names and contents)."""
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(path) if n == "config.json" or n.endswith(_WEIGHT_SUFFIXES))
    for name in names:
        h.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _job_key(job: Any) -> list[Any]:
    return [job.spec.label, job.seed, job.lr, job.pilot, job.until, job.resume]


class Journal:
    """The outcome of every finished job, in the order they finished (saved in results.json).
    Built from a saved journal, it hands the saved outcomes back once each (``take``) so that a
    resumed sweep does not compute them again (``asymlora.sweep.engine.run_jobs``)."""

    def __init__(self, entries: Iterable[dict[str, Any]] = ()) -> None:
        self.entries = list(entries)
        self._saved = {json.dumps(e["job"]): e["outcome"] for e in self.entries}
        self.replayed = 0

    def take(self, job: Any) -> tuple[Any, ...] | None:
        """The saved outcome of ``job`` (once), or None when it has to run."""
        outcome = self._saved.pop(json.dumps(_job_key(job)), None)
        if outcome is None:
            return None
        self.replayed += 1
        return tuple(outcome)

    def add(self, job: Any, outcome: Any) -> None:
        self.entries.append({"job": _job_key(job), "outcome": list(outcome)})

    def to_json(self) -> list[dict[str, Any]]:
        return self.entries


def load_partial(output_dir: str) -> dict[str, Any]:
    """The saved partial results of an interrupted sweep in ``output_dir`` (``results.json``, or
    ``results.partial.json`` beside an earlier complete sweep: ``asymlora.sweep.outdir``);
    UserError when there is none, or when it finished."""
    from asymlora.sweep.outdir import RESULTS, partial_results

    path = partial_results(output_dir) or os.path.join(output_dir, RESULTS)
    if not os.path.isfile(path):
        raise UserError(f"--resume: {path} does not exist; nothing to resume (run without --resume)")
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"--resume: {path} is not readable JSON ({err})") from None
    if saved.get("complete"):
        raise UserError(f"--resume: the sweep in {output_dir} finished already (results.json is complete); "
                        "nothing to resume")
    if "journal" not in saved or "fingerprints" not in saved:
        raise UserError(f"--resume: {path} holds no journal of finished runs (written by an older version); "
                        "run without --resume")
    return saved


_WHAT = {"settings": "the protocol's settings", "data": "the data", "model": "the model"}


def check_fingerprints(saved: dict[str, str], now: dict[str, str], output_dir: str) -> None:
    """UserError naming what differs between the saved sweep and this one (only the keys of
    ``now`` are compared)."""
    bad = [_WHAT.get(k, k) for k in now if saved.get(k) != now[k]]
    if bad:
        raise UserError(f"--resume: {' and '.join(bad)} differ from those of the sweep saved in {output_dir}; "
                        "resume with the same flags, data and model, or start over without --resume")
