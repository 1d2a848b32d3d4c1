"""Built-in stand-in models: small models made on this machine, with no download.

They exist so that every notebook, test and CI run has a model to drive, offline. They are
**stand-ins for demos and tests, not research models**:

* ``builtin:tiny`` is a 4-layer Llama (about 4 M parameters) trained here, on CPU, in a couple of
  minutes, on text rendered by the package's own prompt builders. It writes answers in each task's
  format (``Thought: ...`` then ``Action: Finish[B]``) and, by design, gets some right and some
  wrong: 60 % of its training answers are gold and 40 % are plausible wrong answers, so it learns
  the format, not the tasks. The training corpus is a list of named parts
  (:data:`CORPUS_PARTS`); a stage that needs the stand-in to write another kind of text (a
  reflection, a judgement) adds a part with :func:`corpus_part`, and the model is rebuilt.
* ``builtin:random-1b`` and ``builtin:random-8b`` have the shapes of Llama-3.2-1B and Llama-3-8B
  with random weights, for speed and memory measurements on a GPU. Their weights are never
  written to disk. They never stop by themselves (eos is as likely as any other token), so a
  benchmark fixes the output length with ``max_new_tokens``.

Built artefacts live in ``cache_dir()/models``. The folder name of ``builtin:tiny`` carries a hash
of everything that shapes it (the rendered corpus, the training settings, :data:`BUILDER_VERSION`),
so a change to the prompt builders gives a new folder and a rebuild; a file lock makes concurrent
processes build it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import inspect
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from reflectevo.models import ModelLoadError, cache_dir
from reflectevo.prompts import gold_answer

log = logging.getLogger(__name__)

# Bump when the build changes in a way the hash below cannot see (the training loop, the template).
BUILDER_VERSION = "tiny-2"

TINY = "builtin:tiny"
RANDOM_1B = "builtin:random-1b"
RANDOM_8B = "builtin:random-8b"

# The chat format of the built-in tokenizers. The {% generation %} markers let TRL compute
# assistant-only losses; transformers renders templates with trim_blocks, hence the explicit '\n'.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
PAD, END = "<|pad|>", "<|end|>"
SPECIAL_TOKENS = [PAD, END, "<|user|>", "<|assistant|>", "<|system|>"]

# Stdlib modules whose docstrings widen the tokenizer's vocabulary and feed the generic examples:
# available offline on every CPython (they differ between Python versions; the hash sees that).
DOCSTRING_MODULES = (
    "json", "re", "collections", "argparse", "random", "string", "textwrap", "functools", "itertools",
    "statistics", "fractions", "decimal", "datetime", "calendar", "pathlib", "logging", "unittest",
    "difflib", "csv", "heapq", "bisect", "shutil", "zipfile", "os",
)


@dataclass(frozen=True)
class TinySettings:
    """Everything that shapes ``builtin:tiny`` besides its corpus. All of it goes into the cache key."""

    # model: the "M" size of the feasibility study (3.9 M parameters, 16 MB on disk)
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 8
    vocab_size: int = 2048
    # training: a fixed step count makes the build bit-reproducible (a time budget would not)
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1  # cosine decay down to this share of the peak
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float = 1.0
    max_row_tokens: int = 512  # longer rows are dropped: they cost time (judge prompts reach about 490)
    length_buckets: int = 4  # draw this many batches at once and group them by length: less padding
    seed: int = 0
    # corpus
    renders_per_item: int = 6  # answer renders per training item, each with its own thought
    gold_share: float = 0.6  # the rest are plausible wrong answers
    generic_examples: int = 320  # format-only examples on random text, split as GENERIC_SHARES says

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_TINY = TinySettings()

# Builds builtin:tiny from another seed: a different corpus draw and training run, so a different
# model, as a build on another CPU is (float rounding differs between CPUs). Running the tests with
# it checks that no expectation depends on what one build of the stand-in happens to write.
TINY_SEED_ENV = "REFLECTEVO_TINY_SEED"


def default_tiny_settings() -> TinySettings:
    """:data:`DEFAULT_TINY`, with the seed of ``$REFLECTEVO_TINY_SEED`` when it is set."""
    configured = os.environ.get(TINY_SEED_ENV, "").strip()
    if not configured:
        return DEFAULT_TINY
    if not configured.isdigit():
        raise ValueError(f"{TINY_SEED_ENV} must be a non-negative integer seed, got {configured!r}")
    return dataclasses.replace(DEFAULT_TINY, seed=int(configured))

# How the generic examples divide between the answer layouts (multiple choice is the most varied).
GENERIC_SHARES = {"choice": 0.6, "math": 0.15, "free": 0.15, "code": 0.1}

# One training example: the chat messages of the prompt, then the assistant's completion.
Pair = tuple[list[dict[str, str]], str]


# ---- corpus ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusPart:
    """A named source of training pairs. ``build(rng, settings)`` returns the pairs."""

    name: str
    build: Callable[[random.Random, TinySettings], list[Pair]]


# The parts are all registered in this module, so the corpus (and with it the model) never depends
# on which other modules happen to be imported. A new kind of text gets a new part below.
CORPUS_PARTS: list[CorpusPart] = []


def corpus_part(name: str) -> Callable:
    """Register a function as a corpus part of ``builtin:tiny`` (a decorator, used in this module)."""

    def register(function: Callable[[random.Random, TinySettings], list[Pair]]) -> Callable:
        if any(part.name == name for part in CORPUS_PARTS):
            raise ValueError(f"a corpus part named {name!r} is already registered")
        CORPUS_PARTS.append(CorpusPart(name, function))
        return function

    return register


def build_corpus(settings: TinySettings = DEFAULT_TINY, parts: list[CorpusPart] | None = None) -> list[tuple[str, Pair]]:
    """All training pairs as ``(part name, pair)``. Each part draws from its own seeded generator,
    so adding a part leaves the other parts' text unchanged."""
    corpus = []
    for part in CORPUS_PARTS if parts is None else parts:
        rng = random.Random(f"{settings.seed}:{part.name}")
        corpus.extend((part.name, pair) for pair in part.build(rng, settings))
    return corpus


