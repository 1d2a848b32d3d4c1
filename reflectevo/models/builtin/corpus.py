"""The stand-in's training corpus, part by part: attempts, reflections, second trials, judgements, reviews, generic text."""

from __future__ import annotations

import random

from reflectevo.models.builtin.attempts import (
    CHOICE_THOUGHTS,
    CODE_THOUGHTS,
    CORPUS_PARTS,
    FREE_THOUGHTS,
    MATH_THOUGHTS,
    CorpusPart,
    _bigbench_thought,
    _bigbench_wrong,
    _choice_thought,
    _code_thought,
    _math_thought,
    _other_letter,
    corpus_part,
    perturbed_number_answer,
    wrong_code_answer,
)
from reflectevo.models.builtin.generic import _generic_count, _sentences_and_words, _task, random_choice_item
from reflectevo.models.builtin.settings import DEFAULT_TINY, TinySettings
from reflectevo.models.builtin.tokenizer import Pair
from reflectevo.prompts import (
    GENERIC_INSTRUCTION,
    INSTRUCTIONS,
    attempt_messages,
    gold_answer,
    judge_prompt,
    one_stage_completion,
    one_stage_prompt,
    reflection_prompt,
    render_attempt,
    review_prompt,
    review_second_trial_prompt,
    second_trial_prompt,
    self_verify_prompt,
    with_one_stage_suffix,
)
from reflectevo.tasks import Item
from reflectevo.tasks.base import INCORRECT_OBSERVATION
from reflectevo.tasks.mbpp import official_question


def build_corpus(
    settings: TinySettings = DEFAULT_TINY, parts: list[CorpusPart] | None = None
) -> list[tuple[str, Pair]]:
    """All training pairs as ``(part name, pair)``. Each part draws from its own seeded generator,
    so adding a part leaves the other parts' text unchanged."""
    corpus = []
    for part in CORPUS_PARTS if parts is None else parts:
        rng = random.Random(f"{settings.seed}:{part.name}")
        corpus.extend((part.name, pair) for pair in part.build(rng, settings))
    return corpus


# ---- reflections, second trials and judgements (stage 02) -----------------------------------------
# The stand-in writes a reflection whose sentences follow the instruction it was given (the error
# kind, the plan level), on an attempt whose wrong answer it names; it never states the gold answer.
# Its second attempts on training items are gold half of the time and never repeat the rejected
# answer, so reflecting helps it about as much as a second guess would. Its judge prefers the
# reflection with a concrete fix ("The fix is ...") and calls a tie when both or neither have one.
REFLECTION_OPENINGS = {
    "1": ("Checking step by step, my answer {answer} was wrong.", "Going through each step, {answer} does not hold."),
    "2": ("My answer {answer} was wrong.", "Looking at the attempt as a whole, {answer} is not right."),
}
REFLECTION_CHECKS = {
    "1": ("I did not check each calculation.", "One of my calculations is off."),
    "2": ("I took the steps in the wrong order.", "My method skipped a step."),
    "3": ("My conclusion does not follow from the statements.", "I jumped to a conclusion."),
    "4": ("Two of my statements contradict each other.", "My reasoning is not consistent."),
    "5": ("I misread what the question asks.", "I answered a different question."),
    "6": ("I ignored part of the question.", "I did not use every condition."),
    "7": ("My answer does not follow the required format.", "I wrote the answer in the wrong form."),
    "8": ("I relied on a fact that is not true.", "One fact I used is wrong."),
}
REFLECTION_PLANS = {
    "1": (
        "Next time I will check every option against the question before I answer.",
        "Next time I will reason one step at a time and test my answer at the end.",
    ),
    "2": (
        "The fix is to rule out {answer} and test the remaining answers one by one.",
        "The fix is to redo the key step and compare the result with each option.",
    ),
}
CONCRETE_FIX = "The fix is"


def _wrong_answer(task_name: str, item, rng: random.Random) -> str:
    return {
        "logiqa": _other_letter,
        "math": perturbed_number_answer,
        "mbpp": wrong_code_answer,
        "bigbench": _bigbench_wrong,
    }[task_name](item, rng)


def _thought(task_name: str, item, answer: str, correct: bool, rng: random.Random) -> str:
    return {"logiqa": _choice_thought, "math": _math_thought, "mbpp": _code_thought, "bigbench": _bigbench_thought}[
        task_name
    ](item, answer, correct, rng)


