"""MATH: competition mathematics with a final answer (Hendrycks et al., 2021).

Official file: ``math_test.jsonl`` rows ``{problem, level, type, solution}``; the gold answer is the
content of the last ``\\boxed{...}`` in the solution; items are numbered by row (index + 1).

Grading reads the action only (the text after ``Action:``, see :meth:`Task.extract`). official:
the text between ``Finish<<<`` and the next ``>>>``, compared with the gold after the string
normalisation of the MATH paper's ``is_equiv`` (reimplemented below, quirks included: any
exception while normalising falls back to plain string equality). robust: the same
check, then symbolic equivalence with ``math-verify`` when the strings differ; the answer may
also come from the action's last ``\\boxed{}`` when the model forgot the ``Finish<<<>>>`` syntax.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

from reflectevo.errors import DataError
from reflectevo.tasks.base import (
    Extraction,
    FewShot,
    Item,
    Task,
    Verdict,
    check_optional,
    require_fields,
    split_once,
)

SUBJECTS = (  # the configurations of EleutherAI/hendrycks_math, in the order they are concatenated
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


# ---- the MATH paper's answer normalisation ----------------------------------------------------
# Each step below mirrors one rule of the reference ``_strip_string``; the order matters.


def _split_units(text: str) -> str:
    # "\text{ " is taken to start a unit; the reference asserts it occurs at most once
    if "\\text{ " in text:
        parts = text.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("more than one '\\text{ ' unit marker")
        return parts[0]
    return text


def _brace_sqrt(text: str) -> str:
    # \sqrt3 -> \sqrt{3}; an empty remainder raises IndexError on purpose (reference behaviour)
    if "\\sqrt" not in text:
        return text
    head, *tails = text.split("\\sqrt")
    out = head
    for tail in tails:
        out += "\\sqrt" + tail if tail[0] == "{" else "\\sqrt{" + tail[0] + "}" + tail[1:]
    return out


def _brace_fracs(text: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; a one-character remainder gives up
    head, *tails = text.split("\\frac")
    out = head
    for tail in tails:
        out += "\\frac"
        if tail[0] == "{":  # IndexError on an empty remainder, as in the reference
            out += tail
            continue
        if len(tail) < 2:
            return text
        numerator, second, rest = tail[0], tail[1], tail[2:]
        out += "{" + numerator + "}" + ("{" + second + "}" if second != "{" else second) + rest
    return out


def _slash_to_frac(text: str) -> str:
    # "3/4" -> \frac{3}{4} only for two plain integers written exactly so
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        numerator, denominator = int(parts[0]), int(parts[1])
    except ValueError:
        return text
    if text != f"{numerator}/{denominator}":
        return text
    return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


def hendrycks_normalize(text: str) -> str:
    """The normal form used by the official MATH check. May raise (the caller falls back)."""
    for old, new in (
        ("\n", ""),
        ("\\!", ""),
        ("\\\\", "\\"),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
    ):
        text = text.replace(old, new)
    text = _split_units(text)
    text = text.replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 3" -> "3"; short left sides only
        text = sides[1]
    text = _brace_sqrt(text)
    text = text.replace(" ", "")
    text = _brace_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _slash_to_frac(text)


def hendrycks_equal(gold: str | None, answer: str | None) -> bool:
    """The official MATH equality: normalise both strings; on any error compare them as they are."""
    if gold is None and answer is None:
        return True
    if gold is None or answer is None:
        return False
    gold, answer = gold.strip(), answer.strip()
    try:
        return hendrycks_normalize(gold) == hendrycks_normalize(answer)
    except Exception:  # noqa: BLE001  the reference catches everything here too
        return gold == answer


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``) span with its braces, as the official loader finds it."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for position in range(start, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[start : position + 1]
    return None


def unbox(span: str | None) -> str | None:
    """``\\boxed{x}`` -> ``x``; None for anything else (the official loader drops ``\\fbox``)."""
    if span is None or not span.startswith("\\boxed{") or not span.endswith("}"):
        return None
    return span[len("\\boxed{") : -1]


def math_verify_equal(gold: str, answer: str) -> bool | None:
    """Symbolic equivalence with math-verify; None when either side cannot be parsed or is not trusted.

    Answers with a subscript are left out: in MATH a subscript is a number base (``443_5``), and
    math-verify drops it, so it would accept ``443_6`` for ``443_5``.
    """
    if "_" in gold or "_" in answer:
        return None
    try:
        from math_verify import parse, verify
    except ImportError as exc:  # pragma: no cover - math-verify is a declared dependency
        raise ImportError("robust MATH grading needs math-verify: pip install math-verify") from exc
    # math-verify times out with signal.alarm, which only works in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed_gold = parse(f"${gold}$", parsing_timeout=timeout)
    parsed_answer = parse(f"${answer}$", parsing_timeout=timeout)
    if not parsed_gold or not parsed_answer:
        return None
    return bool(verify(parsed_gold, parsed_answer, timeout_seconds=timeout))


class MATH(Task):
    name = "math"
    version = "2"
    description = "MATH competition problems, final answer in LaTeX"
    answer_format = (
        "finish with the final answer inside triple angle brackets after Finish, for example Finish<<<\\frac{3}{4}>>>"
    )
    invalid_hint = "Invalid action. Give your final answer as Finish<<<answer>>>, for example Finish<<<12>>>."
    official_file = "math_test.jsonl"
    official_sha256 = (
        "291551a7ade17d6a4541c386752f7d7742f11258928878f71fe4e88977add68b"  # the file at the paper's commit 6634f923
    )
    hub_splits = ("train", "test")
    hub_dataset = "EleutherAI/hendrycks_math"
    fewshots = (
        FewShot(
            question="What is the sum of all positive divisors of 12?",
            thought="The divisors of 12 are 1, 2, 3, 4, 6 and 12. Their sum is 1+2+3+4+6+12 = 28.",
            action="Finish<<<28>>>",
        ),
        FewShot(
            question="Solve for $x$: $3x - 7 = 11$.",
            thought="Adding 7 to both sides gives $3x = 18$, and dividing by 3 gives $x = 6$.",
            action="Finish<<<6>>>",
        ),
        FewShot(
            question="A bag holds 3 red and 5 blue marbles. One marble is drawn at random. What is the "
            "probability that it is red? Express your answer as a common fraction.",
            thought="There are 8 marbles and 3 of them are red, so the probability is $\\frac{3}{8}$.",
            action="Finish<<<\\frac{3}{8}>>>",
        ),
    )

    # ---- loading -------------------------------------------------------------------------
    def _item(self, row: dict[str, Any], index: int, where: str) -> Item:
        require_fields(row, {"problem": str, "solution": str}, where)
        check_optional(row, {"level": str, "type": str}, where)
        gold = unbox(last_boxed(row["solution"]))
        if gold is None:
            raise DataError(f"{where}: the solution has no final \\boxed{{...}} answer")
        if not gold.strip():
            raise DataError(f"{where}: the final \\boxed{{}} answer of the solution is empty")
        return Item(
            task=self.name,
            id=str(index + 1),
            question=row["problem"],
            gold=gold,
            metadata={
                "level": row.get("level"),
                "subject": row.get("type"),  # the source calls the subject "type"
                "solution": row["solution"],
            },
        )

    def from_official_row(self, row: dict[str, Any], index: int, where: str) -> Item:
        return self._item(row, index, where)

    def from_hub_row(self, row: dict[str, Any], index: int, **context: Any) -> Item | None:
        try:
            return self._item(row, index, where=f"{self.hub_dataset} row {index}")
        except DataError:
            if "problem" in row and "solution" in row:
                return None  # a solution without a boxed answer cannot be graded: counted by load_hub
            raise

    def load_hub(self, split: str = "test", subjects: tuple[str, ...] = SUBJECTS, **options: Any) -> list[Item]:
        from datasets import load_dataset

        unknown = sorted(set(subjects) - set(SUBJECTS))
        if unknown:
            raise ValueError(f"unknown MATH subject(s) {unknown}; choose from {list(SUBJECTS)}")
        path = options.pop("path", self.hub_dataset)  # a mirror or local copy with the hub layout
        items: list[Item] = []
        skipped = index = 0
        for subject in subjects:
            for row in load_dataset(path, subject, split=split, **options):
                item = self.from_hub_row(dict(row), index)
                index += 1
                if item is None:
                    skipped += 1
                else:
                    items.append(item)
        if skipped:
            warnings.warn(
                f"MATH {split}: skipped {skipped} rows whose solution has no \\boxed{{}} answer", stacklevel=2
            )
        return items

    def item_from_answer(self, gold: str, question: str = "") -> Item:
        return self.from_official_row({"problem": question, "solution": f"\\boxed{{{gold}}}"}, 0, where="command line")

    # ---- answers -------------------------------------------------------------------------
    def render_answer(self, answer: str) -> str:
        return f"Finish<<<{answer}>>>"

    def extract_answer(self, action: str, grader: str, item: Item | None = None) -> Extraction:
        answer = split_once(action, "Finish<<<", ">>>")
        if answer is not None and answer.strip():
            if grader == "robust":
                answer = answer.strip().strip("$").strip()
            return Extraction(answer, "finish")
        if grader == "official":
            return Extraction(None, "none", "no Finish<<<...>>> action" if answer is None else "empty answer")
        boxed = unbox(last_boxed(action))
        if boxed is not None and boxed.strip():
            return Extraction(boxed.strip(), "boxed")
        bracketed = split_once(action, "Finish[", "]")
        if bracketed is not None and bracketed.strip():
            return Extraction(bracketed.strip().strip("$").strip(), "finish_bracket")
        return Extraction(None, "none", "no Finish<<<...>>>, Finish[...] or \\boxed{} answer")

    def judge(self, item: Item, extraction: Extraction, grader: str) -> Verdict:
        answer = extraction.answer
        assert answer is not None
        official = hendrycks_equal(item.gold, answer)
        if grader == "official":
            return self.verdict(official, grader, extraction)
        symbolic = None if official else math_verify_equal(item.gold, answer)
        return self.verdict(
            official or bool(symbolic), grader, extraction, hendrycks_equal=official, math_verify_equal=symbolic
        )
