"""The stand-in corpus's parts and its first attempts: a right or a plausibly wrong answer per task."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from reflectevo.models.builtin.generic import _task
from reflectevo.models.builtin.settings import TinySettings
from reflectevo.models.builtin.tokenizer import Pair
from reflectevo.prompts import (
    attempt_messages,
    gold_answer,
    render_attempt,
)


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


def _attempt_pairs(
    task_name: str, rng: random.Random, settings: TinySettings, wrong_answer: Callable, thought: Callable
) -> list[Pair]:
    """Attempt renders for the built-in *train* items of one task: gold answers, else a wrong one."""

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
    (" + ", " - "),
    (" - ", " + "),
    (" * ", " + "),
    ("==", "!="),
    (" < ", " <= "),
    (" <= ", " < "),
    (" > ", " < "),
    ("[::-1]", "[::1]"),
    ("[1:]", "[2:]"),
    ("= items[0]", "= 0"),
    ("% 2 == 0", "% 2 == 1"),
    ("return True", "return False"),
    ("result = 1", "result = 0"),
    ("0, 1", "1, 1"),
    ("len(", "sum("),
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
    (
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "of",
        "in",
        "on",
        "at",
        "to",
        "from",
        "by",
        "for",
        "with",
        "was",
        "were",
        "is",
        "are",
        "be",
        "been",
        "it",
        "its",
        "his",
        "her",
        "their",
        "this",
        "that",
        "after",
        "before",
        "when",
        "while",
        "as",
        "than",
        "then",
        "into",
        "over",
        "under",
        "about",
        "which",
        "who",
        "what",
        "where",
    )
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
