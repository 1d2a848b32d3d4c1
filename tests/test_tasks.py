"""Extraction and grading rules of each task, on hand-written outputs shaped like a model's."""

from __future__ import annotations

import pytest

from reflectevo.errors import CodeExecutionNotAllowed, UnknownTaskError
from reflectevo.prompts import join_two_calls, one_stage_completion, split_one_stage
from reflectevo.tasks import (
    GRADERS,
    OUTCOMES,
    TASKS,
    Item,
    check_code_execution,
    get_task,
    register_task,
    task_names,
)
from reflectevo.tasks.base import action_part
from reflectevo.tasks.math import (
    hendrycks_equal,
    hendrycks_normalize,
    last_boxed,
    unbox,
)
from reflectevo.tasks.text import (
    options_problem,
    parse_options,
    read_option_extraction,
    read_option_letter,
    squad_normalize,
    token_f1,
)

LOGIQA_QUESTION = "Passage.\nWhich must be true?\nA.Red wins.\nB.Blue wins.\nC.Nobody wins.\nD.Both win."


def logiqa_item(gold: str = "b") -> Item:
    return get_task("logiqa").item_from_answer(gold, LOGIQA_QUESTION)


def grade(task: str, item: Item, text: str) -> dict[str, str]:
    verdicts = get_task(task).grade_both(item, text)
    return {grader: verdict.outcome for grader, verdict in verdicts.items()}


# ---- registry --------------------------------------------------------------------------------


def test_registry_lists_the_four_tasks():
    assert task_names() == ["bigbench", "logiqa", "math", "mbpp"]
    for name, task in TASKS.items():
        assert task.name == name and task.version and len(task.fewshots) == 3
        assert task.answer_format and task.invalid_hint and task.official_file.endswith("_test.jsonl")


def test_unknown_task_lists_known_names():
    with pytest.raises(UnknownTaskError) as error:
        get_task("gsm8k")
    assert "gsm8k" in str(error.value) and "bigbench, logiqa, math, mbpp" in str(error.value)


def test_register_task_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_task(get_task("math"))


def test_code_execution_needs_opt_in_before_anything_runs():
    check_code_execution(["logiqa", "math"], allowed=False)  # nothing to run: fine
    check_code_execution(["mbpp"], allowed=True)
    with pytest.raises(CodeExecutionNotAllowed, match="mbpp"):
        check_code_execution(["logiqa", "mbpp"], allowed=False)


def test_mbpp_grading_without_a_sandbox_is_refused():
    item = get_task("mbpp").load_samples("train")[0]
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_execution"):
        get_task("mbpp").grade(item, "[BEGIN]\ndef square(n): return n*n\n[END]")


def test_unknown_grader_is_rejected():
    with pytest.raises(ValueError, match="official, robust"):
        get_task("logiqa").grade(logiqa_item(), "Finish[B]", grader="lenient")


def test_fewshot_actions_parse_with_their_own_task_rules():
    for name in task_names():
        task = get_task(name)
        for shot in task.fewshots:
            assert task.extract(f"Thought: {shot.thought}\nAction: {shot.action}").ok, (name, shot.action)


# ---- LogiQA and the option letters -----------------------------------------------------------


