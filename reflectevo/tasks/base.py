"""What every task shares: the unified item schema, extraction and grading results, the Task base class.

A task module (``logiqa.py``, ``math.py``, ...) subclasses :class:`Task` and fills in four things:
how rows become :class:`Item` objects (official JSONL, hub dataset), how the answer is written
(``render_answer``), how it is read back from an action (``extract_answer``), and how it is judged
(``judge``). Both graders live side by side: ``official`` reproduces the paper's code, ``robust`` is
tolerant of formatting, and :meth:`Task.grade_both` returns both verdicts for one output.

Answers are read from the action only (:func:`action_part`), as the paper's agent does: an answer
quoted in the thought ("my previous answer Finish[A] was wrong") never counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from reflectevo.core.jsonl import read_jsonl, write_jsonl_atomic
from reflectevo.errors import DataError

GRADERS = ("official", "robust")
OUTCOMES = ("correct", "wrong", "parse_failure", "timeout")
SPLITS = ("train", "validation", "test")

# The observation strings of the paper's environments; the model sees them after an attempt.
CORRECT_OBSERVATION = "Answer is CORRECT"
INCORRECT_OBSERVATION = "Answer is INCORRECT"

# Where an attempt's action starts. The paper's agent stops its thought call at the first
# "Action:" and parses the answer from the action call's output alone.
ACTION_MARKER = "Action:"
NO_ACTION_LINE = "no action line (no 'Action:' in the output)"
WHOLE_TEXT = "whole_text"  # Extraction.fallback: the robust grader read an output without an action line


def check_grader(grader: str) -> str:
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; choose one of {', '.join(GRADERS)}")
    return grader


@dataclass
class Item:
    """One benchmark question in the schema shared by all tasks.

    ``question`` is the text that goes into the prompt (options included, as in the official
    files); ``options`` repeats the option texts in letter order when they could be parsed;
    ``tests`` and ``setup_code`` are for code tasks; ``split`` is the fixed role of an item whose
    source assigns one (the built-in samples); ``source_id`` keeps an id the source file carried.
    """

    task: str
    id: str
    question: str
    gold: str
    options: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)
    setup_code: str = ""
    split: str | None = None
    source_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any], where: str) -> Item:
        """Build an item from a unified-schema row, with errors that name ``where`` (file:line)."""
        required = {"task": str, "id": str, "question": str, "gold": str}
        optional = {
            "options": list,
            "tests": list,
            "setup_code": str,
            "split": (str, type(None)),
            "source_id": (str, type(None)),
            "metadata": dict,
        }
        unknown = sorted(set(row) - set(required) - set(optional))
        if unknown:
            raise DataError(
                f"{where}: unknown field(s) {unknown}; the item schema has {sorted([*required, *optional])}"
            )
        for key, kind in required.items():
            if key not in row:
                raise DataError(f"{where}: missing required field {key!r}")
            if not isinstance(row[key], kind):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
            if not row[key].strip():  # an empty id, question or gold cannot be asked, graded or keyed
                raise DataError(f"{where}: field {key!r} is empty")
        for key, kind in optional.items():
            if key in row and not isinstance(row[key], kind):
                raise DataError(f"{where}: field {key!r} has the wrong type ({type(row[key]).__name__})")
        for key in ("options", "tests"):
            if not all(isinstance(value, str) for value in row.get(key, [])):
                raise DataError(f"{where}: every entry of {key!r} must be a string")
        if row.get("split") is not None and row["split"] not in SPLITS:
            raise DataError(f"{where}: split must be one of {SPLITS} or null, got {row['split']!r}")
        return cls(**row)


@dataclass
class Extraction:
    """What was read out of a model output. ``answer`` is None when nothing usable was found."""

    answer: str | None
    method: str  # the rule that matched, e.g. "finish", "option_text", "boxed"; "none" on failure
    reason: str = ""  # why parsing failed, for the record
    fallback: str | None = None  # WHOLE_TEXT when the output had no action line and the whole text was read

    @property
    def ok(self) -> bool:
        return self.answer is not None


@dataclass
class Verdict:
    """The judgement of one output by one grader.

    ``outcome`` is one of :data:`OUTCOMES`: a parse failure or a time-out is never folded into
    "wrong", so callers can count them. ``feedback`` is the observation text the model may be
    shown; ``details`` holds grader-specific evidence (normalised forms, F1, execution log).
    """

    outcome: str
    grader: str
    extracted: str | None
    feedback: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> bool:
        return self.outcome == "correct"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FewShot:
    """A worked example for the attempt prompt (written for this project)."""

    question: str
    thought: str
    action: str


def action_part(text: str) -> str | None:
    """The action of an attempt: the text after its first ``Action:``, None when it has none.

    In a two-call attempt (``reflectevo.prompts.join_two_calls``) this is exactly the action call's
    output, because the thought call stops at ``Action:``. In a one-call attempt it is what the
    paper's agent would have parsed had the same text come from its two calls.
    """
    _, marker, action = text.partition(ACTION_MARKER)
    return action if marker else None


def extraction_details(extraction: Extraction) -> dict[str, Any]:
    """What a verdict records of how its answer was read (the fallback only when there was one)."""
    details: dict[str, Any] = {"method": extraction.method}
    if extraction.fallback is not None:
        details["fallback"] = extraction.fallback
    return details


def official_finish(text: str) -> Extraction:
    """The paper's ``Finish[...]`` parse (LogiQA, BIG-bench): after the first ``Finish[`` up to the next ``]``."""
    argument = split_once(text, "Finish[", "]")
    if argument is None:
        return Extraction(None, "none", "no Finish[...] action")
    if argument == "":
        return Extraction(None, "none", "empty Finish[]")
    return Extraction(argument, "finish")


