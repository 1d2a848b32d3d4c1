"""The prompts the model sees, built in one place so that every stage, the stand-in model's
training corpus and the golden-prompt tests render exactly the same text.

An *attempt* is the ReAct-style answer of the paper: one ``Thought:`` line of reasoning, then one
``Action:`` line in the task's answer syntax (``Finish[B]``, ``Finish<<<3/4>>>``, ``[BEGIN] code
[END]``). The wording is ours; the structure follows the paper's generator prompt (method.md §1.2).
Few-shot examples are optional: real models get the task's three worked examples, tiny models are
prompted zero-shot (their context is short and they were trained on the zero-shot form).

Bump :data:`PROMPT_VERSION` whenever the text a model sees changes; it is recorded in every run's
manifest and the built-in stand-in model is rebuilt automatically when its corpus changes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reflectevo.core.checks import did_you_mean, reject_duplicates
from reflectevo.core.seeds import derive_seed
from reflectevo.tasks.base import FewShot, Item, Task

PROMPT_VERSION = "attempt-1"

# Generation of an attempt ends at the action: the paper's environment appends the observation
# itself, so a model that goes on to write "Observation:" or a new "Question:" is cut there.
ATTEMPT_STOP = ("\nObservation", "\nQuestion:")

ATTEMPT_INTRO = (
    "Answer the question below. Write one line starting with Thought: that reasons about the "
    "question, then one line starting with Action: in which you {answer_format}."
)


def render_attempt(task: Task, thought: str, answer: str) -> str:
    """An attempt in the format the model must produce: ``Thought: ...`` then ``Action: ...``."""
    return f"Thought: {thought.strip()}\nAction: {task.render_answer(answer)}"


def render_fewshot(example: FewShot) -> str:
    return f"Question: {example.question}\nThought: {example.thought}\nAction: {example.action}"


def attempt_preamble(task: Task, fewshots: int = 0) -> list[str]:
    """The parts of an attempt prompt before the question: the instruction, then the examples."""
    if not 0 <= fewshots <= len(task.fewshots):
        raise ValueError(f"fewshots must be between 0 and {len(task.fewshots)} for task {task.name}, got {fewshots}")
    parts = [ATTEMPT_INTRO.format(answer_format=task.answer_format)]
    if fewshots:
        examples = "\n\n".join(render_fewshot(example) for example in task.fewshots[:fewshots])
        parts.append(f"Examples:\n\n{examples}\n\n(END OF EXAMPLES)")
    return parts


def attempt_prompt(task: Task, item: Item, fewshots: int = 0) -> str:
    """The user message of a first attempt. ``fewshots`` worked examples (0 to 3) precede the question."""
    return "\n\n".join([*attempt_preamble(task, fewshots), f"Question: {item.question}"])


def attempt_messages(task: Task, item: Item, fewshots: int = 0) -> list[dict[str, Any]]:
    """The chat messages of a first attempt (one user turn; the model's chat template wraps it)."""
    return [{"role": "user", "content": attempt_prompt(task, item, fewshots)}]


# The paper's attempt takes two calls (method.md §1.3): the thought with the answer pre-filled as
# "Thought: ", then the action with the thought in the prompt and "Action: " pre-filled. Our
# prefixes end before the space: byte-level BPE tokenizers attach a space to the word after it,
# so a prompt ending in a bare space asks for a token sequence the model rarely saw.
THOUGHT_PREFIX = "Thought:"
ACTION_PREFIX = "Action:"
THOUGHT_STOP = ("\nAction", "Action:", *ATTEMPT_STOP)


def thought_messages(user: str) -> list[dict[str, Any]]:
    """Call 1 of a two-call attempt: the assistant turn starts with ``Thought: ``."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": THOUGHT_PREFIX}]


def action_opening(task: Task, prefill: str = "action") -> str:
    """What call 2 of a two-call attempt is pre-filled with after ``Action:``: nothing (``prefill``
    "action", the paper's), or the task's answer syntax up to the answer (``"answer"``: `` Finish[``)."""
    if prefill == "action":
        return ""
    if prefill == "answer":
        return f" {task.answer_opening()}"
    raise ValueError(f"unknown attempt prefill {prefill!r}; choose action or answer")


def action_messages(user: str, thought: str, opening: str = "") -> list[dict[str, Any]]:
    """Call 2 of a two-call attempt: the thought is given, the assistant turn goes on at ``Action:``
    (and ``opening``, see :func:`action_opening`)."""
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": f"{THOUGHT_PREFIX} {thought.strip()}\n{ACTION_PREFIX}{opening}"},
    ]


def join_two_calls(thought: str, action: str, opening: str = "") -> str:
    """The attempt text of a two-call attempt, in the same shape as a one-call attempt (the pre-filled
    ``opening`` is part of the answer the model gave)."""
    if opening:
        return f"{THOUGHT_PREFIX} {thought.strip()}\n{ACTION_PREFIX}{opening}{action.rstrip()}"
    return f"{THOUGHT_PREFIX} {thought.strip()}\n{ACTION_PREFIX} {action.strip()}"


# ---- reflection: the instruction pool ----------------------------------------------------------
# A reflection instruction has three parts, one per stage of a reflection (method.md §2.1): how to
# verify the failed attempt (2 ways), which kind of error to look for (8 kinds, following the
# paper's error taxonomy) and what kind of plan to write (2 levels): 2 x 8 x 2 = 32 instructions,
# keyed "V-E-P" like the paper's ("1-1-1" ... "2-8-2"). The wording is ours.
REFLECTION_VERSION = "reflect-1"

VERIFY_STEPS = {
    "1": "Go through the failed attempt step by step, checking each step before moving to the next.",
    "2": "Read the failed attempt quickly as a whole, without checking every step.",
}
ERROR_CHECKS = {
    "1": "Look for calculation mistakes: is every arithmetic operation done correctly?",
    "2": "Look for mistakes in the method: are the steps the right ones, in the right order?",
    "3": "Look for flawed reasoning: does each conclusion really follow from what came before?",
    "4": "Look for contradictions: do any statements or conclusions disagree with each other?",
    "5": "Look for misreadings of the question: does the attempt answer what was actually asked, under its conditions?",
    "6": "Look for gaps: does the attempt address every part of the question, and nothing beside it?",
    "7": "Look for format problems: does the answer follow the required format exactly?",
    "8": "Look for factual mistakes: is every fact the attempt relies on correct?",
}
PLAN_LEVELS = {
    "1": "Then state a high-level plan: how to approach this kind of question so the same mistake does not happen again.",
    "2": "Then state a concrete plan: the specific corrections to make to this attempt.",
}


@dataclass(frozen=True)
class Instruction:
    """One reflection instruction of the pool; ``key`` is stored with every reflection it produced."""

    key: str  # "V-E-P"
    verify: str
    check: str
    plan: str

    @property
    def text(self) -> str:
        return f"{self.verify}\n{self.check}\n{self.plan}"


INSTRUCTIONS: dict[str, Instruction] = {
    f"{v}-{e}-{p}": Instruction(f"{v}-{e}-{p}", VERIFY_STEPS[v], ERROR_CHECKS[e], PLAN_LEVELS[p])
    for v in VERIFY_STEPS
    for e in ERROR_CHECKS
    for p in PLAN_LEVELS
}


# The instruction of the generic reflection prompt, outside the pool: no verify style, error kind or
# plan level is imposed. It is the reflection prompt at test time and of the training datasets by
# default, so that a reflector is trained and evaluated on one template (method.md §8.1.2).
GENERIC_INSTRUCTION = Instruction(
    "generic",
    "Find the step where the failed attempt went wrong.",
    "Say in a sentence or two why it was wrong.",
    "Then state a short plan for a better attempt.",
)


def get_instruction(key: str) -> Instruction:
    if key == GENERIC_INSTRUCTION.key:
        return GENERIC_INSTRUCTION
    try:
        return INSTRUCTIONS[key]
    except KeyError:
        raise ValueError(
            f"unknown reflection instruction {key!r}{did_you_mean(key, INSTRUCTIONS)}; keys are 'V-E-P' with V in 1-2, E in 1-8, P in 1-2, "
            "or 'generic'"
        ) from None


def check_instruction_keys(keys: Sequence[str]) -> list[str]:
    """A fixed list of instruction keys: not empty, every key in the pool, none twice."""

    if not keys:
        raise ValueError("a fixed list of instruction keys cannot be empty")
    return reject_duplicates([get_instruction(key).key for key in keys], "an instruction key")


def assign_instructions(policy: str | Sequence[str], k: int, seed: int, task: str, item_id: str) -> list[str]:
    """The instruction keys used for one question: ``all`` 32, ``random_k`` (k keys drawn with a
    seed derived from the run seed, the task and the item id, so the choice for one question never
    depends on the others), or a fixed list of keys (checked)."""
    if policy == "all":
        return list(INSTRUCTIONS)
    if policy == "random_k":
        if not 1 <= k <= len(INSTRUCTIONS):
            raise ValueError(f"instructions_k must be between 1 and {len(INSTRUCTIONS)}, got {k}")

        chosen = random.Random(derive_seed(seed, task, item_id, "instructions")).sample(list(INSTRUCTIONS), k)
        return sorted(chosen, key=list(INSTRUCTIONS).index)
    if isinstance(policy, str):
        raise ValueError(f"unknown instruction policy {policy!r}; use 'all', 'random_k' or a list of keys")  # noqa: TRY004  (a wrong value, not a wrong type)
    return check_instruction_keys(policy)


# ---- reflection and second-trial prompts ---------------------------------------------------------
def failed_trial(attempt: str, feedback: str) -> str:
    """The failed attempt as the reflector sees it: the model's own text, then the observation
    (the verdict; for code, the failing test; never the gold answer)."""
    return f"{attempt.strip()}\nObservation: {feedback.strip()}"


REFLECTION_INTRO = (
    "You tried to answer the question below and your answer was wrong. Reflect on the attempt so that "
    "a second attempt can succeed. Follow the instructions, write at most 100 words, do not give the "
    "final answer, and write no introduction or closing."
)
REFLECTION_HEADER = "Here is a reflection on your previous attempt, which locates its errors and plans a better one:"
UNSUCCESSFUL = "Your previous answer to this question was wrong."


def reflection_prompt(item: Item, attempt: str, feedback: str, instruction: Instruction) -> str:
    """The user message that asks for a reflection on a failed attempt, guided by one instruction."""
    return (
        f"{REFLECTION_INTRO}\n\nQuestion: {item.question}\n\n"
        f"Your attempt:\n{failed_trial(attempt, feedback)}\n\n"
        f"Instructions:\n{instruction.text}"
    )


def second_trial_prompt(
    task: Task, item: Item, reflection: str | None, fewshots: int = 0, previous: tuple[str, str] | None = None
) -> str:
    """The attempt prompt with the reflection inserted before the question (the paper's two
    variants: the reflection alone, or also the failed attempt as ``previous = (attempt, feedback)``).
    ``reflection=None`` is the paper's "w/o reflection" baseline: told it was wrong, the model retries."""
    parts = attempt_preamble(task, fewshots)
    if reflection is not None:
        parts.append(f"{REFLECTION_HEADER}\n{reflection.strip()}")
    block = UNSUCCESSFUL
    if previous is not None:
        block += f" It was:\n{failed_trial(*previous)}"
    parts.append(block)
    parts.append(f"Question: {item.question}")
    return "\n\n".join(parts)


# ---- oracle-free evaluation: a review that is not told whether the answer was right ---------------
# Under the paper's protocol the grader decides which answers get a reflection and the reflector is
# told "your answer was wrong" (method.md §6.1), so a second answer can only help. The oracle-free
# prompts below go to every question, say nothing about correctness, show no test results, and let
# the model keep an answer it still believes. Bump REVIEW_VERSION when their text changes.
REVIEW_VERSION = "review-1"
REVIEW_INTRO = (
    "Review your answer to the question below. It may be right or it may be wrong. Check the attempt, say "
    "in a sentence or two whether it holds and why, and if it does not, state a short plan for a better one. "
    "Write at most 100 words, do not give the final answer, and write no introduction or closing."
)
REVIEW_HEADER = "Here is a review of your previous attempt:"
PREVIOUS_ATTEMPT = (
    "Your previous answer to this question was:\n{attempt}\nIf it was right, you may give the same answer again."
)


def review_prompt(item: Item, attempt: str) -> str:
    """The oracle-free reflection prompt: the question and the attempt, with no verdict and no test results."""
    return f"{REVIEW_INTRO}\n\nQuestion: {item.question}\n\nYour attempt:\n{attempt.strip()}"


def review_second_trial_prompt(task: Task, item: Item, review: str | None, attempt: str, fewshots: int = 0) -> str:
    """The oracle-free second attempt: the review (None for a plain retry) and the previous attempt,
    which the model may keep."""
    parts = attempt_preamble(task, fewshots)
    if review is not None:
        parts.append(f"{REVIEW_HEADER}\n{review.strip()}")
    parts.append(PREVIOUS_ATTEMPT.format(attempt=attempt.strip()))
    parts.append(f"Question: {item.question}")
    return "\n\n".join(parts)


# Self-verification: the model judges its own first answer, and reflects only when it finds it wrong.
SELF_VERIFY_INTRO = (
    "Check your answer to the question below. Decide whether it is correct. Give one sentence of reasons, "
    "then end with exactly one line: Verdict: correct or Verdict: wrong."
)
_SELF_VERDICT = re.compile(r"Verdict:\s*\**\s*(correct|wrong)\b", re.IGNORECASE)


def self_verify_prompt(item: Item, attempt: str) -> str:
    """The user message that asks the model whether its own attempt is correct."""
    return f"{SELF_VERIFY_INTRO}\n\nQuestion: {item.question}\n\nYour attempt:\n{attempt.strip()}"


def parse_self_verdict(text: str) -> str | None:
    """``"correct"`` or ``"wrong"`` from a self-verification (its last verdict line), None when it gave none."""
    found = _SELF_VERDICT.findall(text)
    return found[-1].lower() if found else None


# ---- one-stage learning: reflection and new attempt in one answer (method.md §5.2) ---------------
ONE_STAGE_SUFFIX = (
    "After the reflection, answer the question again: write a line with only Answer:, then a line "
    "starting with Thought: and a line starting with Action: in which you {answer_format}."
)
ONE_STAGE_SEPARATOR = "\nAnswer:\n"


def one_stage_prompt(task: Task, item: Item, attempt: str, feedback: str, instruction: Instruction) -> str:
    """The reflection prompt, extended to ask for the new attempt after the reflection."""
    return with_one_stage_suffix(task, reflection_prompt(item, attempt, feedback, instruction))


def with_one_stage_suffix(task: Task, reflection_user: str) -> str:
    """A reflection (or review) prompt that also asks for the new attempt after the reflection."""
    return f"{reflection_user}\n\n{ONE_STAGE_SUFFIX.format(answer_format=task.answer_format)}"


def one_stage_completion(reflection: str, attempt: str) -> str:
    """The target of one-stage learning: the reflection, then ``Answer:``, then the corrected attempt."""
    return f"{reflection.strip()}\n{ONE_STAGE_SEPARATOR}{attempt.strip()}"


def split_one_stage(text: str) -> tuple[str, str | None]:
    """(reflection, attempt) of a one-stage answer; the attempt is None when there is no separator.

    This package's rule (the paper gives none): the split is at the LAST line that reads exactly
    ``Answer:``, i.e. the :data:`ONE_STAGE_SEPARATOR` that :func:`one_stage_completion` writes
    between the reflection and the attempt. A reflection that mentions "Answer:" in a sentence, or
    quotes an old attempt with its own ``Answer:`` line, stays in the reflection; an ``Answer:`` that
    is not alone on its line (``Answer: Finish[B]``) is no separator, so the attempt is None and the
    second turn is a parse failure.
    """
    # a leading newline lets a separator on the very first line count as a line of its own
    head, separator, tail = ("\n" + text).rpartition(ONE_STAGE_SEPARATOR)
    if not separator:
        return text.strip(), None
    return head.strip(), tail.strip()


# ---- the QA-pairs baseline: the gold answer without reflection (method.md §5.6) -------------------
# The paper's baseline answers "directly without further explanation"; our attempt format keeps its
# Thought line, so the thought is one fixed sentence and only the answer carries information.
QA_PAIR_THOUGHT = "I give the answer directly."


def gold_answer(item: Item) -> str:
    """The gold answer as the model writes it (option letters in upper case, as in the few-shots)."""
    return item.gold.upper() if item.options else item.gold


def qa_pair_completion(task: Task, item: Item) -> str:
    """The target of the QA-pairs baseline: the gold answer in the task's answer syntax."""
    return render_attempt(task, QA_PAIR_THOUGHT, gold_answer(item))


# ---- judging reflections (Dpref) ------------------------------------------------------------------
# Dpref ranks successful reflections of one failed attempt (method.md §3.4). The paper used a stronger
# model with an unreleased prompt; this prompt is ours. The judge sees both reflections, never the
# gold answer, and ends with one verdict line; each pair is judged in both orders by default, so a
# judge that prefers a position rather than a reflection produces no pair.
JUDGE_VERSION = "judge-1"
JUDGE_INTRO = (
    "Two reflections were written on the same failed attempt at the question below, and both led to a "
    "correct second attempt. Decide which reflection is better: the one that finds the real mistake more "
    "precisely and gives the clearer, more useful plan. Do not prefer a reflection for its length or its "
    "position. End with exactly one line: Verdict: A, Verdict: B or Verdict: tie."
)
VERDICTS = ("A", "B", "tie")
_VERDICT = re.compile(r"Verdict:\s*\**\s*(A|B|tie)\b", re.IGNORECASE)


def judge_prompt(item: Item, attempt: str, feedback: str, reflection_a: str, reflection_b: str) -> str:
    """The user message that asks a judge to compare two reflections on one failed attempt."""
    return (
        f"{JUDGE_INTRO}\n\nQuestion: {item.question}\n\n"
        f"Failed attempt:\n{failed_trial(attempt, feedback)}\n\n"
        f"Reflection A:\n{reflection_a.strip()}\n\nReflection B:\n{reflection_b.strip()}"
    )


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge's answer (its last verdict line), None when it gave none."""
    found = _VERDICT.findall(text)
    if not found:
        return None
    verdict = found[-1]
    return "tie" if verdict.lower() == "tie" else verdict.upper()