@pytest.mark.parametrize(
    "output, official, robust",
    [
        ("Thought: ...\nAction: Finish[B]", "correct", "correct"),
        ("Action: Finish[b]", "correct", "correct"),  # the official match ignores case
        ("Action: Finish[(B)]", "wrong", "correct"),
        ("Action: Finish[B.]", "wrong", "correct"),
        ("Action: Finish[B. Blue wins.]", "wrong", "correct"),
        ("Action: Finish[Option B]", "wrong", "correct"),
        ("Action: Finish[ B ]", "wrong", "correct"),  # the official rule does not strip
        ("Action: Finish[Blue wins]", "wrong", "correct"),  # the option's own text
        ("Action: Finish[A]", "wrong", "wrong"),
        ("Action: Finish[A and B]", "wrong", "parse_failure"),  # two letters: not an answer
        ("Action: Finish[E]", "wrong", "wrong"),  # a letter that is no option: an answer, a wrong one
        ("Action: Finish[(E)]", "wrong", "wrong"),
        ("The answer is B.", "parse_failure", "parse_failure"),  # no action at all
        ("Thought: It is B, so Finish[B].", "parse_failure", "correct"),  # no action line: robust reads it all
        ("Action: Finish[]", "parse_failure", "parse_failure"),
        ("Action: Finish[B", "correct", "correct"),  # no closing bracket: the rest of the text, as the paper
    ],
)
def test_logiqa_official_and_robust(output, official, robust):
    assert grade("logiqa", logiqa_item("b"), output) == {"official": official, "robust": robust}


def test_first_finish_counts():
    assert grade("logiqa", logiqa_item("b"), "Action: Finish[B] or maybe Finish[C]")["official"] == "correct"
    assert grade("logiqa", logiqa_item("b"), "Action: Finish[C] or maybe Finish[B]")["official"] == "wrong"


def test_parse_failure_is_its_own_outcome_with_the_hint():
    verdict = get_task("logiqa").grade(logiqa_item(), "I am not sure.")
    assert verdict.outcome == "parse_failure" and not verdict.correct
    assert verdict.extracted is None and "Finish[" in verdict.feedback
    assert set(OUTCOMES) == {"correct", "wrong", "parse_failure", "timeout"} and GRADERS == ("official", "robust")


def test_verdict_feedback_is_the_official_observation():
    task = get_task("logiqa")
    assert task.grade(logiqa_item(), "Action: Finish[B]").feedback == "Answer is CORRECT"
    assert task.grade(logiqa_item(), "Action: Finish[C]").feedback == "Answer is INCORRECT"


def test_an_out_of_range_letter_is_a_wrong_answer_with_the_letter_recorded():
    for verdict in get_task("logiqa").grade_both(logiqa_item("b"), "Thought: none fit.\nAction: Finish[E]").values():
        assert (verdict.outcome, verdict.extracted) == ("wrong", "E")
    robust = get_task("bigbench").grade(
        get_task("bigbench").item_from_answer("c", CLAIM), "Action: Finish[D. Maybe]", "robust"
    )
    assert (robust.outcome, robust.extracted, robust.details["method"]) == ("wrong", "D", "letter_not_an_option")
    extraction = read_option_extraction("E", ["w", "x", "y", "z"], 4)
    assert (extraction.answer, extraction.method, extraction.reason) == (
        "E",
        "letter_not_an_option",
        "letter E is not one of the options A-D",
    )
    assert not read_option_extraction("A and B", ["w", "x", "y", "z"], 4).ok  # not one letter: still no answer


def test_read_option_letter_cases():
    options = ["True", "False", "Neither"]
    assert read_option_letter("(c)", options, 3) == ("C", "letter")
    assert read_option_letter("Answer: A", options, 3) == ("A", "letter")
    assert read_option_letter("the answer is B", options, 3) == ("B", "letter")
    assert read_option_letter("neither.", options, 3) == ("C", "option_text")
    assert read_option_letter("apple", options, 3)[0] is None
    assert read_option_letter("D", options, 3) == (None, "letter D is not one of the options A-C")
    # options that are themselves letters (LogiQA puzzles about people named F, G, H, L)
    assert read_option_letter("G", ["F", "G", "H", "L"], 4) == ("B", "option_text")


def test_parse_options():
    assert parse_options(LOGIQA_QUESTION) == ["Red wins.", "Blue wins.", "Nobody wins.", "Both win."]
    assert parse_options("Q\nA. x\nC. y") == []  # a gap in the letters is not guessed
    assert parse_options("Q\nA.x\nB.y", expected=4) == []
    # a passage line that happens to start with "A." before the real options
    assert parse_options("A. Smith said so.\nClaim: c\nOptions:\nA. True\nB. False") == ["True", "False"]


