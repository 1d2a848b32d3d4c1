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

import difflib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    for v in VERIFY_STEPS for e in ERROR_CHECKS for p in PLAN_LEVELS
}


def get_instruction(key: str) -> Instruction:
    try:
        return INSTRUCTIONS[key]
    except KeyError:
        close = difflib.get_close_matches(key, list(INSTRUCTIONS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown reflection instruction {key!r}{hint}; keys are 'V-E-P' with V in 1-2, E in 1-8, P in 1-2") from None


def check_instruction_keys(keys: Sequence[str]) -> list[str]:
    """A fixed list of instruction keys: not empty, every key in the pool, none twice."""
    from reflectevo.config import reject_duplicates

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
        from reflectevo.config import derive_seed

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


def second_trial_prompt(task: Task, item: Item, reflection: str, fewshots: int = 0,
                        previous: tuple[str, str] | None = None) -> str:
    """The attempt prompt with the reflection inserted before the question (the paper's two
    variants: the reflection alone, or also the failed attempt as ``previous = (attempt, feedback)``)."""
    parts = attempt_preamble(task, fewshots)
    parts.append(f"{REFLECTION_HEADER}\n{reflection.strip()}")
    block = UNSUCCESSFUL
    if previous is not None:
        block += f" It was:\n{failed_trial(*previous)}"
    parts.append(block)
    parts.append(f"Question: {item.question}")
    return "\n\n".join(parts)