def _task(name: str):
    from reflectevo.tasks import get_task

    return get_task(name)


def _attempt_pairs(task_name: str, rng: random.Random, settings: TinySettings, wrong_answer: Callable, thought: Callable) -> list[Pair]:
    """Attempt renders for the built-in *train* items of one task: gold answers, else a wrong one."""
    from reflectevo.prompts import attempt_messages, render_attempt

    task = _task(task_name)
    pairs = []
    for item in task.load_samples("train"):
        messages = attempt_messages(task, item, fewshots=0)
        for _ in range(settings.renders_per_item):
            correct = rng.random() < settings.gold_share
            answer = gold_answer(item) if correct else wrong_answer(item, rng)
            pairs.append((messages, render_attempt(task, thought(item, answer, correct, rng), answer)))
    return pairs


def _other_letter(item, rng: random.Random) -> str:
    letters = [chr(ord("A") + i) for i in range(len(item.options))]
    return rng.choice([letter for letter in letters if letter != item.gold.upper()])


def _option_text(item, letter: str) -> str:
    return item.options[ord(letter) - ord("A")]


# Short thoughts: copying long option texts is what a model this small gets wrong most.
CHOICE_THOUGHTS = (
    "Option {letter} follows from the statements.",
    "The statements point to option {letter}.",
    "Comparing the options, {letter} fits best.",
    "Only option {letter} agrees with the passage.",
    "Checking each option in turn, the answer is {letter}.",
)


def _choice_thought(item, letter: str, correct: bool, rng: random.Random) -> str:
    return rng.choice(CHOICE_THOUGHTS).format(letter=letter)


@corpus_part("attempts/logiqa")
def logiqa_attempts(rng: random.Random, settings: TinySettings) -> list[Pair]:
    return _attempt_pairs("logiqa", rng, settings, _other_letter, _choice_thought)


_NUMBER = re.compile(r"\d+")


def perturbed_number_answer(item, rng: random.Random) -> str:
    """A near miss for MATH: one number of the gold answer moved by 1 to 3 (``\\frac{7}{8}`` -> ``\\frac{6}{8}``)."""
    numbers = list(_NUMBER.finditer(item.gold))
    if not numbers:
        return str(rng.randint(2, 30))
    target = rng.choice(numbers)
    value = int(target.group())
    shifted = max(0, value + rng.choice([-3, -2, -1, 1, 2, 3]))
    if shifted == value:
        shifted = value + 1
    return item.gold[: target.start()] + str(shifted) + item.gold[target.end() :]


MATH_THOUGHTS = (
    "Working through the arithmetic step by step gives {answer}.",
    "I set up the expression and simplify it, which gives {answer}.",
    "Computing carefully, the result is {answer}.",
)


def _math_thought(item, answer: str, correct: bool, rng: random.Random) -> str:
    solution = item.metadata.get("solution") or ""
    if correct and solution and rng.random() < 1 / 3:
        # the worked solution, its \boxed{} unwrapped: the answer appears as plain text
        return re.sub(r"\\boxed\{(.*)\}", r"\1", solution).strip()
    return rng.choice(MATH_THOUGHTS).format(answer=answer)


@corpus_part("attempts/math")
def math_attempts(rng: random.Random, settings: TinySettings) -> list[Pair]:
    return _attempt_pairs("math", rng, settings, perturbed_number_answer, _math_thought)


# wrong-but-plausible code: one operator or constant changed, or the body left out
# (each one checked to fail the tests of the sample item it applies to; the tests re-check this)
_CODE_MUTATIONS = (
    (" + ", " - "), (" - ", " + "), (" * ", " + "), ("==", "!="), (" < ", " <= "), (" <= ", " < "),
    (" > ", " < "), ("[::-1]", "[::1]"), ("[1:]", "[2:]"), ("= items[0]", "= 0"), ("% 2 == 0", "% 2 == 1"),
    ("return True", "return False"), ("result = 1", "result = 0"), ("0, 1", "1, 1"), ("len(", "sum("),
)


def wrong_code_answer(item, rng: random.Random) -> str:
    """A wrong or partial function for MBPP: a mutated operator, or the signature with a stub body."""
    code = item.gold
    mutations = [(old, new) for old, new in _CODE_MUTATIONS if old in code]
    if mutations and rng.random() < 0.7:
        old, new = rng.choice(mutations)
        return code.replace(old, new, 1)
    signature = next((line for line in code.splitlines() if line.startswith("def ")), "def solution(*args):")
    return f"{signature}\n    {rng.choice(['return None', 'pass', 'return 0', 'return []'])}"


CODE_THOUGHTS = (
    "I will write {name} and return the result.",
    "The function {name} needs only a few lines.",
    "I define {name} so that the tests pass.",
)


def _code_thought(item, answer: str, correct: bool, rng: random.Random) -> str:
    match = re.search(r"def (\w+)", answer)
    return rng.choice(CODE_THOUGHTS).format(name=match.group(1) if match else "the function")


@corpus_part("attempts/mbpp")
def mbpp_attempts(rng: random.Random, settings: TinySettings) -> list[Pair]:
    return _attempt_pairs("mbpp", rng, settings, wrong_code_answer, _code_thought)


_STOPWORDS = frozenset(
    ("a", "an", "the", "and", "or", "but", "of", "in", "on", "at", "to", "from", "by", "for", "with", "was",
     "were", "is", "are", "be", "been", "it", "its", "his", "her", "their", "this", "that", "after", "before",
     "when", "while", "as", "than", "then", "into", "over", "under", "about", "which", "who", "what", "where")
)


