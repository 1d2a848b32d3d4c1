"""Quality checks of a freshly built stand-in: it must write the formats every stage parses."""

from __future__ import annotations

import random
from typing import Any

from reflectevo.models.builtin.corpus import _failed_first_trial, _first_trial
from reflectevo.models.builtin.generic import _task
from reflectevo.models.builtin.tokenizer import END, prompt_text
from reflectevo.prompts import (
    GENERIC_INSTRUCTION,
    attempt_messages,
    judge_prompt,
    one_stage_prompt,
    parse_self_verdict,
    parse_verdict,
    reflection_prompt,
    review_prompt,
    review_second_trial_prompt,
    second_trial_prompt,
    self_verify_prompt,
    split_one_stage,
)
from reflectevo.tasks import task_names

# Generation lengths for the quality check: code answers are longer than the others.
QUALITY_MAX_NEW_TOKENS = {"mbpp": 160}
DEFAULT_QUALITY_MAX_NEW_TOKENS = 64


def greedy_attempts(model, tokenizer, task_name: str, items: list, max_new_tokens: int | None = None) -> list[str]:
    """Greedy first attempts of ``model`` on ``items`` of one task, zero-shot, in one left-padded batch."""

    task = _task(task_name)
    if max_new_tokens is None:
        max_new_tokens = QUALITY_MAX_NEW_TOKENS.get(task_name, DEFAULT_QUALITY_MAX_NEW_TOKENS)
    return greedy_texts(model, tokenizer, [attempt_messages(task, item) for item in items], max_new_tokens)


def greedy_texts(model, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
    """Greedy answers of ``model`` to chat prompts, in one left-padded batch."""
    import torch

    tokenizer.padding_side = "left"
    prompts = [prompt_text(tokenizer, messages) for messages in conversations]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids(END),
        )
    return tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def validation_quality(model, tokenizer) -> dict[str, Any]:
    """Parseable rate and accuracy (official graders) of greedy answers on the built-in validation items.

    MBPP answers are checked for the ``[BEGIN] ... [END]`` format only: grading them would run
    model-written code, which needs the user's explicit opt-in.
    """

    per_task: dict[str, Any] = {}
    outputs: dict[str, list[str]] = {}
    parsed = graded = correct = total = 0
    for name in task_names():
        task = _task(name)
        items = task.load_samples("validation")
        texts = greedy_attempts(model, tokenizer, name, items)
        outputs[name] = texts
        ok = [task.extract(text, "official", item).ok for item, text in zip(items, texts)]
        entry: dict[str, Any] = {"items": len(items), "parseable": round(sum(ok) / len(items), 4)}
        if task.needs_code_execution:
            entry["accuracy"] = None
        else:
            right = sum(task.grade(item, text, "official").correct for item, text in zip(items, texts))
            entry["accuracy"] = round(right / len(items), 4)
            graded += len(items)
            correct += right
        parsed += sum(ok)
        total += len(items)
        per_task[name] = entry
    overall = {
        "items": total,
        "parseable": round(parsed / total, 4),
        "graded_items": graded,
        "accuracy": round(correct / max(graded, 1), 4),
    }
    return {
        "validation": per_task,
        "overall": overall,
        "reflection_stage": reflection_stage_quality(model, tokenizer),
        "evaluation_prompts": evaluation_prompt_quality(model, tokenizer),
        "outputs": outputs,
    }


def reflection_stage_quality(model, tokenizer) -> dict[str, Any]:
    """How the stand-in does at stage 02's prompts, on the validation items of the multiple-choice and
    MATH tasks, each given a fixed wrong first attempt: reflections that contain no answer action,
    parseable second attempts, second attempts that repeat the rejected answer, parseable judge verdicts."""

    rng = random.Random("reflection-stage-quality")
    cases = []
    for name in ("logiqa", "bigbench", "math"):
        for item in _task(name).load_samples("validation"):
            cases.append((name, item, *_failed_first_trial(name, item, rng)))
    user = [
        [{"role": "user", "content": reflection_prompt(item, attempt, feedback, GENERIC_INSTRUCTION)}]
        for _, item, _, attempt, feedback in cases
    ]
    reflections = greedy_texts(model, tokenizer, user, DEFAULT_QUALITY_MAX_NEW_TOKENS)
    user = [
        [{"role": "user", "content": second_trial_prompt(_task(name), item, reflection, previous=(attempt, feedback))}]
        for (name, item, _, attempt, feedback), reflection in zip(cases, reflections)
    ]
    seconds = greedy_texts(model, tokenizer, user, DEFAULT_QUALITY_MAX_NEW_TOKENS)
    answers = [_task(name).extract(text, "official", item).answer for (name, item, *_), text in zip(cases, seconds)]
    user = [
        [{"role": "user", "content": judge_prompt(item, attempt, feedback, reflections[i], reflections[i - 1])}]
        for i, (_, item, _, attempt, feedback) in enumerate(cases)
    ]
    verdicts = [parse_verdict(text) for text in greedy_texts(model, tokenizer, user, DEFAULT_QUALITY_MAX_NEW_TOKENS)]
    n = len(cases)
    return {
        "cases": n,
        "reflections_without_action": round(
            sum("Action:" not in text and text.strip() != "" for text in reflections) / n, 4
        ),
        "second_attempts_parseable": round(sum(answer is not None for answer in answers) / n, 4),
        "second_attempts_repeating_the_rejected_answer": round(
            sum(answer == wrong for answer, (_, _, wrong, *_) in zip(answers, cases)) / n, 4
        ),
        "judge_verdicts_parseable": round(sum(verdict is not None for verdict in verdicts) / n, 4),
        "judge_verdicts": {verdict or "none": verdicts.count(verdict) for verdict in dict.fromkeys(verdicts)},
    }