def _failed_first_trial(task_name: str, item, rng: random.Random) -> tuple[str, str, str]:
    """A wrong first attempt at a training item: (answer, attempt text, feedback)."""

    task = _task(task_name)
    answer, attempt = _first_trial(task_name, item, False, rng)
    feedback = INCORRECT_OBSERVATION
    if task.needs_code_execution and item.tests:
        feedback = f"Test failed: {item.tests[0]}\n{INCORRECT_OBSERVATION}"
    return answer, attempt, feedback


def _named(task_name: str, answer: str) -> str:
    # a reflection names a short rejected answer; code is named by what it is
    return "my code" if task_name == "mbpp" else answer


def stand_in_reflection(task_name: str, answer: str, instruction, rng: random.Random) -> str:
    """The stand-in's reflection for one instruction (the generic one picks its parts at random)."""
    verify, check, plan = (
        instruction.key.split("-")
        if instruction.key.count("-") == 2
        else (rng.choice("12"), rng.choice("12345678"), rng.choice("12"))
    )
    named = _named(task_name, answer)
    return " ".join(
        [
            rng.choice(REFLECTION_OPENINGS[verify]).format(answer=named),
            rng.choice(REFLECTION_CHECKS[check]),
            rng.choice(REFLECTION_PLANS[plan]).format(answer=named),
        ]
    )


def _random_instruction(rng: random.Random):
    return GENERIC_INSTRUCTION if rng.random() < 0.2 else INSTRUCTIONS[rng.choice(sorted(INSTRUCTIONS))]


REFLECTIONS_PER_ITEM = 3
SECOND_TRIALS_PER_ITEM = 6
JUDGEMENTS_PER_ITEM = 6
SECOND_TRIAL_GOLD_SHARE = 0.6  # as for first attempts: the rest are new wrong answers
GENERIC_SECOND_TRIALS = 160  # multiple-choice second trials on random text: never repeat the rejected letter


def _reflection_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    pairs = []
    for item in _task(task_name).load_samples("train"):
        for _ in range(REFLECTIONS_PER_ITEM):
            answer, attempt, feedback = _failed_first_trial(task_name, item, rng)
            instruction = _random_instruction(rng)
            user = reflection_prompt(item, attempt, feedback, instruction)
            pairs.append(
                ([{"role": "user", "content": user}], stand_in_reflection(task_name, answer, instruction, rng))
            )
    return pairs


def _second_trial_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    task = _task(task_name)
    pairs = []
    for item in task.load_samples("train"):
        for _ in range(SECOND_TRIALS_PER_ITEM):
            wrong, attempt, feedback = _failed_first_trial(task_name, item, rng)
            reflection = stand_in_reflection(task_name, wrong, _random_instruction(rng), rng)
            previous = (attempt, feedback) if rng.random() < 0.5 else None
            user = second_trial_prompt(task, item, reflection, previous=previous)
            pairs.append(([{"role": "user", "content": user}], _new_attempt(task_name, item, wrong, rng)))
    return pairs


def _new_attempt(task_name: str, item, rejected: str, rng: random.Random) -> str:
    """A second attempt that changes the answer: gold with SECOND_TRIAL_GOLD_SHARE, else a new wrong
    answer; never the rejected one (so never gold when gold was rejected)."""

    correct = rng.random() < SECOND_TRIAL_GOLD_SHARE and rejected != gold_answer(item)
    answer = gold_answer(item) if correct else rejected
    for _ in range(5):  # a wrong second answer is a new wrong answer, not the rejected one
        if correct or answer != rejected:
            break
        answer = _wrong_answer(task_name, item, rng)
    if answer == rejected:  # no other wrong answer (a yes/no question): the gold one
        answer, correct = gold_answer(item), True
    return render_attempt(_task(task_name), _thought(task_name, item, answer, correct, rng), answer)


def _judgement_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    pairs = []
    for item in _task(task_name).load_samples("train"):
        for _ in range(JUDGEMENTS_PER_ITEM):
            answer, attempt, feedback = _failed_first_trial(task_name, item, rng)
            a, b = (
                stand_in_reflection(task_name, answer, INSTRUCTIONS[rng.choice(sorted(INSTRUCTIONS))], rng)
                for _ in range(2)
            )
            fix_a, fix_b = CONCRETE_FIX in a, CONCRETE_FIX in b
            verdict = "tie" if fix_a == fix_b else ("A" if fix_a else "B")
            why = {
                "A": "Reflection A gives a concrete fix.",
                "B": "Reflection B gives a concrete fix.",
                "tie": "Both reflections give the same kind of plan.",
            }[verdict]
            user = judge_prompt(item, attempt, feedback, a, b)
            pairs.append(([{"role": "user", "content": user}], f"{why}\nVerdict: {verdict}"))
    return pairs