def test_options_written_out_of_order_go_to_their_own_letters():
    # 17 official LogiQA questions list their options as A, C, B, D (e.g. row 68)
    question = "Who speaks right after M?\nA.F\nC.J\nB.G\nD.N"
    assert parse_options(question, expected=4) == ["F", "G", "J", "N"]
    assert options_problem(question, expected=4) is None
    item = get_task("logiqa").item_from_answer("c", question)
    assert grade("logiqa", item, "Thought: J follows M.\nAction: Finish[J]") == {
        "official": "wrong",
        "robust": "correct",
    }
    assert grade("logiqa", item, "Thought: G follows M.\nAction: Finish[G]") == {"official": "wrong", "robust": "wrong"}


def test_options_that_cannot_be_parsed_say_why():
    # the shapes of the four malformed official LogiQA blocks (rows 46, 113, 441, 451)
    assert options_problem(
        "Which must be false?\nA All athletes agree.\nB.Some do.\nC.One does.\nD.Anyone does.", 4
    ) == ("no option line for A (option lines: B, C, D)")
    assert options_problem("Who won?\nA Shannan\nB Jiangnan\nC Shanbei\nD Jiangbei", 4) == (
        "no option lines of the form 'A. text'"
    )
    assert (
        options_problem("Q\nA.x\nB.y\nB.z\nD.w", 4)
        == "option letters A, B, B, D after the last A are not A-D each once"
    )
    assert options_problem("Q\nA.x\nB.y", 4) == "2 options, expected 4"
    assert parse_options("Q\nA.x\nB.y\nB.z\nD.w", 4) == []


# ---- BIG-bench -------------------------------------------------------------------------------

CLAIM = "Passage: p\nClaim: c\nOptions:\nA. True\nB. False\nC. Neither"


def test_bigbench_row_types():
    task = get_task("bigbench")
    choice = task.item_from_answer("c", CLAIM)
    free = task.item_from_answer("the girl", "Story.\n\nQuestion: who?")
    assert choice.metadata["answer_type"] == "choice" and choice.options == ["True", "False", "Neither"]
    assert free.metadata["answer_type"] == "free" and free.options == []


@pytest.mark.parametrize(
    "output, official, robust",
    [
        ("Action: Finish[the girl]", "correct", "correct"),
        ("Action: Finish[The Girl]", "correct", "correct"),
        ("Action: Finish[girl]", "wrong", "correct"),  # articles dropped by SQuAD normalisation
        ("Action: Finish[the girl.]", "wrong", "correct"),
        ("Action: Finish[a boy]", "wrong", "wrong"),
        ("Action: Finish[the [little] girl]", "wrong", "wrong"),  # balanced brackets in robust
    ],
)
def test_bigbench_free_text(output, official, robust):
    item = get_task("bigbench").item_from_answer("the girl", "Story.\n\nQuestion: who?")
    assert grade("bigbench", item, output) == {"official": official, "robust": robust}


