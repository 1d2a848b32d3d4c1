"""The graders against all 2,000 official test items: gold answers, wrong answers, reformatted answers.

Skipped (with the reason) when the official files are absent, a failure under
REFLECTEVO_REQUIRE_FULL_TESTS=1. `reflectevo check-graders` prints the same report.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from reflectevo.reflection.released import infer_task
from reflectevo.tasks import TASKS
from reflectevo.tasks.selfcheck import check_graders, format_report, wrong_answer


@pytest.fixture(scope="session")
def reports(official_items, sandbox):
    reports = {name: check_graders(task, official_items[name], sandbox) for name, task in TASKS.items()}
    for report in reports.values():
        print(format_report(report))  # shown with `pytest -s`, and in the CI log on failure
    return reports


@pytest.mark.parametrize("task", ["logiqa", "math", "bigbench"])
def test_every_gold_answer_grades_correct(reports, task):
    for grader in ("official", "robust"):
        stats = reports[task]["graders"][grader]
        assert stats["gold_outcomes"] == {"correct": 500}, (grader, stats["gold_not_correct"][:10])


def seconds_to_run_plainly(item) -> float:
    """Wall seconds the item's reference solution and tests take in a plain Python process (no sandbox)."""
    program = "\n".join([item.setup_code, item.gold, *item.tests])
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", program], check=True, capture_output=True, timeout=120)
    return time.perf_counter() - started


def test_mbpp_reference_solutions_fail_exactly_where_expected(reports, official_items):
    # The official harness ignores test_setup_code, so task 367's own solution fails its tests.
    official, robust = reports["mbpp"]["graders"]["official"], reports["mbpp"]["graders"]["robust"]
    # A time-out is a property of the machine, not of the grader: task 123's reference solution needs about
    # the whole 5 s budget on a 2-core machine, and more on a busy one. A reference solution that timed out
    # must be one that is slow on its own, outside the sandbox; no other outcome is allowed.
    timed_out = [grade["gold_not_correct_timeouts"] for grade in (official, robust)]
    by_id = {item.id: item for item in official_items["mbpp"]}
    for item_id in set(timed_out[0]) | set(timed_out[1]):
        assert seconds_to_run_plainly(by_id[item_id]) > 2.0, (
            f"task {item_id} timed out in the sandbox but runs fast alone"
        )
    assert [i for i in official["gold_not_correct"] if i not in timed_out[0]] == ["367"]
    assert official["gold_outcomes"].get("wrong") == 1 and set(official["gold_outcomes"]) <= {
        "correct",
        "wrong",
        "timeout",
    }
    assert [i for i in robust["gold_not_correct"] if i not in timed_out[1]] == []
    assert set(robust["gold_outcomes"]) <= {"correct", "timeout"}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_wrong_answer_grades_wrong(reports, task):
    for grader in ("official", "robust"):
        stats = reports[task]["graders"][grader]
        assert stats["wrong_graded_correct"] == [], (grader, stats["wrong_graded_correct"][:10])
        assert "correct" not in stats["wrong_outcomes"]


LETTER_VARIANTS = ["(B)", "B.", "Option B", "B)", "' B '", "B. text", "option text"]


def test_option_letter_perturbations(reports):
    """The official rule accepts none of these forms of the right letter; the robust one accepts them."""
    expected = {
        # option texts exist for 496 LogiQA items: 4 have a malformed option block (see below)
        "logiqa": {kind: 500 for kind in LETTER_VARIANTS[:5]} | {"B. text": 496, "option text": 496},
        "bigbench": {kind: 356 for kind in LETTER_VARIANTS},
    }
    for task, cases in expected.items():
        table = reports[task]["perturbations"]
        for kind, count in cases.items():
            assert table[kind]["cases"] == count and table[kind]["official"] == 0, (task, kind)
    assert all(reports["bigbench"]["perturbations"][kind]["robust"] == 356 for kind in LETTER_VARIANTS)
    assert all(reports["logiqa"]["perturbations"][kind]["robust"] == 500 for kind in LETTER_VARIANTS[:5])
    assert reports["logiqa"]["perturbations"]["B. text"]["robust"] == 496
    # one LogiQA option text itself starts with "A.B and C ...", which reads as the letter A
    assert reports["logiqa"]["perturbations"]["option text"]["robust"] == 495