def wrong_phrase_answer(item, rng: random.Random) -> str:
    """A wrong short answer for a free-text BIG-bench row: another word or two of its passage."""
    passage = item.question.split("Question:")[0]
    gold_words = {word.lower() for word in re.findall(r"[\w.:]+", item.gold)}
    words = [w.strip(".,;:!?") for w in passage.split()]
    candidates = [w for w in words if len(w) > 2 and w.lower() not in _STOPWORDS and w.lower() not in gold_words]
    if not candidates:
        return "none"
    start = rng.randrange(len(candidates))
    return " ".join(candidates[start : start + rng.choice([1, 1, 2])])


def _bigbench_wrong(item, rng: random.Random) -> str:
    return _other_letter(item, rng) if item.options else wrong_phrase_answer(item, rng)


FREE_THOUGHTS = (
    "The passage says it is {answer}.",
    "Reading the passage again, the answer is {answer}.",
    "The relevant sentence points to {answer}.",
)
VERDICT_THOUGHTS = (
    "Reading the passage, the claim is {text}.",
    "Based only on the passage, the answer is {text}.",
    "The passage leads to {text}, option {letter}.",
)


def _bigbench_thought(item, answer: str, correct: bool, rng: random.Random) -> str:
    if item.options:
        return rng.choice(VERDICT_THOUGHTS).format(letter=answer, text=_option_text(item, answer))
    return rng.choice(FREE_THOUGHTS).format(answer=answer)


@corpus_part("attempts/bigbench")
def bigbench_attempts(rng: random.Random, settings: TinySettings) -> list[Pair]:
    return _attempt_pairs("bigbench", rng, settings, _bigbench_wrong, _bigbench_thought)


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
    "1": ("Next time I will check every option against the question before I answer.",
          "Next time I will reason one step at a time and test my answer at the end."),
    "2": ("The fix is to rule out {answer} and test the remaining answers one by one.",
          "The fix is to redo the key step and compare the result with each option."),
}
CONCRETE_FIX = "The fix is"


def _wrong_answer(task_name: str, item, rng: random.Random) -> str:
    return {"logiqa": _other_letter, "math": perturbed_number_answer, "mbpp": wrong_code_answer,
            "bigbench": _bigbench_wrong}[task_name](item, rng)


def _thought(task_name: str, item, answer: str, correct: bool, rng: random.Random) -> str:
    return {"logiqa": _choice_thought, "math": _math_thought, "mbpp": _code_thought,
            "bigbench": _bigbench_thought}[task_name](item, answer, correct, rng)


def _failed_first_trial(task_name: str, item, rng: random.Random) -> tuple[str, str, str]:
    """A wrong first attempt at a training item: (answer, attempt text, feedback)."""
    from reflectevo.tasks.base import INCORRECT_OBSERVATION

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
    verify, check, plan = instruction.key.split("-") if instruction.key.count("-") == 2 else (
        rng.choice("12"), rng.choice("12345678"), rng.choice("12"))
    named = _named(task_name, answer)
    return " ".join([rng.choice(REFLECTION_OPENINGS[verify]).format(answer=named), rng.choice(REFLECTION_CHECKS[check]),
                     rng.choice(REFLECTION_PLANS[plan]).format(answer=named)])


def _random_instruction(rng: random.Random):
    from reflectevo.prompts import GENERIC_INSTRUCTION, INSTRUCTIONS

    return GENERIC_INSTRUCTION if rng.random() < 0.2 else INSTRUCTIONS[rng.choice(sorted(INSTRUCTIONS))]


REFLECTIONS_PER_ITEM = 3
SECOND_TRIALS_PER_ITEM = 6
JUDGEMENTS_PER_ITEM = 6
SECOND_TRIAL_GOLD_SHARE = 0.6  # as for first attempts: the rest are new wrong answers
GENERIC_SECOND_TRIALS = 160  # multiple-choice second trials on random text: never repeat the rejected letter


def _reflection_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    from reflectevo.prompts import reflection_prompt

    pairs = []
    for item in _task(task_name).load_samples("train"):
        for _ in range(REFLECTIONS_PER_ITEM):
            answer, attempt, feedback = _failed_first_trial(task_name, item, rng)
            instruction = _random_instruction(rng)
            user = reflection_prompt(item, attempt, feedback, instruction)
            pairs.append(([{"role": "user", "content": user}], stand_in_reflection(task_name, answer, instruction, rng)))
    return pairs


def _second_trial_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    from reflectevo.prompts import second_trial_prompt

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
    from reflectevo.prompts import render_attempt

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
    from reflectevo.prompts import INSTRUCTIONS, judge_prompt

    pairs = []
    for item in _task(task_name).load_samples("train"):
        for _ in range(JUDGEMENTS_PER_ITEM):
            answer, attempt, feedback = _failed_first_trial(task_name, item, rng)
            a, b = (stand_in_reflection(task_name, answer, INSTRUCTIONS[rng.choice(sorted(INSTRUCTIONS))], rng) for _ in range(2))
            fix_a, fix_b = CONCRETE_FIX in a, CONCRETE_FIX in b
            verdict = "tie" if fix_a == fix_b else ("A" if fix_a else "B")
            why = {"A": "Reflection A gives a concrete fix.", "B": "Reflection B gives a concrete fix.",
                   "tie": "Both reflections give the same kind of plan."}[verdict]
            user = judge_prompt(item, attempt, feedback, a, b)
            pairs.append(([{"role": "user", "content": user}], f"{why}\nVerdict: {verdict}"))
    return pairs


