"""The paper's released ReflectEvo data read as our records."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo.core.jsonl import reject_lone_surrogates
from reflectevo.errors import DataError, DataFileNotFound
from reflectevo.tasks import get_task

if TYPE_CHECKING:
    pass

from reflectevo.reflection.curation import RELEASED, RELEASED_KINDS, check_record, check_unique_reflections

# ---- released ReflectEvo files -------------------------------------------------------------------
RELEASED_FIELDS = {
    "d_plus": (
        "id",
        "question",
        "answer",
        "first_trial_reasoning",
        "first_trial_answer",
        "second_trial_reasoning",
        "second_trial_answer",
        "reflections",
    ),
    "d_pm": (
        "id",
        "question",
        "answer",
        "first_trial_reasoning",
        "first_trial_answer",
        "second_trial_reasoning_chosen",
        "second_trial_answer_chosen",
        "reflection_chosen",
        "second_trial_reasoning_rejected",
        "second_trial_answer_rejected",
        "reflection_rejected",
    ),
    "raw": ("id", "question", "answer", "output"),
}
RELEASED_FIELDS["d_pref"] = RELEASED_FIELDS["d_pm"]
# Field names that drifted between the README, the training scripts and the example files (method.md §3, §8.1.6).
ALIASES = {
    "second_trial_reasoning": "second_reason",
    "reflections": "reflection",
    "reflect_prompt": "reflection_prompt",
}
OPTIONS_LINE = re.compile(r"^Options:\s*$", re.MULTILINE)
# A LogiQA option line: "A." to "D." at the start of a line (four official rows write "A text")
LOGIQA_OPTION_LINE = re.compile(r"^[ \t]*([A-D])(?:[.?]|[ \t])", re.MULTILINE)
_NON_SPACE = re.compile(r"\S")


def read_json_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, object)`` for JSON objects written one per line or pretty-printed one after another."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"data file not found: {path}")
    raw = path.read_bytes().removeprefix(
        b"\xef\xbb\xbf"
    )  # a byte-order mark (here, not in the codec: error offsets stay right)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}:{bad_line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    decoder = json.JSONDecoder()
    position, line = 0, 1
    while (found := _NON_SPACE.search(text, position)) is not None:
        line += text.count("\n", position, found.start())
        try:
            value, end = decoder.raw_decode(text, found.start())
        except json.JSONDecodeError as exc:
            # an object may span lines: the parser notices a missing brace or comma only further down
            started = "" if exc.lineno == line else f" in the object that starts on line {line}"
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}){started}") from None
        except ValueError:  # Python refuses to convert integers of more than 4300 digits
            raise DataError(
                f"{path}:{line}: a number too long to read (more than {sys.get_int_max_str_digits()} digits)"
            ) from None
        except RecursionError:
            raise DataError(f"{path}:{line}: lists or objects nested too deeply to read") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
        if "\\u" in text[found.start() : end]:
            reject_lone_surrogates(value, f"{path}:{line}")
        yield line, value
        line += text.count("\n", found.start(), end)
        position = end


def split_scratchpad(scratchpad: str) -> tuple[str, str]:
    """(attempt, feedback) of a scratchpad: the text before the last ``Observation:`` and after it.
    The environment appends its observation last, so the last one is the verdict."""
    attempt, separator, feedback = scratchpad.rpartition("\nObservation:")
    if not separator:
        return scratchpad.strip(), ""
    return attempt.strip(), feedback.strip()


def infer_task(first_trial_text: str, question: str) -> str:
    """The task of a released row from its text: MATH and MBPP by their answer syntax in the first
    trial; among Finish[...] tasks a line reading ``Options:`` marks BIG-bench multiple choice,
    option lines of at least two of the letters A-D without it mark LogiQA (its questions list their
    options so; a story may have one line starting "A man ..."), and a question with neither is a
    BIG-bench free-text question. Right for all 1,000 official LogiQA and BIG-bench questions."""
    if "Finish<<<" in first_trial_text:
        return "math"
    if "[BEGIN]" in first_trial_text:
        return "mbpp"
    if OPTIONS_LINE.search(question):
        return "bigbench"
    option_letters = {match.group(1) for match in LOGIQA_OPTION_LINE.finditer(question)}
    return "logiqa" if len(option_letters) >= 2 else "bigbench"


def detect_kind(row: dict[str, Any], path: Path, where: str | None = None) -> str:
    if "output" in row:
        return "raw"
    if "reflection_chosen" in row:
        # D± and Dpref share one schema; our Dpref rows carry the judge, released files say it in their name
        judged = "judge" in row or "verdicts" in row or "pref" in path.name.lower()
        return "d_pref" if judged else "d_pm"
    if "reflections" in row or "reflection" in row:
        return "d_plus"
    raise DataError(
        f"{where or path}: cannot tell which ReflectEvo file this is from its fields {sorted(row)}; pass kind= "
        f"(one of {', '.join(RELEASED_KINDS)})"
    )


def load_released(path: str | Path, kind: str | None = None, task: str = "auto") -> list[dict[str, Any]]:
    """Rows of a released ReflectEvo file (or of this package's exports) in this module's schema.

    ``kind`` is "d_plus", "d_pm", "d_pref" or "raw" (raw records, ready for :func:`build_d_plus`);
    None detects it from the first row. ``task`` names the task, or "auto" infers it per row
    (:func:`infer_task`) and marks the row ``task_inferred``. Rows that already carry this module's
    schema (a ``source`` field, or raw records with ``task``) come back unchanged.
    """
    path = Path(path)
    if kind is not None and kind not in RELEASED_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(RELEASED_KINDS)} or None to detect it")
    if task != "auto":
        get_task(task)  # an unknown name fails here, with the known names
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], int] = {}
    for line, obj in read_json_objects(path):
        where = f"{path}:{line}"
        kind = kind or detect_kind(obj, path, where)
        require_released_fields(obj, kind, where)
        if kind == "raw":
            record = obj if is_our_record(obj) else released_record(obj, task, where)
            check_record(record, where)
            check_unique_reflections(record, where, line, seen)
            rows.append(record)
        elif "source" in obj:
            rows.append({**obj, "id": str(obj["id"])})
        else:
            rows.append(released_row(obj, kind, task, where))
    return rows


def require_released_fields(row: dict[str, Any], kind: str, where: str) -> None:
    for name in RELEASED_FIELDS[kind]:
        if name not in row and ALIASES.get(name) not in row:
            alias = f" (or {ALIASES[name]!r})" if name in ALIASES else ""
            raise DataError(
                f"{where}: missing field {name!r}{alias}; a {kind} row needs {list(RELEASED_FIELDS[kind])}, "
                f"this one has {sorted(row)}"
            )


def is_our_record(record: dict[str, Any]) -> bool:
    outputs = record.get("output")
    return "task" in record and isinstance(outputs, list) and all(isinstance(o, dict) and "key" in o for o in outputs)


def pick(row: dict[str, Any], name: str) -> Any:
    return row[name] if name in row else row.get(ALIASES.get(name, name))


def one_reflection(value: Any, where: str, name: str) -> str:
    """A reflection stored as a string or as a list holding one string."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise DataError(f"{where}: field {name!r} must hold exactly one reflection, got {len(value)} entries")
        value = value[0]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def text_field(row: dict[str, Any], name: str, where: str) -> str:
    value = pick(row, name)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def scalar_field(row: dict[str, Any], name: str, where: str) -> str:
    """An id or answer, which the released files store as a string or a number, as a string."""
    value = pick(row, name)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {name!r} must be a string or a number, got {type(value).__name__}")
    return str(value)


def task_of(row: dict[str, Any], first_trial_text: str, task: str) -> dict[str, Any]:
    if task != "auto":
        return {"task": task, "task_inferred": False}
    return {"task": infer_task(first_trial_text, str(row.get("question", ""))), "task_inferred": True}


def released_row(row: dict[str, Any], kind: str, task: str, where: str) -> dict[str, Any]:
    """A released D+, D± or Dpref row in the curated-row schema (source "released")."""
    first = text_field(row, "first_trial_reasoning", where)
    attempt, feedback = split_scratchpad(first)
    head = {
        "id": scalar_field(row, "id", where),
        "question": text_field(row, "question", where),
        "answer": scalar_field(row, "answer", where),
        "first_trial_reasoning": first,
        "first_trial_answer": scalar_field(row, "first_trial_answer", where),
    }
    named = task_of(row, first, task)
    if kind == "d_plus":
        second = text_field(row, "second_trial_reasoning", where)
        reason_prompt = pick(row, "reason_prompt")
        return {
            **head,
            "second_trial_reasoning": second,
            "second_trial_answer": scalar_field(row, "second_trial_answer", where),
            "reflections": one_reflection(pick(row, "reflections"), where, "reflections"),
            "reason_prompt": [reason_prompt] if isinstance(reason_prompt, str) else reason_prompt,
            "reflect_prompt": pick(row, "reflect_prompt"),
            "task": named["task"],
            "instruction": None,
            "sample": None,
            "grader": None,
            "first_trial_feedback": feedback,
            "first_trial_attempt": attempt,
            "second_trial_attempt": split_scratchpad(second)[0],
            "source": RELEASED,
            "task_inferred": named["task_inferred"],
        }
    reason_prompt = pick(row, "reason_prompt")
    out = {
        **head,
        "second_trial_reasoning_chosen": text_field(row, "second_trial_reasoning_chosen", where),
        "second_trial_answer_chosen": scalar_field(row, "second_trial_answer_chosen", where),
        "reflection_chosen": one_reflection(row["reflection_chosen"], where, "reflection_chosen"),
        "second_trial_reasoning_rejected": text_field(row, "second_trial_reasoning_rejected", where),
        "second_trial_answer_rejected": scalar_field(row, "second_trial_answer_rejected", where),
        "reflection_rejected": one_reflection(row["reflection_rejected"], where, "reflection_rejected"),
        "reason_prompt": reason_prompt[0] if isinstance(reason_prompt, list) and reason_prompt else reason_prompt,
        "reflection_prompt": row.get("reflection_prompt", row.get("reflect_prompt")),
        "task": named["task"],
        "instruction_chosen": None,
        "sample_chosen": None,
        "instruction_rejected": None,
        "sample_rejected": None,
        "grader": None,
        "first_trial_feedback": feedback,
        "first_trial_attempt": attempt,
        "source": RELEASED,
        "task_inferred": named["task_inferred"],
    }
    if kind == "d_pref":
        # the paper's judge and its verdicts were not released
        out.update(
            {"judge": row.get("judge"), "judge_version": row.get("judge_version"), "verdicts": row.get("verdicts")}
        )
    return out


def released_record(record: dict[str, Any], task: str, where: str) -> dict[str, Any]:
    """A released raw record in the raw-record schema. Its ``reasoning`` is the scratchpad (with the
    observation); its second trials carry no instruction key, so ``instruction`` is None and
    ``sample`` counts them. Stored prompts are dropped: they were rendered after the attempt finished."""
    outputs = record["output"]
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, dict) for o in outputs):
        raise DataError(f"{where}: 'output' must be a non-empty list of objects")
    first_text = str(outputs[0].get("scratchpad", outputs[0].get("reasoning", "")))
    named = task_of(record, first_text, task)
    item_id = scalar_field(record, "id", where)
    converted = [
        released_output(output, index, named["task"], item_id, f"{where}: output[{index}]")
        for index, output in enumerate(outputs)
    ]
    out = {
        "task": named["task"],
        "id": item_id,
        "question": record["question"],
        "answer": scalar_field(record, "answer", where),
    }
    if isinstance(record.get("test_list"), list):
        out["test_list"] = record["test_list"]
    out.update(
        {
            "protocol": "oracle",
            "grader": None,
            "source": RELEASED,
            "task_inferred": named["task_inferred"],
            "output": converted,
        }
    )
    return out


