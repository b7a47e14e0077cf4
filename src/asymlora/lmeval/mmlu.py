"""MMLU (Hendrycks et al., 2021) as lm-evaluation-harness 0.4.13 scores it (task group ``mmlu``,
``tasks/mmlu/default``): the 57 subjects' ``test`` splits, k-shot examples taken as the first k
rows of the subject's ``dev`` split (sampler ``first_n``), and the subjects grouped into
lm-eval's four categories (its ``mmlu`` group nests them; the group's error pools over the
subjects).

Prompt of one item, k shots (``description`` + k solved examples + the question)::

    The following are multiple choice questions (with answers) about <subject words>.\\n\\n
    <dev question 1>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: <letter>\\n\\n
    ...
    <question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

scored by the log-likelihood of each continuation " A" .. " D".
"""
from __future__ import annotations

from typing import Any

LETTERS = ("A", "B", "C", "D")
SPLIT = "hails/mmlu_no_train/{subject}/{split}"

# the category of each subject, as the ``tag`` of lm-eval's per-subject YAML files
CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
        "high_school_physics", "high_school_statistics", "machine_learning",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
        "world_religions",
    ),
}
SUBJECTS: tuple[str, ...] = tuple(sorted(s for group in CATEGORIES.values() for s in group))
CATEGORY_OF: dict[str, str] = {s: c for c, group in CATEGORIES.items() for s in group}


def description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_text(row: dict[str, Any]) -> str:
    """lm-eval's ``doc_to_text``: the stripped question, the four lettered options, "Answer:"."""
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    return f"{row['question'].strip()}{options}\nAnswer:"


def context(subject: str, row: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """The full prompt: description, each shot answered (target delimiter " ", few-shot
    delimiter a blank line), then the question."""
    solved = "".join(f"{question_text(s)} {LETTERS[s['answer']]}\n\n" for s in shots)
    return description(subject) + solved + question_text(row)