@corpus_part("generic/second_trials")
def generic_second_trials(rng: random.Random, settings: TinySettings) -> list[Pair]:
    """Second trials on random multiple-choice questions: any letter but the one the verdict rejected,
    so the stand-in learns to act on a failed attempt on questions it never saw."""
    from reflectevo.prompts import (
        GENERIC_INSTRUCTION,
        render_attempt,
        second_trial_prompt,
    )
    from reflectevo.tasks.base import INCORRECT_OBSERVATION

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
        pairs.append(([{"role": "user", "content": user}], render_attempt(task, rng.choice(CHOICE_THOUGHTS).format(letter=letter), letter)))
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
    "correct": ("Checking the attempt again, {answer} agrees with the question.", "Each step holds, so {answer} is right.",
                "Going through the steps, {answer} follows."),
    "wrong": ("Checking the attempt again, {answer} does not follow from the question.", "One step fails, so {answer} is wrong.",
              "Going through the steps, {answer} does not hold."),
}
TRUE_JUDGEMENT_SHARE = 0.7  # reviews and self-verdicts that judge the first attempt rightly
RETRIES_PER_ITEM = 1  # the retry prompt is a second-trial prompt without reflection: little new to learn
REVIEWS_PER_ITEM = 2
REVIEW_SECOND_TRIALS_PER_ITEM = 4  # keeping an answer goes against every other second trial
SELF_VERIFICATIONS_PER_ITEM = 2
REVIEW_OMITTED_SHARE = 0.2  # oracle-free second attempts with no review (a plain retry)


def _first_trial(task_name: str, item, correct: bool, rng: random.Random) -> tuple[str, str]:
    """A first attempt at an item, right (gold) or wrong: (answer, attempt text)."""
    from reflectevo.prompts import render_attempt

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
    from reflectevo.prompts import GENERIC_INSTRUCTION

    if not holds:
        return stand_in_reflection(task_name, answer, GENERIC_INSTRUCTION, rng)
    named = _named(task_name, answer)
    return " ".join([rng.choice(REVIEW_HOLDS_OPENINGS).format(answer=named), rng.choice(REVIEW_HOLDS_CHECKS),
                     rng.choice(REVIEW_HOLDS_CLOSINGS)])


def _retry_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    from reflectevo.prompts import second_trial_prompt

    task = _task(task_name)
    pairs = []
    for item in task.load_samples("train"):
        for _ in range(RETRIES_PER_ITEM):
            wrong, attempt, feedback = _failed_first_trial(task_name, item, rng)
            user = second_trial_prompt(task, item, None, previous=(attempt, feedback))
            pairs.append(([{"role": "user", "content": user}], _new_attempt(task_name, item, wrong, rng)))
    return pairs


def _review_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    from reflectevo.prompts import review_prompt

    pairs = []
    for item in _task(task_name).load_samples("train"):
        for _ in range(REVIEWS_PER_ITEM):
            answer, attempt, _, holds = _judged_first_trial(task_name, item, rng)
            pairs.append(([{"role": "user", "content": review_prompt(item, attempt)}], stand_in_review(task_name, answer, holds, rng)))
    return pairs


def _review_second_trial_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    from reflectevo.prompts import render_attempt, review_second_trial_prompt

    task = _task(task_name)
    pairs = []
    for item in task.load_samples("train"):
        for _ in range(REVIEW_SECOND_TRIALS_PER_ITEM):
            answer, attempt, right, holds = _judged_first_trial(task_name, item, rng)
            review = stand_in_review(task_name, answer, holds, rng)
            user = review_second_trial_prompt(task, item, None if rng.random() < REVIEW_OMITTED_SHARE else review, attempt)
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
    from reflectevo.prompts import (
        GENERIC_INSTRUCTION,
        one_stage_completion,
        one_stage_prompt,
        review_prompt,
        with_one_stage_suffix,
    )

    task = _task(task_name)
    pairs = []
    for item in task.load_samples("train"):
        wrong, attempt, feedback = _failed_first_trial(task_name, item, rng)
        reflection = stand_in_reflection(task_name, wrong, GENERIC_INSTRUCTION, rng)
        pairs.append(([{"role": "user", "content": one_stage_prompt(task, item, attempt, feedback, GENERIC_INSTRUCTION)}],
                      one_stage_completion(reflection, _new_attempt(task_name, item, wrong, rng))))
        answer, attempt, _, holds = _judged_first_trial(task_name, item, rng)
        second = attempt if holds else _new_attempt(task_name, item, answer, rng)
        pairs.append(([{"role": "user", "content": with_one_stage_suffix(task, review_prompt(item, attempt))}],
                      one_stage_completion(stand_in_review(task_name, answer, holds, rng), second)))
    return pairs


def _self_verify_pairs(task_name: str, rng: random.Random, settings: TinySettings) -> list[Pair]:
    from reflectevo.prompts import self_verify_prompt

    pairs = []
    for item in _task(task_name).load_samples("train"):
        for _ in range(SELF_VERIFICATIONS_PER_ITEM):
            answer, attempt, _, judged_right = _judged_first_trial(task_name, item, rng)
            verdict = "correct" if judged_right else "wrong"
            named = "my code" if task_name == "mbpp" else f"my answer {answer}"
            reason = rng.choice(SELF_VERIFY_REASONS[verdict]).format(answer=named)
            pairs.append(([{"role": "user", "content": self_verify_prompt(item, attempt)}], f"{reason}\nVerdict: {verdict}"))
    return pairs


for _name in ("logiqa", "math", "mbpp", "bigbench"):
    corpus_part(f"reflections/{_name}")(lambda rng, settings, _n=_name: _reflection_pairs(_n, rng, settings))
    corpus_part(f"second_trials/{_name}")(lambda rng, settings, _n=_name: _second_trial_pairs(_n, rng, settings))
    corpus_part(f"judgements/{_name}")(lambda rng, settings, _n=_name: _judgement_pairs(_n, rng, settings))
    corpus_part(f"one_stage/{_name}")(lambda rng, settings, _n=_name: _one_stage_pairs(_n, rng, settings))
    corpus_part(f"retries/{_name}")(lambda rng, settings, _n=_name: _retry_pairs(_n, rng, settings))
    corpus_part(f"reviews/{_name}")(lambda rng, settings, _n=_name: _review_pairs(_n, rng, settings))
    corpus_part(f"review_second_trials/{_name}")(lambda rng, settings, _n=_name: _review_second_trial_pairs(_n, rng, settings))
    corpus_part(f"self_verify/{_name}")(lambda rng, settings, _n=_name: _self_verify_pairs(_n, rng, settings))


