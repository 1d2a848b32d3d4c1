"""Check the graders on a task's own gold answers before trusting them with model outputs.

For every item: the gold answer written in the task's answer syntax must grade correct, and a
wrong answer must grade wrong (another option for multiple choice, a perturbed number for MATH,
another row's answer for free text, another task's reference code for MBPP). Perturbation sets
(``(B)``, ``Option B``, ``The answer.``, ``\\dfrac``, ``$...$``) measure where the official and
robust graders disagree. Multiple-choice items whose option block could not be parsed are listed
with the reason (the robust grader then reads letters only, not option texts). ``reflectevo
check-graders`` prints the report; the test suite asserts it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from reflectevo.tasks.base import Item, Task
from reflectevo.tasks.text import LETTERS, options_problem, squad_normalize

ACTION_PREFIX = "Thought: I have worked it out.\nAction: "


def as_output(task: Task, answer: str) -> str:
    """A minimal attempt whose action states ``answer`` in the task's syntax."""
    return ACTION_PREFIX + task.render_answer(answer)


def is_choice(item: Item) -> bool:
    return item.task == "logiqa" or item.metadata.get("answer_type") == "choice"


def n_choices(item: Item) -> int:
    return 4 if item.task == "logiqa" else len(item.options)


def perturb_number(answer: str, which: int = 0) -> str:
    """Change one number in a MATH answer by one: the first by default (``\\frac{1}{2}`` -> ``\\frac{2}{2}``).

    The first number is the value itself more often than the last, which can sit in a unit
    (``864 \\mbox{ inches}^2``) or a number base (``443_5``).
    """
    matches = list(re.finditer(r"\d+", answer))
    if not matches:
        return answer + "+1"
    number = matches[which]
    return answer[: number.start()] + str(int(number.group()) + 1) + answer[number.end() :]


def wrong_answer(task: Task, item: Item, items: list[Item], position: int) -> str:
    """An answer that must grade wrong under both graders."""
    if is_choice(item):
        letters = LETTERS[: n_choices(item)]
        return letters[(letters.index(item.gold.upper()) + 1) % len(letters)]
    if task.name == "math":
        return perturb_number(item.gold)
    if task.name == "mbpp":
        return items[(position + 1) % len(items)].gold
    # free text: the next row whose gold differs after SQuAD normalisation (golds repeat: "yes")
    own = squad_normalize(item.gold)
    for step in range(1, len(items)):
        other = items[(position + step) % len(items)]
        if other.metadata.get("answer_type") == "free" and squad_normalize(other.gold) != own:
            return other.gold
    raise ValueError(f"no free-text row with a different answer than item {item.id}")


def letter_variants(item: Item) -> dict[str, str]:
    letter = item.gold.upper()
    variants = {
        "(B)": f"({letter})",
        "B.": f"{letter}.",
        "Option B": f"Option {letter}",
        "B)": f"{letter})",
        "' B '": f" {letter} ",
    }
    if item.options:
        text = item.options[LETTERS.index(letter)]
        variants["B. text"] = f"{letter}. {text}"
        variants["option text"] = text
    return variants


def free_text_variants(item: Item) -> dict[str, str]:
    gold = item.gold
    return {
        "UPPER CASE": gold.upper(),
        "The + answer": f"The {gold}",
        "answer + '.'": f"{gold}.",
        "quoted": f'"{gold}"',
        "extra spaces": f"  {gold}  ",
    }


def math_variants(item: Item) -> dict[str, str]:
    gold = item.gold
    variants = {"$...$": f"${gold}$", "x = answer": f"x = {gold}", "spaces": f" {gold} "}
    if "\\frac" in gold:
        variants["\\dfrac"] = gold.replace("\\frac", "\\dfrac")
    if re.fullmatch(r"-?\d+", gold):
        variants["n.0"] = f"{gold}.0"
    fraction = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if fraction and int(fraction.group(3)) in (2, 4, 5, 8, 10, 20, 25, 50, 100):
        sign, top, bottom = fraction.groups()
        variants["decimal"] = sign + repr(int(top) / int(bottom))
    return variants


def variants_for(task: Task, item: Item) -> dict[str, str]:
    if is_choice(item):
        return letter_variants(item)
    if task.name == "math":
        return math_variants(item)
    if task.name == "mbpp":
        return {}
    return free_text_variants(item)


def check_graders(task: Task, items: list[Item], sandbox: Any = None) -> dict[str, Any]:
    """Gold, wrong-answer and perturbation sweeps over ``items`` under both graders."""
    gold_outputs = [as_output(task, item.gold) for item in items]
    wrong_outputs = [as_output(task, wrong_answer(task, item, items, i)) for i, item in enumerate(items)]
    report: dict[str, Any] = {
        "task": task.name,
        "items": len(items),
        "graders": {},
        "perturbations": {},
        "options_unparsed": options_unparsed(items),
    }
    for grader in ("official", "robust"):
        gold = task.grade_many(items, gold_outputs, grader, sandbox)
        wrong = task.grade_many(items, wrong_outputs, grader, sandbox)
        report["graders"][grader] = {
            "gold_outcomes": dict(Counter(v.outcome for v in gold)),
            "gold_not_correct": [item.id for item, v in zip(items, gold) if not v.correct],
            # of those, the ones that ran out of time: how fast the machine is, not what the grader accepts
            "gold_not_correct_timeouts": [item.id for item, v in zip(items, gold) if v.outcome == "timeout"],
            "wrong_outcomes": dict(Counter(v.outcome for v in wrong)),
            "wrong_graded_correct": [item.id for item, v in zip(items, wrong) if v.correct],
        }
    table: dict[str, dict[str, int]] = {}
    for item in items:
        for kind, answer in variants_for(task, item).items():
            row = table.setdefault(kind, {"cases": 0, "official": 0, "robust": 0, "disagree": 0})
            verdicts = task.grade_both(item, as_output(task, answer), sandbox)
            row["cases"] += 1
            row["official"] += verdicts["official"].correct
            row["robust"] += verdicts["robust"].correct
            row["disagree"] += verdicts["official"].correct != verdicts["robust"].correct
    report["perturbations"] = table
    return report


def options_unparsed(items: list[Item]) -> list[dict[str, str]]:
    """The multiple-choice items without parsed option texts, each with the reason."""
    return [
        {"id": item.id, "reason": options_problem(item.question, expected=n_choices(item)) or "options not parsed"}
        for item in items
        if is_choice(item) and not item.options
    ]


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['task']}: {report['items']} items"]
    for grader, stats in report["graders"].items():
        gold_ok = stats["gold_outcomes"].get("correct", 0)
        lines.append(
            f"  {grader:8s} gold graded correct {gold_ok}/{report['items']} {stats['gold_outcomes']}; "
            f"wrong answers graded correct {len(stats['wrong_graded_correct'])}"
        )
        if stats["gold_not_correct"]:
            lines.append(f"           gold not correct: {', '.join(stats['gold_not_correct'][:20])}")
    for row in report.get("options_unparsed", []):
        lines.append(f"  options not parsed, item {row['id']}: {row['reason']}")
    if report["perturbations"]:
        lines.append(f"  {'perturbation':16s} {'cases':>6s} {'official':>9s} {'robust':>7s} {'disagree':>9s}")
        for kind, row in report["perturbations"].items():
            lines.append(f"  {kind:16s} {row['cases']:6d} {row['official']:9d} {row['robust']:7d} {row['disagree']:9d}")
    return "\n".join(lines)
