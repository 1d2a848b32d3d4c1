"""The task registry: one small module per benchmark, registered here by name.

Adding a task means writing one module with a :class:`~reflectevo.tasks.base.Task` subclass and
adding one line to :data:`TASKS` below (see the README, "Adding a task").
"""

from __future__ import annotations

from collections.abc import Iterable

from reflectevo.errors import CodeExecutionNotAllowed, UnknownTaskError
from reflectevo.tasks.base import (
    GRADERS,
    OUTCOMES,
    SPLITS,
    Extraction,
    FewShot,
    Item,
    Task,
    Verdict,
)
from reflectevo.tasks.bigbench import BigBench
from reflectevo.tasks.logiqa import LogiQA
from reflectevo.tasks.math import MATH
from reflectevo.tasks.mbpp import MBPP

TASKS: dict[str, Task] = {task.name: task for task in (LogiQA(), MATH(), MBPP(), BigBench())}


def register_task(task: Task) -> Task:
    """Make a task available by name (for tasks defined outside this package)."""
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task registered under ``name``; the error lists the known names."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def task_names() -> list[str]:
    return sorted(TASKS)


def check_code_execution(names: Iterable[str], allowed: bool) -> None:
    """Fail before any generation starts when a task would run model code without the opt-in."""
    needing = [name for name in names if get_task(name).needs_code_execution]
    if needing and not allowed:
        raise CodeExecutionNotAllowed(
            f"task(s) {', '.join(needing)} grade answers by running model-written code; "
            "opt in explicitly (Sandbox(allow_code_execution=True), --allow-code-execution) or drop them"
        )


__all__ = [
    "GRADERS",
    "OUTCOMES",
    "SPLITS",
    "TASKS",
    "Extraction",
    "FewShot",
    "Item",
    "Task",
    "Verdict",
    "check_code_execution",
    "get_task",
    "register_task",
    "task_names",
]