@corpus_part("generic/second_trials")
def generic_second_trials(rng: random.Random, settings: TinySettings) -> list[Pair]:
    """Second trials on random multiple-choice questions: any letter but the one the verdict rejected,
    so the stand-in learns to act on a failed attempt on questions it never saw."""

    pairs = []
    for index in range(GENERIC_SECOND_TRIALS):
        task, item = random_choice_item(rng, f"generic-second-{index}")
        letters = [chr(ord("A") + i) for i in range(len(item.options))]
        rejected = rng.choice(letters)
        attempt = render_attempt(task, rng.choice(CHOICE_THOUGHTS).format(letter=rejected), rejected)
        reflection = stand_in_reflection(task.name, rejected, GENERIC_INSTRUCTION, rng)
        previous = (attempt, INCORRECT_OBSERVATION) if rng.random() < 0.5 else None
        user = second_trial_prompt(task, item, reflection, previous=previous)
        letter = rng.choice([other for other in letters if other != rejected])
        pairs.append(
            (
                [{"role": "user", "content": user}],
                render_attempt(task, rng.choice(CHOICE_THOUGHTS).format(letter=letter), letter),
            )
        )
    return pairs


# ---- evaluation prompts (stage 05): retries, oracle-free reviews, self-verification -----------------
# The stand-in cannot know whether its answer is right, so its reviews and self-verdicts are right
# 70 % of the time: mixed, but informative. A review either says the answer holds (then the second
# attempt repeats it) or finds a problem in the style of a reflection (then the answer changes).
REVIEW_HOLDS_OPENINGS = (
    "Checking step by step, my answer {answer} holds.",
    "Going through each step, {answer} is right.",
    "Looking at the attempt as a whole, {answer} holds.",
)
REVIEW_HOLDS_CHECKS = (
    "It agrees with the question.",
    "Each step follows from the one before.",
    "It uses every condition of the question.",
    "I find no mistake in it.",
)
REVIEW_HOLDS_CLOSINGS = ("No change is needed.", "I will keep this answer.")  # an explicit cue to keep it
SELF_VERIFY_REASONS = {
    "correct": (
        "Checking the attempt again, {answer} agrees with the question.",
        "Each step holds, so {answer} is right.",
        "Going through the steps, {answer} follows.",
    ),
    "wrong": (
        "Checking the attempt again, {answer} does not follow from the question.",
        "One step fails, so {answer} is wrong.",
        "Going through the steps, {answer} does not hold.",
    ),
}
TRUE_JUDGEMENT_SHARE = 0.7  # reviews and self-verdicts that judge the first attempt rightly
RETRIES_PER_ITEM = 1  # the retry prompt is a second-trial prompt without reflection: little new to learn
REVIEWS_PER_ITEM = 2
REVIEW_SECOND_TRIALS_PER_ITEM = 4  # keeping an answer goes against every other second trial
SELF_VERIFICATIONS_PER_ITEM = 2
REVIEW_OMITTED_SHARE = 0.2  # oracle-free second attempts with no review (a plain retry)


def _first_trial(task_name: str, item, correct: bool, rng: random.Random) -> tuple[str, str]:
    """A first attempt at an item, right (gold) or wrong: (answer, attempt text)."""

    answer = gold_answer(item) if correct else _wrong_answer(task_name, item, rng)
    return answer, render_attempt(_task(task_name), _thought(task_name, item, answer, correct, rng), answer)


def _judged_first_trial(task_name: str, item, rng: random.Random) -> tuple[str, str, bool, bool]:
    """(answer, attempt, right, judged right): a first attempt, right half of the time, and the
    stand-in's judgement of it, true with TRUE_JUDGEMENT_SHARE."""
    right = rng.random() < 0.5
    answer, attempt = _first_trial(task_name, item, right, rng)
    return answer, attempt, right, right == (rng.random() < TRUE_JUDGEMENT_SHARE)


def stand_in_review(task_name: str, answer: str, holds: bool, rng: random.Random) -> str:
    """The stand-in's oracle-free review: the answer holds, or a reflection-style text that finds a problem."""

    if not holds:
        return stand_in_reflection(task_name, answer, GENERIC_INSTRUCTION, rng)
    named = _named(task_name, answer)
    return " ".join(
        [
            rng.choice(REVIEW_HOLDS_OPENINGS).format(answer=named),
            rng.choice(REVIEW_HOLDS_CHECKS),
            rng.choice(REVIEW_HOLDS_CLOSINGS),
        ]
    )