def released_output(output: dict[str, Any], index: int, task: str, item_id: str, where: str) -> dict[str, Any]:
    scratchpad = output.get("scratchpad", output.get("reasoning"))
    if not isinstance(scratchpad, str):
        raise DataError(f"{where}: missing field 'reasoning' (or 'scratchpad'), the text of the trial")
    if not isinstance(output.get("is_correct"), bool):  # bool("false") would be True
        raise DataError(f"{where}: field 'is_correct' must be true or false, got {output.get('is_correct')!r:.40}")
    trial = output.get("trial", output.get("trail", 1 if index == 0 else 2))
    if isinstance(trial, str) and trial.strip().isdigit():
        trial = int(trial)
    if not isinstance(trial, int) or isinstance(trial, bool):
        raise DataError(f"{where}: field 'trial' must be 1 or 2, got {trial!r:.40}")
    answer = str(output.get("generated_answer") or "")
    correct = output["is_correct"]
    attempt, feedback = split_scratchpad(scratchpad)
    reflections = output.get("reflections") or []
    if not isinstance(reflections, (str, list)):
        raise DataError(f"{where}: field 'reflections' must be a list of strings, got {type(reflections).__name__}")
    sample = None if index == 0 else index - 1
    return {
        "trial": trial,
        "key": f"{task}/{item_id}/t1" if index == 0 else f"{task}/{item_id}/released/{sample}",
        "instruction": None,
        "sample": sample,
        "reasoning": attempt,
        "scratchpad": scratchpad,
        "generated_answer": answer,
        "is_correct": correct,
        # the released files keep only is_correct; an empty answer was an unparseable action
        "outcome": "correct" if correct else ("parse_failure" if not answer else "wrong"),
        "feedback": feedback,
        "error": output.get("error"),
        "reflections": [reflections] if isinstance(reflections, str) else list(reflections),
        "reason_input": None,
        "reason_prompt": [],
        "reflection_input": None,
        "reflection_prompt": None,
        "generation": None,
    }