def split_once(text: str, start: str, end: str) -> str | None:
    """The paper's parse: the text after the first ``start`` up to the next ``end``.

    Like ``text.split(start)[1].split(end)[0]``: with no ``end`` after ``start`` the rest of the
    text is returned. None when ``start`` does not occur.
    """
    if start not in text:
        return None
    rest = text.split(start, 1)[1]
    return rest.split(end, 1)[0]


class Task:
    """Base class of a benchmark task. Subclasses set the class attributes and the hooks below."""

    name: ClassVar[str]
    version: ClassVar[str]  # bump when loading, prompts or grading change what a number means
    description: ClassVar[str]
    answer_format: ClassVar[str]  # the instruction that tells the model how to write its answer
    invalid_hint: ClassVar[str]  # the observation after an answer that could not be parsed
    fewshots: ClassVar[tuple[FewShot, ...]]
    official_file: ClassVar[str]  # file name of the paper's 500-item test set
    official_sha256: ClassVar[str | None] = None  # its sha256 at the paper's pinned commit
    hub_splits: ClassVar[tuple[str, ...]] = ("test",)  # the splits load_hub can read
    hub_dataset: ClassVar[str]
    needs_code_execution: ClassVar[bool] = False

    # ---- loading -------------------------------------------------------------------------
    def from_official_row(self, row: dict[str, Any], index: int, where: str) -> Item:
        """Map one row of the paper's ``data_source`` JSONL to an item (``index`` counts from 0)."""
        raise NotImplementedError

    def from_hub_row(self, row: dict[str, Any], index: int, **context: Any) -> Item | None:
        """Map one hub row to an item, or None for a row that cannot be graded (counted, not hidden)."""
        raise NotImplementedError

    def load_hub(self, split: str = "test", **options: Any) -> list[Item]:
        """Load the hub dataset a user would name. Needs the ``datasets`` package and hub access."""
        raise NotImplementedError

    def load_official(self, path: str | Path) -> list[Item]:
        """Load a JSONL file in the official ``data_source`` schema; ids follow the official loader."""
        items, lines = [], []
        for index, (line_number, row) in enumerate(read_jsonl(path)):
            item = self.from_official_row(row, index, where=f"{path}:{line_number}")
            if not item.question.strip():  # checked here: grading one answer from the command line needs no question
                raise DataError(f"{path}:{line_number}: the question is empty")
            items.append(item)
            lines.append(line_number)
        return check_unique_ids(items, source=str(path), lines=lines)

    def load_samples(self, split: str | None = None) -> list[Item]:
        """The built-in sample items written for this project, optionally only one split."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        resource = resources.files("reflectevo.data").joinpath("samples", f"{self.name}.jsonl")
        with resources.as_file(resource) as path:
            items = self.load_items(path)
        return [item for item in items if split is None or item.split == split]

    def load_file(self, path: str | Path) -> list[Item]:
        """Load a JSONL file of either schema: unified items (as written by :func:`write_items`)
        when its first row has ``task``, ``id``, ``question`` and ``gold``, else the official one."""
        for _, row in read_jsonl(path):
            if {"task", "id", "question", "gold"} <= set(row):
                return self.load_items(path)
            break
        return self.load_official(path)

    def item_from_answer(self, gold: str, question: str = "") -> Item:
        """A one-off item for grading a single answer from the command line (official rows are
        ``{question, answer}`` for most tasks; the others override this)."""
        return self.from_official_row({"question": question, "answer": gold}, 0, where="command line")

    def load_items(self, path: str | Path) -> list[Item]:
        """Load items saved in the unified schema (as written by :func:`write_items`)."""
        rows = list(read_jsonl(path))
        items = [Item.from_dict(row, where=f"{path}:{line}") for line, row in rows]
        for (line, _row), item in zip(rows, items):
            if item.task != self.name:
                raise DataError(f"{path}:{line}: item {item.id} belongs to task {item.task!r}, not {self.name!r}")
        return check_unique_ids(items, source=str(path), lines=[line for line, _row in rows])

    # ---- answers -------------------------------------------------------------------------
    def render_answer(self, answer: str) -> str:
        """The action text that states ``answer`` in this task's answer syntax."""
        raise NotImplementedError

    def answer_opening(self) -> str:
        """The action text before the answer itself (``Finish[``): what ``attempt_prefill: answer`` pre-fills."""
        marker = "\u2063answer\u2063"
        return self.render_answer(marker).split(marker, 1)[0]

    def extract(self, text: str, grader: str = "official", item: Item | None = None) -> Extraction:
        """Read the answer out of a model's attempt (``Thought: ... Action: ...``) under ``grader``'s rules.

        Only the action part (:func:`action_part`) is read. Without an ``Action:`` the official
        grader reports a parse failure, as the paper's agent would have no action to parse; the
        robust grader reads the whole text instead and marks the extraction ``fallback="whole_text"``
        (recorded in the verdict's details, so such outputs can be counted).
        """
        check_grader(grader)
        action = action_part(text)
        if action is not None:
            return self.extract_answer(action, grader, item)
        if grader == "official":
            return Extraction(None, "none", NO_ACTION_LINE)
        extraction = self.extract_answer(text, grader, item)
        extraction.fallback = WHOLE_TEXT
        return extraction

    def extract_answer(self, action: str, grader: str, item: Item | None = None) -> Extraction:
        """Read the answer out of an action text (what follows ``Action:``) under ``grader``'s rules."""
        raise NotImplementedError

    def judge(self, item: Item, extraction: Extraction, grader: str) -> Verdict:
        """Judge a successful extraction (the answer is not None)."""
        raise NotImplementedError

    def grade(self, item: Item, text: str, grader: str = "official", sandbox: Any = None) -> Verdict:
        """Extract and judge one output. Code tasks need a :class:`~reflectevo.sandbox.Sandbox`."""
        check_grader(grader)
        extraction = self.extract(text, grader=grader, item=item)
        if not extraction.ok:
            return self.parse_failure(extraction, grader)
        return self.judge(item, extraction, grader)

    def grade_many(
        self, items: Sequence[Item], texts: Sequence[str], grader: str = "official", sandbox: Any = None
    ) -> list[Verdict]:
        """Grade many outputs (code tasks run them in parallel in the sandbox)."""
        if len(items) != len(texts):
            raise ValueError(f"{len(items)} items but {len(texts)} outputs")
        return [self.grade(item, text, grader, sandbox) for item, text in zip(items, texts)]

    def grade_both(self, item: Item, text: str, sandbox: Any = None) -> dict[str, Verdict]:
        """Both verdicts for one output, so official under-counting can be measured per item."""
        return {grader: self.grade(item, text, grader, sandbox) for grader in GRADERS}

    # ---- helpers for subclasses ------------------------------------------------------------
    def parse_failure(self, extraction: Extraction, grader: str) -> Verdict:
        return Verdict(
            outcome="parse_failure",
            grader=grader,
            extracted=None,
            feedback=self.invalid_hint,
            details={**extraction_details(extraction), "reason": extraction.reason},
        )

    @staticmethod
    def verdict(ok: bool, grader: str, extraction: Extraction, **details: Any) -> Verdict:
        return Verdict(
            outcome="correct" if ok else "wrong",
            grader=grader,
            extracted=extraction.answer,
            feedback=CORRECT_OBSERVATION if ok else INCORRECT_OBSERVATION,
            details={**extraction_details(extraction), **details},
        )

    def describe(self) -> dict[str, Any]:
        """A short summary for ``reflectevo tasks``."""
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "answer_format": self.answer_format,
            "official_file": self.official_file,
            "hub_dataset": self.hub_dataset,
            "runs_code": self.needs_code_execution,
        }