def _retry_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    task = _task(task_name)
    pairs = []
    for item in task.load_samples("train"):
        for _ in range(RETRIES_PER_ITEM):
            wrong, attempt, feedback = _failed_first_trial(task_name, item, rng)
            user = second_trial_prompt(task, item, None, previous=(attempt, feedback))
            pairs.append(([{"role": "user", "content": user}], _new_attempt(task_name, item, wrong, rng)))
    return pairs


def _review_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    pairs = []
    for item in _task(task_name).load_samples("train"):
        for _ in range(REVIEWS_PER_ITEM):
            answer, attempt, _, holds = _judged_first_trial(task_name, item, rng)
            pairs.append(
                (
                    [{"role": "user", "content": review_prompt(item, attempt)}],
                    stand_in_review(task_name, answer, holds, rng),
                )
            )
    return pairs


def _review_second_trial_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    task = _task(task_name)
    pairs = []
    for item in task.load_samples("train"):
        for _ in range(REVIEW_SECOND_TRIALS_PER_ITEM):
            answer, attempt, right, holds = _judged_first_trial(task_name, item, rng)
            review = stand_in_review(task_name, answer, holds, rng)
            user = review_second_trial_prompt(
                task, item, None if rng.random() < REVIEW_OMITTED_SHARE else review, attempt
            )
            if not holds:
                completion = _new_attempt(task_name, item, answer, rng)
            elif rng.random() < 2 / 3:  # kept: the same text (easiest to copy), or the same answer with a new thought
                completion = attempt
            else:
                completion = render_attempt(task, _thought(task_name, item, answer, right, rng), answer)
            pairs.append(([{"role": "user", "content": user}], completion))
    return pairs


def _one_stage_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    """One-stage answers (a reflection, ``Answer:``, a new attempt): after the oracle's reflection prompt
    on a failed attempt, and after the oracle-free review prompt, where an answer that holds is kept."""

    task = _task(task_name)
    pairs = []
    for item in task.load_samples("train"):
        wrong, attempt, feedback = _failed_first_trial(task_name, item, rng)
        reflection = stand_in_reflection(task_name, wrong, GENERIC_INSTRUCTION, rng)
        pairs.append(
            (
                [{"role": "user", "content": one_stage_prompt(task, item, attempt, feedback, GENERIC_INSTRUCTION)}],
                one_stage_completion(reflection, _new_attempt(task_name, item, wrong, rng)),
            )
        )
        answer, attempt, _, holds = _judged_first_trial(task_name, item, rng)
        second = attempt if holds else _new_attempt(task_name, item, answer, rng)
        pairs.append(
            (
                [{"role": "user", "content": with_one_stage_suffix(task, review_prompt(item, attempt))}],
                one_stage_completion(stand_in_review(task_name, answer, holds, rng), second),
            )
        )
    return pairs


def _self_verify_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    pairs = []
    for item in _task(task_name).load_samples("train"):
        for _ in range(SELF_VERIFICATIONS_PER_ITEM):
            answer, attempt, _, judged_right = _judged_first_trial(task_name, item, rng)
            verdict = "correct" if judged_right else "wrong"
            named = "my code" if task_name == "mbpp" else f"my answer {answer}"
            reason = rng.choice(SELF_VERIFY_REASONS[verdict]).format(answer=named)
            pairs.append(
                ([{"role": "user", "content": self_verify_prompt(item, attempt)}], f"{reason}\nVerdict: {verdict}")
            )
    return pairs


for _name in ("logiqa", "math", "mbpp", "bigbench"):
    corpus_part(f"reflections/{_name}")(lambda rng, settings, _n=_name: _reflection_pairs(_n, rng, settings))
    corpus_part(f"second_trials/{_name}")(lambda rng, settings, _n=_name: _second_trial_pairs(_n, rng, settings))
    corpus_part(f"judgements/{_name}")(lambda rng, settings, _n=_name: _judgement_pairs(_n, rng, settings))
    corpus_part(f"one_stage/{_name}")(lambda rng, settings, _n=_name: _one_stage_pairs(_n, rng, settings))
    corpus_part(f"retries/{_name}")(lambda rng, settings, _n=_name: _retry_pairs(_n, rng, settings))
    corpus_part(f"reviews/{_name}")(lambda rng, settings, _n=_name: _review_pairs(_n, rng, settings))
    corpus_part(f"review_second_trials/{_name}")(
        lambda rng, settings, _n=_name: _review_second_trial_pairs(_n, rng, settings)
    )
    corpus_part(f"self_verify/{_name}")(lambda rng, settings, _n=_name: _self_verify_pairs(_n, rng, settings))