def test_bigbench_free_text_robust_feedback_reports_f1():
    item = get_task("bigbench").item_from_answer("the tall girl", "Story.\n\nQuestion: who?")
    verdict = get_task("bigbench").grade(item, "Action: Finish[girl]", "robust")
    assert verdict.outcome == "wrong" and verdict.details["f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert verdict.feedback.startswith("Answer is INCORRECT. F1 Score: 0.6667")
    assert get_task("bigbench").grade(item, "Action: Finish[girl]", "official").feedback == "Answer is INCORRECT"


def test_bigbench_choice_rows():
    item = get_task("bigbench").item_from_answer("c", CLAIM)
    assert grade("bigbench", item, "Action: Finish[Neither]") == {"official": "wrong", "robust": "correct"}
    assert grade("bigbench", item, "Action: Finish[C]") == {"official": "correct", "robust": "correct"}


def test_squad_normalisation_and_f1():
    assert squad_normalize("The  Quick, brown fox!") == "quick brown fox"
    assert token_f1("brown fox", "the quick brown fox") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


# ---- MATH ------------------------------------------------------------------------------------


def math_item(gold: str) -> Item:
    return get_task("math").item_from_answer(gold, "q")


# Equivalent forms under both graders: where the paper's string rule and the symbolic check differ.
MATH_PAIRS = [
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True, True),
    ("\\frac{1}{2}", "0.5", True, True),  # the reference special-cases exactly "0.5"
    ("\\frac{1}{4}", "0.25", False, True),
    ("3", "x=3", True, True),  # a left side of at most two characters is dropped
    ("3", "x = 3", True, True),
    ("\\frac{1}{2}", "\\frac12", True, True),
    ("\\frac{3}{4}", "3/4", True, True),
    ("1000", "1,000", False, True),
    ("5", "\\$5", True, True),
    ("90", "90^\\circ", True, True),
    ("\\sqrt{2}", "\\sqrt2", True, True),
    ("2\\sqrt{2}", "\\sqrt{8}", False, True),
    ("\\frac{\\pi}{2}", "\\pi/2", False, True),
    ("-\\frac{1}{2}", "-0.5", False, True),
    ("6", "6.0", False, True),
    ("x^2+2x", "2x+x^2", False, True),
    ("\\frac{1}{2}", "\\frac{2}{4}", False, True),
    ("(1,2)", "(2,1)", False, False),
    ("12", "13", False, False),
    ("443_5", "443_6", False, False),  # number bases: math-verify would drop the subscript
]


@pytest.mark.parametrize("gold, answer, official, robust", MATH_PAIRS)
def test_math_equivalent_forms(gold, answer, official, robust):
    verdicts = get_task("math").grade_both(math_item(gold), f"Action: Finish<<<{answer}>>>")
    assert (verdicts["official"].correct, verdicts["robust"].correct) == (official, robust)


def test_math_extraction_rules():
    task, item = get_task("math"), math_item("7")
    assert grade("math", item, "Action: Finish<<<7>>>") == {"official": "correct", "robust": "correct"}
    assert grade("math", item, "Action: Finish<<<$7$>>>") == {"official": "wrong", "robust": "correct"}
    assert grade("math", item, "so the answer is \\boxed{7}.") == {"official": "parse_failure", "robust": "correct"}
    assert grade("math", item, "Thought: so the answer is \\boxed{7}.\nAction: \\boxed{7}") == {
        "official": "parse_failure",
        "robust": "correct",
    }
    assert grade("math", item, "Action: Finish[7]") == {"official": "parse_failure", "robust": "correct"}
    assert grade("math", item, "Action: Finish<<<>>>") == {"official": "parse_failure", "robust": "parse_failure"}
    assert task.extract("Action: Finish<<<\\boxed{7}>>>", "robust").method == "finish"


def test_hendrycks_normaliser_rules():
    assert hendrycks_normalize("\\left( 1, 2 \\right)") == "(1,2)"
    assert hendrycks_normalize("10\\%") == "10"
    assert hendrycks_normalize("5 \\text{ cm}") == "5"
    assert hendrycks_normalize(".25") == "0.25"
    assert hendrycks_normalize(".5") == "\\frac{1}{2}"  # then the "0.5" special case applies
    assert hendrycks_normalize("\\frac1{72}") == "\\frac{1}{72}"
    assert hendrycks_normalize("\\tfrac{3}{4}") == "\\frac{3}{4}"
    assert hendrycks_normalize("\\sqrt3") == "\\sqrt{3}"
    assert hendrycks_normalize("abc=3") == "abc=3"  # long left sides stay
    with pytest.raises(ValueError):
        hendrycks_normalize("1 \\text{ and } 2 \\text{ more}")  # the reference asserts one unit marker


