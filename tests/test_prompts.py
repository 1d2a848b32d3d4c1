"""The prompts: golden snapshots make every edit of a prompt visible in review, and the reflection
instruction pool has its 32 keyed instructions and seeded, per-question assignment.

After an intended prompt change, regenerate the snapshots with ``REFLECTEVO_UPDATE_GOLDEN=1 pytest
tests/test_prompts.py``, bump the version constant in ``reflectevo/prompts.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reflectevo.prompts import (
    GENERIC_INSTRUCTION,
    INSTRUCTIONS,
    action_messages,
    action_opening,
    assign_instructions,
    attempt_prompt,
    get_instruction,
    join_two_calls,
    judge_prompt,
    one_stage_completion,
    one_stage_prompt,
    parse_self_verdict,
    parse_verdict,
    reflection_prompt,
    review_prompt,
    review_second_trial_prompt,
    second_trial_prompt,
    self_verify_prompt,
    split_one_stage,
    thought_messages,
)
from reflectevo.tasks import get_task, task_names

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("REFLECTEVO_UPDATE_GOLDEN") == "1"
ATTEMPT = "Thought: The options look alike, so I pick the first.\nAction: Finish[A]"


def rendered_prompts() -> dict[str, str]:
    prompts = {}
    for name in task_names():
        task = get_task(name)
        item = task.load_samples("train")[0]
        prompts[f"attempt-{name}-0shot"] = attempt_prompt(task, item, fewshots=0)
        prompts[f"attempt-{name}-3shot"] = attempt_prompt(task, item, fewshots=3)
    task = get_task("logiqa")
    item = task.load_samples("train")[0]
    prompts["reflection-logiqa-1-3-2"] = reflection_prompt(
        item, ATTEMPT, "Answer is INCORRECT", get_instruction("1-3-2")
    )
    reflection = "I picked an option without reading it. Check which option follows from both statements."
    prompts["second-trial-logiqa-reflection"] = second_trial_prompt(task, item, reflection)
    prompts["second-trial-logiqa-reflection-and-attempt"] = second_trial_prompt(
        task, item, reflection, previous=(ATTEMPT, "Answer is INCORRECT")
    )
    prompts["reflection-logiqa-generic"] = reflection_prompt(item, ATTEMPT, "Answer is INCORRECT", GENERIC_INSTRUCTION)
    prompts["one-stage-logiqa-generic"] = one_stage_prompt(
        task, item, ATTEMPT, "Answer is INCORRECT", GENERIC_INSTRUCTION
    )
    prompts["retry-logiqa-without-reflection"] = second_trial_prompt(
        task, item, None, previous=(ATTEMPT, "Answer is INCORRECT")
    )
    prompts["review-logiqa"] = review_prompt(item, ATTEMPT)
    prompts["review-second-trial-logiqa"] = review_second_trial_prompt(task, item, reflection, ATTEMPT)
    prompts["review-retry-logiqa"] = review_second_trial_prompt(task, item, None, ATTEMPT)
    prompts["self-verify-logiqa"] = self_verify_prompt(item, ATTEMPT)
    prompts["judge-logiqa"] = judge_prompt(
        item,
        ATTEMPT,
        "Answer is INCORRECT",
        reflection,
        "I should have read the options. Next time, compare each one with the text.",
    )
    return prompts


@pytest.mark.parametrize("name", sorted(rendered_prompts()))
def test_prompt_matches_its_golden_snapshot(name):
    text = rendered_prompts()[name]
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"no snapshot {path.name}: run with REFLECTEVO_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(encoding="utf-8"), (
        f"{name} changed: review, bump the prompt version, update the snapshot"
    )


def test_no_snapshot_is_left_without_a_prompt():
    assert {path.stem for path in GOLDEN.glob("*.txt")} == set(rendered_prompts())


def test_the_pool_has_32_distinct_keyed_instructions():
    assert len(INSTRUCTIONS) == 32
    assert next(iter(INSTRUCTIONS)) == "1-1-1" and list(INSTRUCTIONS)[-1] == "2-8-2"
    assert len({instruction.text for instruction in INSTRUCTIONS.values()}) == 32
    with pytest.raises(ValueError, match=r"unknown reflection instruction '1-1-3' \(did you mean '1-1-\d'\?\)"):
        get_instruction("1-1-3")


def test_instruction_assignment_is_seeded_per_question():
    first = assign_instructions("random_k", 4, seed=0, task="math", item_id="s01")
    assert first == assign_instructions("random_k", 4, seed=0, task="math", item_id="s01")
    assert len(set(first)) == 4 and all(key in INSTRUCTIONS for key in first)
    others = {tuple(assign_instructions("random_k", 4, seed=s, task="math", item_id="s01")) for s in range(10)}
    assert len(others) > 1  # the seed matters
    assert assign_instructions("all", 1, 0, "math", "s01") == list(INSTRUCTIONS)
    assert assign_instructions(["2-8-2", "1-1-1"], 1, 0, "math", "s01") == ["2-8-2", "1-1-1"]
    with pytest.raises(ValueError, match="listed twice"):
        assign_instructions(["1-1-1", "1-1-1"], 1, 0, "math", "s01")
    with pytest.raises(ValueError, match="unknown instruction policy"):
        assign_instructions("some", 1, 0, "math", "s01")


def test_reflection_prompt_never_shows_the_gold_answer():
    task = get_task("math")
    for item in task.load_samples("train"):
        prompt = reflection_prompt(
            item, "Thought: x\nAction: Finish<<<0>>>", "Answer is INCORRECT", get_instruction("2-1-1")
        )
        assert f"<<<{item.gold}>>>" not in prompt
        assert prompt.endswith(get_instruction("2-1-1").plan)


def test_judge_verdicts_are_parsed_from_the_last_verdict_line():
    assert parse_verdict("A is sharper.\nVerdict: A") == "A"
    assert parse_verdict("Verdict: b") == "B" and parse_verdict("Verdict: **B**") == "B"
    assert parse_verdict("Verdict: Tie") == "tie"
    assert parse_verdict("First Verdict: A, but on reflection Verdict: B") == "B"
    assert parse_verdict("Reflection A is better.") is None  # no verdict line: a parse failure, counted
    assert parse_verdict("Verdict: Both") is None


def test_one_stage_answers_split_into_reflection_and_attempt():
    text = one_stage_completion("I misread option B.", "Thought: C fits.\nAction: Finish[C]")
    assert split_one_stage(text) == ("I misread option B.", "Thought: C fits.\nAction: Finish[C]")
    assert split_one_stage("Only a reflection.") == ("Only a reflection.", None)


def test_two_call_attempts_prefill_the_assistant_turn():
    assert thought_messages("Q")[-1] == {"role": "assistant", "content": "Thought:"}
    assert action_messages("Q", " think ")[-1]["content"] == "Thought: think\nAction:"
    assert join_two_calls(" think", " Finish[B] ") == "Thought: think\nAction: Finish[B]"
    # attempt_prefill: answer pre-fills through each task's answer syntax, and the opening is part of the attempt
    openings = {name: action_opening(get_task(name), "answer") for name in ("logiqa", "math", "mbpp", "bigbench")}
    assert openings == {"logiqa": " Finish[", "math": " Finish<<<", "mbpp": " [BEGIN]\n", "bigbench": " Finish["}
    assert action_opening(get_task("math"), "action") == ""
    assert action_messages("Q", "think", " Finish<<<")[-1]["content"] == "Thought: think\nAction: Finish<<<"
    assert join_two_calls("think", "12>>>\n", " Finish<<<") == "Thought: think\nAction: Finish<<<12>>>"
    for name, opening in openings.items():  # what the model completes is graded like a one-call attempt
        task = get_task(name)
        answer = "def f():\n    return 1" if name == "mbpp" else "B"
        rest = task.render_answer(answer).removeprefix(opening.strip()) if name != "mbpp" else f"{answer}\n[END]"
        text = join_two_calls("think", rest, opening)
        assert text == f"Thought: think\nAction: {task.render_answer(answer)}", name
    with pytest.raises(ValueError, match="unknown attempt prefill"):
        action_opening(get_task("logiqa"), "thought")


def test_the_generic_instruction_is_outside_the_pool_but_resolvable():
    assert GENERIC_INSTRUCTION.key not in INSTRUCTIONS and get_instruction("generic") is GENERIC_INSTRUCTION
    assert "generic" not in assign_instructions("all", 2, 0, "logiqa", "x")


def test_self_verdicts_are_read_from_the_last_verdict_line():
    assert parse_self_verdict("The step holds.\nVerdict: correct") == "correct"
    assert parse_self_verdict("Verdict: correct\nOn second thought...\nVerdict: **Wrong**") == "wrong"
    assert parse_self_verdict("It looks fine to me.") is None
    assert parse_self_verdict("Verdict: correctly done") is None  # a whole word only


def test_oracle_free_prompts_never_say_whether_the_answer_was_right():
    task, item = get_task("mbpp"), get_task("mbpp").load_samples("train")[0]
    attempt = "Thought: I write it.\nAction: [BEGIN]\ndef f(x):\n    return x\n[END]"
    texts = [
        review_prompt(item, attempt),
        review_second_trial_prompt(task, item, "It holds.", attempt),
        self_verify_prompt(item, attempt),
    ]
    for text in texts:
        for oracle_word in ("INCORRECT", "CORRECT\n", "was wrong", "Test failed", "Observation"):
            assert oracle_word not in text
