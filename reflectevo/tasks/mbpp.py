"""MBPP: short Python programming tasks checked by asserts (Austin et al., 2021).

Official file: ``mbpp_test.jsonl`` rows ``{text, code, task_id, test_setup_code, test_list,
challenge_test_list}``; items keep ``task_id`` as their id, and the question is worded as the
official loader words it (the tests are shown to the model).

Grading runs the model's code in the :mod:`reflectevo.sandbox`, which needs an explicit opt-in;
the code is read from the action only (the text after ``Action:``, see :meth:`Task.extract`).
official: the code between ``[BEGIN]`` and ``[END]`` (both required), executed in an empty
namespace, then each assert of ``test_list``; ``test_setup_code`` is ignored, as in the paper's
code (so task 367, whose tests need it, fails even with the reference solution). robust: also
accepts a fenced ```python block or an unterminated ``[BEGIN]``, and runs ``test_setup_code``
after the solution, before the tests.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from typing import Any

from reflectevo.errors import CodeExecutionNotAllowed, DataError, ReflectEvoError
from reflectevo.sandbox.host import CodeJob
from reflectevo.tasks.base import (
    CORRECT_OBSERVATION,
    INCORRECT_OBSERVATION,
    Extraction,
    FewShot,
    Item,
    Task,
    Verdict,
    check_grader,
    check_optional,
    extraction_details,
    require_fields,
    require_text,
)

QUESTION_TEMPLATE = (
    "You are an expert Python programmer, and here is your task: {text}Your code should pass these tests: {tests}"
)
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def official_question(text: str, tests: list[str]) -> str:
    # the official loader glues the parts together without a separator and shows the list's repr
    return QUESTION_TEMPLATE.format(text=text, tests=str(tests))


class MBPP(Task):
    name = "mbpp"
    version = "2"
    description = "MBPP Python programming, graded by running the asserts in a sandbox"
    answer_format = "write your Python code after Action: between [BEGIN] and [END]"
    invalid_hint = "Invalid action. Put your complete Python code between [BEGIN] and [END] after Action:."
    official_file = "mbpp_test.jsonl"
    official_sha256 = (
        "d3605136eaa3d19d23496dd93d3623a637336768068f39835c1e6df44e9bfb81"  # the file at the paper's commit 6634f923
    )
    hub_splits = ("train", "validation", "test")
    hub_dataset = "google-research-datasets/mbpp"
    needs_code_execution = True
    fewshots = (
        FewShot(
            question=official_question(
                "Write a function to return the largest of three numbers.",
                ["assert largest_of_three(1, 5, 3) == 5", "assert largest_of_three(-1, -7, -2) == -1"],
            ),
            thought="Python's max takes any number of arguments, so the function can return max(a, b, c).",
            action="[BEGIN]\ndef largest_of_three(a, b, c):\n    return max(a, b, c)\n[END]",
        ),
        FewShot(
            question=official_question(
                "Write a function to count the vowels in a string.",
                ["assert count_vowels('banana') == 3", "assert count_vowels('Sky') == 0"],
            ),
            thought="Lower-case the string and count the characters that are one of a, e, i, o, u.",
            action="[BEGIN]\ndef count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in 'aeiou')\n[END]",
        ),
        FewShot(
            question=official_question(
                "Write a function to reverse the order of words in a sentence.",
                ["assert reverse_words('hello big world') == 'world big hello'"],
            ),
            thought="Split the sentence on whitespace, reverse the list of words and join them with spaces.",
            action="[BEGIN]\ndef reverse_words(sentence):\n    return ' '.join(reversed(sentence.split()))\n[END]",
        ),
    )

    # ---- loading -------------------------------------------------------------------------
    def _item(self, row: dict[str, Any], text: str, setup: str, where: str) -> Item:
        require_fields(row, {"task_id": int, "code": str, "test_list": list}, where)
        require_text(row, ["code"], where)
        check_optional(row, {"challenge_test_list": list}, where)
        tests = row["test_list"]
        if not tests or not all(isinstance(test, str) and test.strip() for test in tests):
            raise DataError(f"{where}: test_list must be a non-empty list of assert strings")
        if not all(isinstance(test, str) for test in row.get("challenge_test_list") or []):
            raise DataError(f"{where}: challenge_test_list must be a list of assert strings")
        return Item(
            task=self.name,
            id=str(row["task_id"]),
            question=official_question(text, tests),
            gold=row["code"],
            tests=list(tests),
            setup_code=setup,
            source_id=str(row["task_id"]),
            metadata={"text": text, "challenge_tests": list(row.get("challenge_test_list") or [])},
        )

    def from_official_row(self, row: dict[str, Any], index: int, where: str) -> Item:
        require_fields(row, {"text": str}, where)
        require_text(row, ["text"], where)
        check_optional(row, {"test_setup_code": str}, where)
        return self._item(row, row["text"], row.get("test_setup_code") or "", where)

    def from_hub_row(self, row: dict[str, Any], index: int, **context: Any) -> Item:
        where = f"{self.hub_dataset} row {index}"
        # the "full" configuration has text/test_setup_code; "sanitized" has prompt/test_imports
        if "text" in row:
            return self.from_official_row(row, index, where)
        require_fields(row, {"prompt": str}, where)
        require_text(row, ["prompt"], where)
        setup = "\n".join(row.get("test_imports") or [])
        return self._item(row, row["prompt"], setup, where)

    def load_hub(self, split: str = "test", config: str = "full", **options: Any) -> list[Item]:
        from datasets import load_dataset

        path = options.pop("path", self.hub_dataset)  # a mirror or local copy with the hub layout
        rows = load_dataset(path, config, split=split, **options)
        return [self.from_hub_row(dict(row), index) for index, row in enumerate(rows)]

    def item_from_answer(self, gold: str, question: str = "") -> Item:
        raise ReflectEvoError(
            "mbpp cannot grade a bare answer (it needs the item's tests): give the item with --data FILE --id ID"
        )

    # ---- answers -------------------------------------------------------------------------
    def render_answer(self, answer: str) -> str:
        return f"[BEGIN]\n{answer}\n[END]"

    def extract_answer(self, action: str, grader: str, item: Item | None = None) -> Extraction:
        if "[BEGIN]" in action and "[END]" in action:
            code = action.split("[BEGIN]", 1)[1].split("[END]", 1)[0]
            if grader == "robust":
                code = _unfence(code)
            if code.strip():
                return Extraction(code, "begin_end")
            return Extraction(None, "none", "empty code between [BEGIN] and [END]")
        if grader == "official":
            return Extraction(None, "none", "no [BEGIN] ... [END] block")
        fenced = _FENCE.search(action)
        if fenced and fenced.group(1).strip():
            return Extraction(textwrap.dedent(fenced.group(1)), "fenced")
        if "[BEGIN]" in action:
            code = _unfence(action.split("[BEGIN]", 1)[1])
            if code.strip():
                return Extraction(code, "begin_unterminated")
        return Extraction(None, "none", "no [BEGIN] ... [END] block or ```python fence")

    def job_for(self, item: Item, code: str, grader: str):
        """The sandbox job that checks ``code`` against ``item`` under ``grader``'s rules."""

        official = grader == "official"
        return CodeJob(
            program=code,
            tests=item.tests,
            setup_code="" if official else item.setup_code,
            bare_namespace=official,
        )

    def grade(self, item: Item, text: str, grader: str = "official", sandbox: Any = None) -> Verdict:
        return self.grade_many([item], [text], grader, sandbox)[0]

    def grade_many(
        self, items: Sequence[Item], texts: Sequence[str], grader: str = "official", sandbox: Any = None
    ) -> list[Verdict]:
        check_grader(grader)
        if sandbox is None:
            raise CodeExecutionNotAllowed(
                "grading MBPP runs model-written code: pass sandbox=Sandbox(allow_code_execution=True) "
                "(command line: --allow-code-execution)"
            )
        if len(items) != len(texts):
            raise ValueError(f"{len(items)} items but {len(texts)} outputs")
        extractions = [self.extract(text, grader, item) for item, text in zip(items, texts)]
        runnable = [i for i, extraction in enumerate(extractions) if extraction.ok]
        results = sandbox.run_many([self.job_for(items[i], extractions[i].answer, grader) for i in runnable])
        by_index = dict(zip(runnable, results))
        verdicts = []
        for index, extraction in enumerate(extractions):
            if not extraction.ok:
                verdicts.append(self.parse_failure(extraction, grader))
                continue
            run = by_index[index]
            outcome = "correct" if run.passed else ("timeout" if run.status == "timeout" else "wrong")
            error = run.official_error if grader == "official" else run.error
            feedback = f"{error}\n{CORRECT_OBSERVATION if run.passed else INCORRECT_OBSERVATION}".lstrip("\n")
            verdicts.append(
                Verdict(
                    outcome=outcome,
                    grader=grader,
                    extracted=extraction.answer,
                    feedback=feedback,
                    details={**extraction_details(extraction), "execution": execution_details(run)},
                )
            )
        return verdicts


def execution_details(run: Any) -> dict[str, Any]:
    """What a verdict keeps of a sandbox run: everything but its wall-clock duration, so records of
    the same run are byte-identical (a time-out is already its own outcome)."""
    details = run.to_dict()
    details.pop("duration_s", None)
    return details


def _unfence(code: str) -> str:
    # models often wrap the code inside [BEGIN] ... [END] in a ```python fence as well
    fenced = _FENCE.search(code)
    return textwrap.dedent(fenced.group(1)) if fenced else code