def test_hendrycks_equal_falls_back_to_plain_equality_on_errors():
    # "\sqrt" at the very end makes the reference normaliser fail; then only identical strings match
    assert hendrycks_equal("2\\sqrt", "2\\sqrt") is True
    assert hendrycks_equal("2\\sqrt", " 2\\sqrt ") is True  # both sides are stripped first
    assert hendrycks_equal(None, None) is True and hendrycks_equal("1", None) is False
    # the unit rule drops everything after "\text{ ": a known weakness of the official check
    assert hendrycks_equal("19 \\text{ and }43", "19 \\text{ and }44") is True


def test_boxed_answer_extraction_follows_the_official_loader():
    assert unbox(last_boxed("so $x = \\boxed{\\frac{1}{2}}$ and \\boxed{3}")) == "3"
    assert unbox(last_boxed("\\boxed{a{b}c}")) == "a{b}c"
    assert unbox(last_boxed("\\fbox{4}")) is None  # the official loader only unboxes \boxed{
    assert last_boxed("no box") is None and unbox(last_boxed("\\boxed{unclosed")) is None


# ---- MBPP extraction (execution is tested with the sandbox) ------------------------------------


def test_mbpp_extraction_rules():
    task = get_task("mbpp")
    code = "def f(x):\n    return x"
    assert task.extract(f"Action: [BEGIN]\n{code}\n[END]").answer == f"\n{code}\n"
    assert not task.extract(f"Action: [BEGIN]\n{code}").ok  # official needs both markers
    assert task.extract(f"Action: [BEGIN]\n{code}", "robust").method == "begin_unterminated"
    fenced = f"Here you go:\n```python\n{code}\n```"
    assert not task.extract(fenced).ok
    assert task.extract(fenced, "robust").answer.strip() == code
    assert task.extract(f"Action: [BEGIN]\n```python\n{code}\n```\n[END]", "robust").answer.strip() == code
    assert not task.extract("Action: [BEGIN]   [END]").ok
    # a block without an action line: the official grader has no action to parse
    assert task.extract(f"[BEGIN]\n{code}\n[END]").reason == "no action line (no 'Action:' in the output)"
    assert task.extract(f"[BEGIN]\n{code}\n[END]", "robust").fallback == "whole_text"


def test_render_answer_round_trips_through_extract():
    for name, gold in (
        ("logiqa", "c"),
        ("math", "\\frac{1}{3}"),
        ("bigbench", "1930"),
        ("mbpp", "def f():\n    return 1"),
    ):
        task = get_task(name)
        extraction = task.extract("Thought: t\nAction: " + task.render_answer(gold))
        assert extraction.answer.strip() == gold


# ---- answers come from the action, never from the thought -------------------------------------
# A real model restates answers in its thought: the options it weighs, on a second trial the answer
# that was rejected. The paper's agent cuts the thought at "Action:" and parses the action alone.

MATH_GOLD_28 = "What is the sum of all positive divisors of 12?"
BIGBENCH_STORY = "The girl found the key under the mat.\n\nQuestion: Who found the key?"

# (task, gold, question, output whose thought quotes another answer, the answer its action states)
THOUGHT_QUOTES = [
    (
        "logiqa",
        "b",
        LOGIQA_QUESTION,
        "Thought: Finish[A] looks tempting because the passage praises red, but nothing says red wins; "
        "the last sentence rules out C and D, so blue wins.\nAction: Finish[B]",
        "B",
    ),
    (
        "logiqa",
        "b",
        LOGIQA_QUESTION,
        "Thought: My previous answer Finish[A] was wrong. Reading the passage again, only blue can win.\n"
        "Action: Finish[B]",
        "B",
    ),
    (
        "bigbench",
        "c",
        CLAIM,
        "Thought: My previous answer Finish[A] (True) was wrong: the passage never mentions the claim, "
        "so it is neither true nor false.\nAction: Finish[C]",
        "C",
    ),
    (
        "bigbench",
        "the girl",
        BIGBENCH_STORY,
        "Thought: My previous answer Finish[the boy] was wrong; the story says the girl found it.\n"
        "Action: Finish[the girl]",
        "the girl",
    ),
    (
        "math",
        "28",
        MATH_GOLD_28,
        "Thought: My previous answer Finish<<<27>>> was wrong because I left out 1. The divisors are 1, 2, 3, "
        "4, 6 and 12, and their sum is \\boxed{28}.\nAction: Finish<<<28>>>",
        "28",
    ),
]