def evaluation_prompt_quality(model, tokenizer) -> dict[str, Any]:
    """How the stand-in does at stage 05's prompts, on the validation items of the multiple-choice and
    MATH tasks: parseable retries without reflection after a fixed wrong attempt; then, on a fixed first
    attempt that is right for every other item, oracle-free reviews with no answer action, parseable
    second attempts after its own review and how often they keep the previous answer, and parseable
    self-verdicts (and how often they agree with the grader); and one-stage answers (reflection,
    ``Answer:``, new attempt) to the reflection prompt on the failed attempts, with a parseable attempt."""

    rng = random.Random("evaluation-prompt-quality")
    retry_cases, cases = [], []
    for name in ("logiqa", "bigbench", "math"):
        for index, item in enumerate(_task(name).load_samples("validation")):
            retry_cases.append((name, item, *_failed_first_trial(name, item, rng)))
            cases.append((name, item, index % 2 == 0, *_first_trial(name, item, index % 2 == 0, rng)))

    def ask(prompts: list[str]) -> list[str]:
        return greedy_texts(
            model,
            tokenizer,
            [[{"role": "user", "content": prompt}] for prompt in prompts],
            DEFAULT_QUALITY_MAX_NEW_TOKENS,
        )

    def answer(name: str, item, text: str) -> str | None:
        return _task(name).extract(text, "official", item).answer

    retries = ask(
        [
            second_trial_prompt(_task(name), item, None, previous=(attempt, feedback))
            for name, item, _, attempt, feedback in retry_cases
        ]
    )
    retry_answers = [answer(name, item, text) for (name, item, *_), text in zip(retry_cases, retries)]
    reviews = ask([review_prompt(item, attempt) for _, item, _, _, attempt in cases])
    seconds = ask(
        [
            review_second_trial_prompt(_task(name), item, review, attempt)
            for (name, item, _, _, attempt), review in zip(cases, reviews)
        ]
    )
    kept = [
        (answer(name, item, text), answer(name, item, attempt))
        for (name, item, _, _, attempt), text in zip(cases, seconds)
    ]
    verdicts = [
        parse_self_verdict(text)
        for text in ask([self_verify_prompt(item, attempt) for _, item, _, _, attempt in cases])
    ]
    one_stage = greedy_texts(
        model,
        tokenizer,
        [
            [{"role": "user", "content": one_stage_prompt(_task(name), item, attempt, feedback, GENERIC_INSTRUCTION)}]
            for name, item, _, attempt, feedback in retry_cases
        ],
        2 * DEFAULT_QUALITY_MAX_NEW_TOKENS,
    )
    one_stage_attempts = [split_one_stage(text)[1] for text in one_stage]
    n = len(cases)
    return {
        "cases": n,
        "retry_second_attempts_parseable": round(sum(a is not None for a in retry_answers) / n, 4),
        "retry_second_attempts_repeating_the_rejected_answer": round(
            sum(a == wrong for a, (_, _, wrong, *_) in zip(retry_answers, retry_cases)) / n, 4
        ),
        "reviews_without_action": round(sum("Action:" not in text and text.strip() != "" for text in reviews) / n, 4),
        "review_second_attempts_parseable": round(sum(new is not None for new, _ in kept) / n, 4),
        "review_second_attempts_keeping_the_previous_answer": round(
            sum(new is not None and new == old for new, old in kept) / n, 4
        ),
        "self_verdicts_parseable": round(sum(verdict is not None for verdict in verdicts) / n, 4),
        "self_verdicts_agreeing_with_the_grader": round(
            sum(verdict == ("correct" if right else "wrong") for verdict, (_, _, right, *_) in zip(verdicts, cases))
            / n,
            4,
        ),
        "self_verdicts": {verdict or "none": verdicts.count(verdict) for verdict in dict.fromkeys(verdicts)},
        "one_stage_attempts_parseable": round(
            sum(
                attempt is not None and answer(name, item, attempt) is not None
                for attempt, (name, item, *_) in zip(one_stage_attempts, retry_cases)
            )
            / n,
            4,
        ),
    }