# ---- generic format-only examples: random text, so the format holds on unseen questions ----------
@lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Docstrings of a fixed list of stdlib modules (offline on every CPython), de-duplicated."""
    docs: list[str] = []
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        members = [obj for name, obj in sorted(vars(module).items()) if not name.startswith("_")]
        for obj in [module, *members]:
            if obj is module or inspect.isfunction(obj) or inspect.isclass(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 40:
                    docs.append(doc)
    return tuple(dict.fromkeys(docs))


@lru_cache(maxsize=1)
def _sentences_and_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    sentences = []
    for doc in stdlib_docstrings():
        for sentence in re.split(r"(?<=[.?!])\s+", doc):
            sentence = " ".join(sentence.split())
            if 4 <= len(sentence.split()) <= 25 and not any(ch in sentence for ch in "[]<>{}"):
                sentences.append(sentence)
    words = {w.strip(".,:;()`'\"") for s in sentences for w in s.split()}
    return tuple(sentences), tuple(sorted(w for w in words if w.isalpha() and len(w) > 2))


def _generic_count(settings: TinySettings, layout: str) -> int:
    return round(settings.generic_examples * GENERIC_SHARES[layout])


def random_choice_item(rng: random.Random, item_id: str):
    """(task, item): a multiple-choice question on random docstring text, in the LogiQA layout
    (``A.text`` lines, 4 options) or the BIG-bench one (``Options:``, 2-4 options). Its gold is "a";
    the generic examples pick their own letter."""
    from reflectevo.tasks import Item

    sentences, words = _sentences_and_words()
    task = _task(rng.choice(["logiqa", "bigbench"]))
    n_options = 4 if task.name == "logiqa" else rng.randint(2, 4)
    options = [" ".join(rng.sample(words, rng.randint(1, 3))).capitalize() for _ in range(n_options)]
    letters = [chr(ord("A") + i) for i in range(n_options)]
    if task.name == "logiqa":
        body = "\n".join(f"{letter}.{text}" for letter, text in zip(letters, options))
        question = f"{rng.choice(sentences)}\nWhich of the following is supported?\n{body}"
    else:
        body = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, options))
        question = f"{rng.choice(sentences)}\n\nQuestion: {rng.choice(sentences)}\nOptions:\n{body}"
    return task, Item(task=task.name, id=item_id, question=question, gold="a", options=options)


@corpus_part("generic/choice")
def generic_choice(rng: random.Random, settings: TinySettings) -> list[Pair]:
    """Multiple choice in the LogiQA layout (``A.text`` lines) and the BIG-bench one (``Options:``)."""
    from reflectevo.prompts import attempt_messages, render_attempt

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
    from reflectevo.prompts import attempt_messages, render_attempt
    from reflectevo.tasks import Item

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
    from reflectevo.prompts import attempt_messages, render_attempt
    from reflectevo.tasks import Item

    task = _task("bigbench")
    sentences, _ = _sentences_and_words()
    pairs = []
    for index in range(_generic_count(settings, "free")):
        passage = " ".join(rng.sample(sentences, 2))
        words = [w.strip(".,;:()`'\"") for w in passage.split() if len(w.strip(".,;:()`'\"")) > 2]
        start = rng.randrange(len(words))
        answer = " ".join(words[start : start + rng.choice([1, 1, 2])])
        question = f"{passage}\n\nQuestion: {rng.choice(['What', 'Which', 'Where', 'Who'])} {rng.choice(sentences).lower()}"
        item = Item(task="bigbench", id=f"generic-{index}", question=question, gold=answer, metadata={"answer_type": "free"})
        thought = rng.choice(FREE_THOUGHTS).format(answer=answer)
        pairs.append((attempt_messages(task, item), render_attempt(task, thought, answer)))
    return pairs


@corpus_part("generic/code")
def generic_code(rng: random.Random, settings: TinySettings) -> list[Pair]:
    """MBPP-style tasks on random names: a one-line function and the asserts it passes."""
    from reflectevo.prompts import attempt_messages, render_attempt
    from reflectevo.tasks import Item
    from reflectevo.tasks.mbpp import official_question

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
        item = Item(task="mbpp", id=f"generic-{index}", question=official_question(f"Write a function to {goal}.", tests), gold=code)
        thought = rng.choice(CODE_THOUGHTS).format(name=name)
        pairs.append((attempt_messages(task, item), render_attempt(task, thought, code)))
    return pairs


# ---- tokenizer ---------------------------------------------------------------------------------
def train_bpe(texts: Iterator[str] | list[str], vocab_size: int):
    """A byte-level BPE (every byte has a token, so no text is ever unknown) with our special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


def wrap_tokenizer(bpe):
    """The transformers tokenizer around a trained BPE: pad, eos and the chat template set."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=END, bos_token=None, unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def prompt_text(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_pair(tokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + end token, and labels that mask the prompt (-100)."""
    messages, completion = pair
    prompt_ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion + END, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