@pytest.mark.parametrize("name, gold, question, output, stated", THOUGHT_QUOTES)
def test_a_thought_that_quotes_another_answer_is_graded_by_its_action(name, gold, question, output, stated):
    task = get_task(name)
    item = task.item_from_answer(gold, question)
    for grader, verdict in task.grade_both(item, output).items():
        assert verdict.outcome == "correct", (grader, verdict)
        assert verdict.extracted.strip("\n") == stated and "fallback" not in verdict.details
    # the same thought with a wrong action is wrong, whatever the thought quoted
    wrong = (
        output.rsplit("Action:", 1)[0]
        + "Action: "
        + task.render_answer("D" if task.name == "logiqa" else "A" if gold == "c" else "x 1")
    )
    assert {v.outcome for v in task.grade_both(item, wrong).values()} == {"wrong"}


def test_math_robust_reads_a_boxed_answer_from_the_action_not_a_finish_in_the_thought():
    item = math_item("28")
    output = "Thought: Finish<<<27>>> was my first answer; adding 1 gives 28.\nAction: the sum is \\boxed{28}"
    verdicts = get_task("math").grade_both(item, output)
    assert verdicts["official"].outcome == "parse_failure"  # the action has no Finish<<<...>>>
    assert (verdicts["robust"].outcome, verdicts["robust"].details["method"]) == ("correct", "boxed")


def test_mbpp_code_in_the_thought_is_not_graded(sandbox):
    task = get_task("mbpp")
    item = task.load_samples("train")[0]  # square(n)
    output = (
        "Thought: My previous code\n[BEGIN]\ndef square(n):\n    return n + n\n[END]\nadded instead of "
        "multiplying, so square(3) gave 6.\nAction: [BEGIN]\ndef square(n):\n    return n * n\n[END]"
    )
    assert "n * n" in task.extract(output).answer and "n + n" not in task.extract(output, "robust").answer
    assert [v.outcome for v in task.grade_both(item, output, sandbox).values()] == ["correct", "correct"]
    wrong = output.replace("return n * n", "return n ** 3")
    assert [v.outcome for v in task.grade_both(item, wrong, sandbox).values()] == ["wrong", "wrong"]


def test_two_call_attempts_are_graded_by_the_action_call():
    # the thought call stops at "Action:", so the joined text's first "Action:" starts the action call
    text = join_two_calls("My previous answer Finish[A] was wrong; blue wins.", "Finish[B]")
    assert action_part(text) == " Finish[B]"
    assert grade("logiqa", logiqa_item("b"), text) == {"official": "correct", "robust": "correct"}


def test_the_first_action_marker_ends_the_thought_as_in_the_paper():
    # the paper's thought call would have stopped at this "Action:" inside the thought
    text = "Thought: My previous Action: Finish[A] was wrong.\nAction: Finish[B]"
    assert grade("logiqa", logiqa_item("b"), text) == {"official": "wrong", "robust": "wrong"}