def test_logiqa_option_blocks_that_cannot_be_parsed_are_listed_with_the_reason(reports, official_items):
    """17 questions list their options as A, C, B, D and are parsed; these 4 are malformed in the file."""
    assert reports["logiqa"]["options_unparsed"] == [
        {"id": "46", "reason": "no option line for A (option lines: B, C, D)"},  # "A All American ..." has no dot
        {"id": "113", "reason": "no option line for A (option lines: B, C)"},  # options A and D run into the text
        {"id": "441", "reason": "no option lines of the form 'A. text'"},  # "A Shannan", "B Jiangnan", ...
        {"id": "451", "reason": "no option lines of the form 'A. text'"},
    ]
    assert reports["bigbench"]["options_unparsed"] == []
    # row 68 lists A.F, C.J, B.G, D.N: each text belongs to the letter written before it
    assert official_items["logiqa"][67].options == ["F", "G", "J", "N"]


def test_free_text_perturbations(reports):
    table = reports["bigbench"]["perturbations"]
    assert table["UPPER CASE"] == {"cases": 144, "official": 144, "robust": 144, "disagree": 0}
    for kind in ("The + answer", "answer + '.'", "quoted", "extra spaces"):
        assert table[kind] == {"cases": 144, "official": 0, "robust": 144, "disagree": 144}, kind


def test_math_perturbations(reports):
    table = reports["math"]["perturbations"]
    assert table["$...$"] == {"cases": 500, "official": 0, "robust": 500, "disagree": 500}
    assert table["spaces"]["official"] == table["spaces"]["robust"] == 500
    assert table["\\dfrac"]["official"] == table["\\dfrac"]["robust"] == table["\\dfrac"]["cases"] == 67
    assert table["n.0"] == {"cases": 312, "official": 0, "robust": 312, "disagree": 312}
    assert table["decimal"] == {"cases": 22, "official": 4, "robust": 22, "disagree": 18}
    assert table["x = answer"]["official"] == 493 and table["x = answer"]["robust"] == 496


@pytest.mark.parametrize("name", list(TASKS))
def test_a_thought_that_quotes_the_rejected_answer_does_not_count(official_items, name):
    """A second attempt restates its rejected first answer in the thought; only the action is graded.
    MBPP is checked by extraction (the code that would run), the others by full task."""
    task, items = TASKS[name], official_items[name]
    for position, item in enumerate(items):
        right = task.render_answer(item.gold)
        rejected = task.render_answer(wrong_answer(task, item, items, position))
        output = f"Thought: My previous answer {rejected} was wrong. Let me redo it.\nAction: {right}"
        reverse = f"Thought: Earlier I wrote {right}, but I now think otherwise.\nAction: {rejected}"
        for grader in ("official", "robust"):
            if task.needs_code_execution:
                assert task.extract(output, grader, item).answer.strip() == item.gold.strip(), (grader, item.id)
                assert task.extract(reverse, grader, item).answer.strip() != item.gold.strip(), (grader, item.id)
                continue
            assert task.grade(item, output, grader).correct, (grader, item.id)
            assert not task.grade(item, reverse, grader).correct, (grader, item.id)


def test_released_rows_infer_the_task_of_every_official_question(official_items):
    """The released files carry no task name: the question's shape must tell LogiQA from BIG-bench,
    free-text BIG-bench questions (no options at all) included."""
    attempt = "Thought: I have worked it out.\nAction: Finish[A]"
    for task in ("logiqa", "bigbench"):
        inferred = [infer_task(attempt, item.question) for item in official_items[task]]
        assert inferred == [task] * 500, [
            item.id for item, name in zip(official_items[task], inferred) if name != task
        ][:10]