# ---- builtin:tiny: build, quality check, cache ---------------------------------------------------
def tiny_cache_key(settings: TinySettings | None = None, corpus: list[tuple[str, Pair]] | None = None) -> str:
    """sha256 of everything that shapes the model: builder version, settings, chat format, corpus, docstrings."""
    settings = default_tiny_settings() if settings is None else settings
    corpus = build_corpus(settings) if corpus is None else corpus
    digest = hashlib.sha256()
    header = {"builder": BUILDER_VERSION, "settings": settings.to_dict(), "template": CHAT_TEMPLATE, "specials": SPECIAL_TOKENS}
    digest.update(json.dumps(header, sort_keys=True).encode() + b"\n")
    for name, (messages, completion) in corpus:
        digest.update(json.dumps([name, messages, completion], ensure_ascii=False).encode() + b"\n")
    for doc in stdlib_docstrings():
        digest.update(json.dumps(doc, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def tiny_model_dir(settings: TinySettings | None = None) -> Path:
    """The folder of ``builtin:tiny`` (:func:`default_tiny_settings` unless ``settings`` are given),
    built first if this cache does not hold it yet.

    Safe to call from several processes at once: one builds (into a temporary folder renamed into
    place when complete), the others wait on the lock and then use its result.
    """
    settings = default_tiny_settings() if settings is None else settings
    corpus = build_corpus(settings)
    key = tiny_cache_key(settings, corpus)
    final = cache_dir() / "models" / f"tiny-{key[:16]}"

    def build(staging: Path) -> None:
        _announce(f"building the stand-in model {TINY} in {final} (once per corpus version; about 5 minutes on 2 CPU cores)")
        info = build_tiny(staging, settings, corpus, key)
        quality = info["quality"]["overall"]
        _announce(
            f"built {TINY} in {info['build_seconds']:.0f} s: validation answers parseable {quality['parseable']:.2f}, "
            f"accuracy {quality['accuracy']:.2f} (a stand-in for demos and tests, not a research model)"
        )

    return _build_once(final, "standin.json", f"{TINY} in {final}", build)


def _build_once(final: Path, marker: str, what: str, build: Callable[[Path], Any]) -> Path:
    """``final``, built by ``build(staging)`` first unless it holds ``marker`` (a file a build writes).

    Safe from several processes at once: one builds into a temporary folder beside ``final`` and
    renames it into place when complete; the others wait on the lock and then use its result.
    """
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final.parent / f".{final.name}.lock", what=what):
        if (final / marker).is_file():
            return final  # built by another process while this one waited
        if final.exists():  # an incomplete folder left by hand: a complete one always has the marker
            shutil.rmtree(final)
        # staging folders of builders that were killed: whoever holds the lock is the only builder alive
        for stale in final.parent.glob(f".{final.name}-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def _exclusive_lock(path: Path, what: str) -> Iterator[None]:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _announce(f"waiting for another process that is building {what}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _announce(message: str) -> None:
    # a build takes minutes: say so even when the application has not configured logging
    log.info(message)
    if not log.hasHandlers():
        print(f"reflectevo: {message}", file=sys.stderr, flush=True)


def build_tiny(out_dir: Path, settings: TinySettings, corpus: list[tuple[str, Pair]], key: str, on_step: Callable | None = None) -> dict[str, Any]:
    """Train ``builtin:tiny`` into ``out_dir`` and write ``standin.json`` there last; returns its content.

    ``on_step(step, model, loss)`` is called after every optimiser step (for watching a build).
    """
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    texts = [text for _, (messages, completion) in corpus for text in (*(m["content"] for m in messages), completion)]
    tokenizer = wrap_tokenizer(train_bpe(texts + list(stdlib_docstrings()), settings.vocab_size))
    end_id = tokenizer.convert_tokens_to_ids(END)

    rows, dropped = [], 0
    for _, pair in corpus:
        ids, labels = encode_pair(tokenizer, pair)
        if len(ids) > settings.max_row_tokens:
            dropped += 1
            continue
        rows.append((ids, labels))
    if len(rows) < settings.batch_size:
        raise ModelLoadError(f"only {len(rows)} training rows fit in max_row_tokens={settings.max_row_tokens}")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=end_id,
        bos_token_id=None,
    )
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(config)
    train_started = time.perf_counter()
    losses = _train(model, rows, tokenizer.pad_token_id, settings, on_step)
    train_seconds = time.perf_counter() - train_started

    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = end_id
    quality = validation_quality(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    parts: dict[str, int] = {}
    for name, _ in corpus:
        parts[name] = parts.get(name, 0) + 1
    info = {
        "name": TINY,
        "note": "a stand-in for demos and tests, not a research model",
        "builder_version": BUILDER_VERSION,
        "cache_key": key,
        "settings": settings.to_dict(),
        "corpus_rows": len(corpus),
        "corpus_parts": parts,
        "rows_dropped_too_long": dropped,
        "steps": settings.steps,
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_seconds": round(train_seconds, 1),
        "build_seconds": round(time.perf_counter() - started, 1),
        "quality": quality,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out_dir / "standin.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


def _train(model, rows: list[tuple[list[int], list[int]]], pad_id: int, settings: TinySettings, on_step: Callable | None) -> list[float]:
    """Plain AdamW loop: warm-up, cosine decay, gradient clipping, a seeded choice of batches."""
    import torch

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=settings.adam_betas, weight_decay=settings.weight_decay
    )
    rng = random.Random(settings.seed)
    losses = []
    pending: list[list[tuple[list[int], list[int]]]] = []
    model.train()
    for step in range(settings.steps):
        if not pending:
            # a random pool of rows sorted by length, cut into batches: each batch pads to a similar length
            pool = rng.sample(rows, min(len(rows), settings.batch_size * settings.length_buckets))
            pool.sort(key=lambda row: len(row[0]))
            pending = [pool[i : i + settings.batch_size] for i in range(0, len(pool) - settings.batch_size + 1, settings.batch_size)]
            rng.shuffle(pending)
        warmup = min(1.0, (step + 1) / settings.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * warmup * (settings.final_lr_fraction + (1 - settings.final_lr_fraction) * cosine)
        input_ids, attention_mask, labels = _right_padded(pending.pop(), pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, model, losses[-1])
    return losses


def _right_padded(batch: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


# Generation lengths for the quality check: code answers are longer than the others.
QUALITY_MAX_NEW_TOKENS = {"mbpp": 160}
DEFAULT_QUALITY_MAX_NEW_TOKENS = 64


def greedy_attempts(model, tokenizer, task_name: str, items: list, max_new_tokens: int | None = None) -> list[str]:
    """Greedy first attempts of ``model`` on ``items`` of one task, zero-shot, in one left-padded batch."""
    from reflectevo.prompts import attempt_messages

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
    from reflectevo.tasks import task_names

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
    overall = {"items": total, "parseable": round(parsed / total, 4), "graded_items": graded, "accuracy": round(correct / max(graded, 1), 4)}
    return {"validation": per_task, "overall": overall, "reflection_stage": reflection_stage_quality(model, tokenizer),
            "evaluation_prompts": evaluation_prompt_quality(model, tokenizer), "outputs": outputs}


def reflection_stage_quality(model, tokenizer) -> dict[str, Any]:
    """How the stand-in does at stage 02's prompts, on the validation items of the multiple-choice and
    MATH tasks, each given a fixed wrong first attempt: reflections that contain no answer action,
    parseable second attempts, second attempts that repeat the rejected answer, parseable judge verdicts."""
    from reflectevo.prompts import (
        GENERIC_INSTRUCTION,
        judge_prompt,
        parse_verdict,
        reflection_prompt,
        second_trial_prompt,
    )

    rng = random.Random("reflection-stage-quality")
    cases = []
    for name in ("logiqa", "bigbench", "math"):
        for item in _task(name).load_samples("validation"):
            cases.append((name, item, *_failed_first_trial(name, item, rng)))
    user = [[{"role": "user", "content": reflection_prompt(item, attempt, feedback, GENERIC_INSTRUCTION)}]
            for _, item, _, attempt, feedback in cases]
    reflections = greedy_texts(model, tokenizer, user, DEFAULT_QUALITY_MAX_NEW_TOKENS)
    user = [[{"role": "user", "content": second_trial_prompt(_task(name), item, reflection, previous=(attempt, feedback))}]
            for (name, item, _, attempt, feedback), reflection in zip(cases, reflections)]
    seconds = greedy_texts(model, tokenizer, user, DEFAULT_QUALITY_MAX_NEW_TOKENS)
    answers = [_task(name).extract(text, "official", item).answer for (name, item, *_), text in zip(cases, seconds)]
    user = [[{"role": "user", "content": judge_prompt(item, attempt, feedback, reflections[i], reflections[i - 1])}]
            for i, (_, item, _, attempt, feedback) in enumerate(cases)]
    verdicts = [parse_verdict(text) for text in greedy_texts(model, tokenizer, user, DEFAULT_QUALITY_MAX_NEW_TOKENS)]
    n = len(cases)
    return {
        "cases": n,
        "reflections_without_action": round(sum("Action:" not in text and text.strip() != "" for text in reflections) / n, 4),
        "second_attempts_parseable": round(sum(answer is not None for answer in answers) / n, 4),
        "second_attempts_repeating_the_rejected_answer": round(sum(answer == wrong for answer, (_, _, wrong, *_) in zip(answers, cases)) / n, 4),
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
    from reflectevo.prompts import (
        GENERIC_INSTRUCTION,
        one_stage_prompt,
        parse_self_verdict,
        review_prompt,
        review_second_trial_prompt,
        second_trial_prompt,
        self_verify_prompt,
        split_one_stage,
    )

    rng = random.Random("evaluation-prompt-quality")
    retry_cases, cases = [], []
    for name in ("logiqa", "bigbench", "math"):
        for index, item in enumerate(_task(name).load_samples("validation")):
            retry_cases.append((name, item, *_failed_first_trial(name, item, rng)))
            cases.append((name, item, index % 2 == 0, *_first_trial(name, item, index % 2 == 0, rng)))

    def ask(prompts: list[str]) -> list[str]:
        return greedy_texts(model, tokenizer, [[{"role": "user", "content": prompt}] for prompt in prompts], DEFAULT_QUALITY_MAX_NEW_TOKENS)

    def answer(name: str, item, text: str) -> str | None:
        return _task(name).extract(text, "official", item).answer

    retries = ask([second_trial_prompt(_task(name), item, None, previous=(attempt, feedback))
                   for name, item, _, attempt, feedback in retry_cases])
    retry_answers = [answer(name, item, text) for (name, item, *_), text in zip(retry_cases, retries)]
    reviews = ask([review_prompt(item, attempt) for _, item, _, _, attempt in cases])
    seconds = ask([review_second_trial_prompt(_task(name), item, review, attempt)
                   for (name, item, _, _, attempt), review in zip(cases, reviews)])
    kept = [(answer(name, item, text), answer(name, item, attempt)) for (name, item, _, _, attempt), text in zip(cases, seconds)]
    verdicts = [parse_self_verdict(text) for text in ask([self_verify_prompt(item, attempt) for _, item, _, _, attempt in cases])]
    one_stage = greedy_texts(model, tokenizer, [[{"role": "user", "content": one_stage_prompt(
        _task(name), item, attempt, feedback, GENERIC_INSTRUCTION)}] for name, item, _, attempt, feedback in retry_cases], 2 * DEFAULT_QUALITY_MAX_NEW_TOKENS)
    one_stage_attempts = [split_one_stage(text)[1] for text in one_stage]
    n = len(cases)
    return {
        "cases": n,
        "retry_second_attempts_parseable": round(sum(a is not None for a in retry_answers) / n, 4),
        "retry_second_attempts_repeating_the_rejected_answer": round(
            sum(a == wrong for a, (_, _, wrong, *_) in zip(retry_answers, retry_cases)) / n, 4),
        "reviews_without_action": round(sum("Action:" not in text and text.strip() != "" for text in reviews) / n, 4),
        "review_second_attempts_parseable": round(sum(new is not None for new, _ in kept) / n, 4),
        "review_second_attempts_keeping_the_previous_answer": round(sum(new is not None and new == old for new, old in kept) / n, 4),
        "self_verdicts_parseable": round(sum(verdict is not None for verdict in verdicts) / n, 4),
        "self_verdicts_agreeing_with_the_grader": round(
            sum(verdict == ("correct" if right else "wrong") for verdict, (_, _, right, *_) in zip(verdicts, cases)) / n, 4),
        "self_verdicts": {verdict or "none": verdicts.count(verdict) for verdict in dict.fromkeys(verdicts)},
        "one_stage_attempts_parseable": round(sum(
            attempt is not None and answer(name, item, attempt) is not None
            for attempt, (name, item, *_) in zip(one_stage_attempts, retry_cases)) / n, 4),
    }


def read_standin_json(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "standin.json").read_text(encoding="utf-8"))


# ---- builtin:random-1b and builtin:random-8b ------------------------------------------------------
LLAMA3_VOCAB_SIZE = 128_256
RANDOM_INIT_SEED = 0
TOKENIZER_BUILDER_VERSION = "llama3-vocab-1"
TRAINED_MERGES_VOCAB = 8192  # the BPE part learnt from docstrings; filler tokens make up the rest

# The shapes of Llama-3.2-1B and Llama-3-8B (their config.json values), with Llama 3's vocabulary size.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    RANDOM_1B: {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
    },
    RANDOM_8B: {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "rms_norm_eps": 1e-5,
    },
}
BUILTIN_MODELS = (TINY, RANDOM_1B, RANDOM_8B)


def random_model_config(name: str, tokenizer=None):
    """The LlamaConfig of a random built-in; token ids come from ``tokenizer`` when given."""
    from transformers import LlamaConfig

    if name not in RANDOM_SHAPES:
        raise ModelLoadError(f"{name!r} is not a random built-in model; known: {', '.join(RANDOM_SHAPES)}")
    ids = {}
    if tokenizer is not None:
        ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    return LlamaConfig(vocab_size=LLAMA3_VOCAB_SIZE, **RANDOM_SHAPES[name], **ids)


def random_model_info(name: str) -> dict[str, Any]:
    return {
        "note": "random weights with a real model's shape: for speed and memory measurements only; it never stops by itself",
        "shape": RANDOM_SHAPES[name],
        "vocab_size": LLAMA3_VOCAB_SIZE,
        "seed": RANDOM_INIT_SEED,
    }


def random_model(name: str, device: str = "cpu", dtype: str = "float32", seed: int = RANDOM_INIT_SEED):
    """A random-init model of a real shape, created directly on ``device`` in ``dtype`` (never saved).

    Returns ``(model, tokenizer)``. The outputs are noise and do not end: pass ``max_new_tokens``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = llama3_vocab_tokenizer()
    config = random_model_config(name, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def random_model_dir(name: str, dtype: str = "bfloat16", seed: int = RANDOM_INIT_SEED) -> Path:
    """A random built-in saved to disk (``cache_dir()/models``), for loaders that read weights from a
    folder, such as Unsloth's. The same seed gives the same weights as :func:`random_model`, so both
    backends of a benchmark train and generate with identical models. Written once, atomically
    (about 2.5 GB for random-1b and 16 GB for random-8b in 16-bit)."""
    vocabulary = Path(llama3_vocab_tokenizer().name_or_path).name
    final = cache_dir() / "models" / f"{name.removeprefix('builtin:')}-{dtype}-seed{seed}-{vocabulary}"

    def build(staging: Path) -> None:
        model, tokenizer = random_model(name, device="cpu", dtype=dtype, seed=seed)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _build_once(final, "config.json", f"{name} saved to {final}", build)


def llama3_vocab_tokenizer():
    """A tokenizer with exactly Llama 3's 128,256 ids, every one of which decodes to text.

    A byte-level BPE learnt from stdlib docstrings, then padded with filler tokens (short strings
    of the byte-level alphabet, so they decode to bytes like any other token). Built once and kept
    in ``cache_dir()/models``.
    """
    from transformers import AutoTokenizer

    digest = hashlib.sha256(
        json.dumps([TOKENIZER_BUILDER_VERSION, LLAMA3_VOCAB_SIZE, TRAINED_MERGES_VOCAB, SPECIAL_TOKENS, CHAT_TEMPLATE]).encode()
    )
    for doc in stdlib_docstrings():
        digest.update(json.dumps(doc).encode())
    final = cache_dir() / "models" / f"llama3-vocab-{digest.hexdigest()[:16]}"
    _build_once(final, "tokenizer.json", f"the {LLAMA3_VOCAB_SIZE}-token tokenizer in {final}",
                lambda staging: _padded_tokenizer(LLAMA3_VOCAB_SIZE).save_pretrained(staging))
    return AutoTokenizer.from_pretrained(final)


def _padded_tokenizer(size: int):
    from tokenizers import Tokenizer, pre_tokenizers

    bpe = train_bpe(list(stdlib_docstrings()), TRAINED_MERGES_VOCAB)
    data = json.loads(bpe.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    next_id = bpe.get_vocab_size(with_added_tokens=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # two-character strings first (65,536 of them), then three-character ones, skipping learnt tokens
    for length in (2, 3):
        for chars in itertools.product(alphabet, repeat=length):
            if next_id == size:
                break
            token = "".join(chars)
            if token not in vocab:
                vocab[token] = next_id
                next_id += 1
    if next_id != size:
        raise ModelLoadError(f"could not pad the tokenizer to {size} ids (reached {next_id})")
    return wrap_tokenizer(Tokenizer.from_str(json.dumps(data)))