@corpus_part("generic/choice")
def generic_choice(rng: random.Random, settings: TinySettings) -> list[Pair]:
    """Multiple choice in the LogiQA layout (``A.text`` lines) and the BIG-bench one (``Options:``)."""

    pairs = []
    for index in range(_generic_count(settings, "choice")):
        task, item = random_choice_item(rng, f"generic-{index}")
        letter = rng.choice([chr(ord("A") + i) for i in range(len(item.options))])
        thought = rng.choice(CHOICE_THOUGHTS).format(letter=letter)
        pairs.append((attempt_messages(task, item), render_attempt(task, thought, letter)))
    return pairs


@corpus_part("generic/math")
def generic_math(rng: random.Random, settings: TinySettings) -> list[Pair]:
    """MATH-style questions on random text with a random number or fraction as the answer."""

    task = _task("math")
    sentences, words = _sentences_and_words()
    pairs = []
    for index in range(_generic_count(settings, "math")):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        question = rng.choice(
            [
                f"{rng.choice(sentences)} What is ${a} + {b}$?",
                f"If ${rng.choice('xyn')} = {a}$, what is ${b} {rng.choice('+-')} {rng.choice('xyn')}$?",
                f"How many {rng.choice(words)} are there if each of {a} boxes holds {b}?",
            ]
        )
        answer = rng.choice([str(rng.randint(-20, 200)), f"\\frac{{{a % 9 + 1}}}{{{b % 11 + 2}}}"])
        item = Item(task="math", id=f"generic-{index}", question=question, gold=answer)
        thought = rng.choice(MATH_THOUGHTS).format(answer=answer)
        pairs.append((attempt_messages(task, item), render_attempt(task, thought, answer)))
    return pairs


@corpus_part("generic/free")
def generic_free(rng: random.Random, settings: TinySettings) -> list[Pair]:
    """BIG-bench free-text rows: a random passage, a question, a few words of the passage as answer."""

    task = _task("bigbench")
    sentences, _ = _sentences_and_words()
    pairs = []
    for index in range(_generic_count(settings, "free")):
        passage = " ".join(rng.sample(sentences, 2))
        words = [w.strip(".,;:()`'\"") for w in passage.split() if len(w.strip(".,;:()`'\"")) > 2]
        start = rng.randrange(len(words))
        answer = " ".join(words[start : start + rng.choice([1, 1, 2])])
        question = (
            f"{passage}\n\nQuestion: {rng.choice(['What', 'Which', 'Where', 'Who'])} {rng.choice(sentences).lower()}"
        )
        item = Item(
            task="bigbench", id=f"generic-{index}", question=question, gold=answer, metadata={"answer_type": "free"}
        )
        thought = rng.choice(FREE_THOUGHTS).format(answer=answer)
        pairs.append((attempt_messages(task, item), render_attempt(task, thought, answer)))
    return pairs


@corpus_part("generic/code")
def generic_code(rng: random.Random, settings: TinySettings) -> list[Pair]:
    """MBPP-style tasks on random names: a one-line function and the asserts it passes."""

    task = _task("mbpp")
    _, words = _sentences_and_words()
    bodies = (
        ("add {k} to a number", "n + {k}", lambda n, k: n + k),
        ("multiply a number by {k}", "n * {k}", lambda n, k: n * k),
        ("subtract {k} from a number", "n - {k}", lambda n, k: n - k),
    )
    pairs = []
    for index in range(_generic_count(settings, "code")):
        name = "_".join(w.lower() for w in rng.sample(words, 2))
        k = rng.randint(2, 9)
        goal, expression, compute = rng.choice(bodies)
        code = f"def {name}(n):\n    return {expression.format(k=k)}"
        tests = [f"assert {name}({x}) == {compute(x, k)}" for x in rng.sample(range(-5, 20), 2)]
        goal = goal.format(k=k)
        item = Item(
            task="mbpp",
            id=f"generic-{index}",
            question=official_question(f"Write a function to {goal}.", tests),
            gold=code,
        )
        thought = rng.choice(CODE_THOUGHTS).format(name=name)
        pairs.append((attempt_messages(task, item), render_attempt(task, thought, code)))
    return pairs