def test_an_output_without_an_action_line_is_a_parse_failure_officially_and_a_counted_fallback_robustly():
    task, item = get_task("logiqa"), logiqa_item("b")
    # the model forgot the action line, or ran out of tokens while still thinking
    forgot = "Thought: Red cannot win, so the answer is Finish[B]."
    truncated = "Thought: Option A says red wins. If Finish[A] were right, then the second sentence would"
    official = task.grade(item, forgot, "official")
    assert official.outcome == "parse_failure" and official.details["reason"].startswith("no action line")
    robust = task.grade(item, forgot, "robust")
    assert (robust.outcome, robust.details["fallback"]) == ("correct", "whole_text")
    robust = task.grade(item, truncated, "robust")
    assert (robust.outcome, robust.extracted, robust.details["fallback"]) == ("wrong", "A", "whole_text")
    failed = task.grade(item, "Thought: I cannot decide between the options", "robust")
    assert failed.outcome == "parse_failure" and failed.details["fallback"] == "whole_text"


# One-stage outputs: a reflection, a line "Answer:", the new attempt. Reflections quote the failed
# attempt and use the word "Answer:" themselves; only the last separator line starts the attempt.
ONE_STAGE_CASES = [
    (
        "logiqa",
        "b",
        LOGIQA_QUESTION,
        "The failed attempt answered Finish[A]. Answer: the passage never says red wins; I should check "
        "each option against the last sentence.",
        "Thought: Only blue can win.\nAction: Finish[B]",
    ),
    (
        "bigbench",
        "c",
        CLAIM,
        "My attempt was:\nAnswer:\nThought: It is true.\nAction: Finish[A]\nIt assumed a fact the passage "
        "does not state.",
        "Thought: The passage says nothing about it.\nAction: Finish[C]",
    ),
    (
        "bigbench",
        "the girl",
        BIGBENCH_STORY,
        "Answer: Finish[the boy] was wrong; I mixed up the two children.",
        "Thought: The girl found it.\nAction: Finish[the girl]",
    ),
    (
        "math",
        "28",
        MATH_GOLD_28,
        "The attempt gave Finish<<<27>>> because it skipped the divisor 1.\nAnswer:\nThought: 27 was wrong.\n"
        "Action: Finish<<<27>>>\nThe plan: list every divisor first.",
        "Thought: 1+2+3+4+6+12 = 28.\nAction: Finish<<<28>>>",
    ),
]


@pytest.mark.parametrize("name, gold, question, reflection, attempt", ONE_STAGE_CASES)
def test_one_stage_outputs_split_at_the_last_separator_and_grade_by_the_new_action(
    name, gold, question, reflection, attempt
):
    task = get_task(name)
    text = one_stage_completion(reflection, attempt)
    assert split_one_stage(text) == (reflection, attempt)
    item = task.item_from_answer(gold, question)
    assert {v.outcome for v in task.grade_both(item, split_one_stage(text)[1]).values()} == {"correct"}


def test_one_stage_mbpp_output_grades_the_new_code(sandbox):
    task = get_task("mbpp")
    item = task.load_samples("train")[0]  # square(n)
    reflection = (
        "The code\n[BEGIN]\ndef square(n):\n    return n + n\n[END]\nadded the number to itself. "
        "Answer: multiply instead."
    )
    attempt = "Thought: Multiply n by itself.\nAction: [BEGIN]\ndef square(n):\n    return n * n\n[END]"
    reflection_part, attempt_part = split_one_stage(one_stage_completion(reflection, attempt))
    assert (reflection_part, attempt_part) == (reflection, attempt)
    assert [v.outcome for v in task.grade_both(item, attempt_part, sandbox).values()] == ["correct", "correct"]


def test_one_stage_split_needs_the_separator_on_its_own_line():
    assert split_one_stage("I misread it. Answer: Thought: B.\nAction: Finish[B]") == (
        "I misread it. Answer: Thought: B.\nAction: Finish[B]",
        None,
    )
    assert split_one_stage("Answer:\nThought: B.\nAction: Finish[B]") == ("", "Thought: B.\nAction: Finish[B]")
    assert split_one_stage("A reflection that ran out of tokens") == ("A reflection that ran out of tokens", None)