def check_unique_ids(items: list[Item], source: str, lines: Sequence[int] | None = None) -> list[Item]:
    """``items`` unchanged, or a :class:`DataError` for a repeated id (``source:line`` when ``lines`` are given)."""
    seen: dict[str, int] = {}
    for position, item in enumerate(items):
        if item.id in seen and lines is not None:
            raise DataError(
                f"{source}:{lines[position]}: item id {item.id!r} appears twice (rows {seen[item.id] + 1} and "
                f"{position + 1}), first on line {lines[seen[item.id]]}; ids must be unique within a task"
            )
        if item.id in seen:
            raise DataError(
                f"{source}: item id {item.id!r} appears twice (rows {seen[item.id] + 1} and {position + 1}); "
                "ids must be unique within a task"
            )
        seen[item.id] = position
    return items


def write_items(items: Iterable[Item], path: str | Path) -> Path:
    """Write items as unified-schema JSONL, atomically (see :func:`~reflectevo.jsonl.write_jsonl_atomic`)."""
    return write_jsonl_atomic(path, (item.to_dict() for item in items))


def require_fields(row: dict[str, Any], fields: dict[str, type | tuple[type, ...]], where: str) -> None:
    """Check that a source row has the fields a mapper reads, with a clear error naming ``where``."""
    for key, kind in fields.items():
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (this row has {sorted(row)})")
        check_type(row, key, kind, where)


def check_optional(row: dict[str, Any], fields: dict[str, type | tuple[type, ...]], where: str) -> None:
    """Like :func:`require_fields` for fields that may be missing or null."""
    for key, kind in fields.items():
        if row.get(key) is not None:
            check_type(row, key, kind, where)


def check_type(row: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    value = row[key]
    # JSON true and false are Python ints too; a flag is never a count or an id
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")


def require_text(row: dict[str, Any], keys: Iterable[str], where: str) -> None:
    """String fields that must hold more than white space (a question, a gold answer)."""
    for key in keys:
        if not row[key].strip():
            raise DataError(f"{where}: field {key!r} is empty")
