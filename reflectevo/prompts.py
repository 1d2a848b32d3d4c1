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


def attempt_prompt(task: Task, item: Item, fewshots: int = 0) -> str:
    """The user message of a first attempt. ``fewshots`` worked examples (0 to 3) precede the question."""
    if not 0 <= fewshots <= len(task.fewshots):
        raise ValueError(f"fewshots must be between 0 and {len(task.fewshots)} for task {task.name}, got {fewshots}")
    parts = [ATTEMPT_INTRO.format(answer_format=task.answer_format)]
    if fewshots:
        examples = "\n\n".join(render_fewshot(example) for example in task.fewshots[:fewshots])
        parts.append(f"Examples:\n\n{examples}\n\n(END OF EXAMPLES)")
    parts.append(f"Question: {item.question}")
    return "\n\n".join(parts)


def attempt_messages(task: Task, item: Item, fewshots: int = 0) -> list[dict[str, Any]]:
    """The chat messages of a first attempt (one user turn; the model's chat template wraps it)."""
    return [{"role": "user", "content": attempt_prompt(task, item, fewshots)}]
