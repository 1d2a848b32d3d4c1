"""LogiQA: four-option logical reasoning questions (Liu et al., 2020).

Official file: ``logiqa_test.jsonl`` rows ``{id, question, answer}``; the question ends with the
options ``A.…`` to ``D.…`` and the gold is a lower-case letter. The official loader numbers items
by row (index + 1); the file's own ``id`` is kept as ``source_id``. 17 questions list their options
as A, C, B, D (parsed: each text goes to the letter written before it); 4 have a malformed block
(rows 46, 113, 441, 451: ``A text`` without the dot, or options run into the passage), so their
``options`` is empty and the robust grader reads only letters there (``reflectevo check-graders``
lists them with the reason).

Grading reads the action only (the text after ``Action:``, see :meth:`Task.extract`). official:
the text between ``Finish[`` and the next ``]``, compared with the gold letter case-insensitively
and without stripping ("B." or "(B)" are wrong). robust: the option letter read tolerantly ("(B)",
"B. text", "Option B", the option's own text); a letter that is not an option (``Finish[E]``) is
a wrong answer, as under the official grader, not a parse failure.
"""

from __future__ import annotations

from typing import Any

from reflectevo.errors import DataError
from reflectevo.tasks.base import (
    Extraction,
    FewShot,
    Item,
    Task,
    Verdict,
    check_optional,
    official_finish,
    require_fields,
)
from reflectevo.tasks.text import (
    LETTERS,
    finish_argument_balanced,
    parse_options,
    read_option_extraction,
)

N_OPTIONS = 4


class LogiQA(Task):
    name = "logiqa"
    version = "2"
    description = "LogiQA logical reasoning, 4 options, answer letter"
    answer_format = (
        "finish with the letter of the correct option inside square brackets after Finish, for example Finish[B]"
    )
    invalid_hint = "Invalid action. Give your answer as Finish[<option letter>], for example Finish[C]."
    official_file = "logiqa_test.jsonl"
    official_sha256 = (
        "341727c06cf604d90b2adbcfa39736fc81d1a2fcd25c41d4adc8441c621e7f06"  # the file at the paper's commit 6634f923
    )
    hub_splits = ("train", "validation", "test")
    hub_dataset = "lucasmccabe/logiqa"
    fewshots = (
        FewShot(
            question=(
                "Every member of the chess club also plays in the school orchestra. Mira does not play in "
                "the school orchestra.\nWhich of the following must be true?\nA.Mira is a member of the chess "
                "club.\nB.Mira is not a member of the chess club.\nC.Mira plays chess at home.\nD.Every "
                "orchestra player is in the chess club."
            ),
            thought=(
                "If Mira were in the chess club she would play in the orchestra. She does not, so she cannot "
                "be a member. C and D do not follow from the statements."
            ),
            action="Finish[B]",
        ),
        FewShot(
            question=(
                "A bakery claims its new oven cut baking costs by a third, because its monthly energy bill "
                "fell after the oven was installed.\nWhich of the following, if true, most weakens the claim?"
                "\nA.The new oven bakes bread faster.\nB.Customers prefer the new bread.\nC.Energy prices in "
                "the region fell sharply that same month.\nD.The bakery plans to buy a second oven."
            ),
            thought=(
                "The claim credits the oven for the lower bill. If energy prices themselves fell at the same "
                "time, the lower bill may have nothing to do with the oven. That is option C."
            ),
            action="Finish[C]",
        ),
        FewShot(
            question=(
                "Some of the hikers carried maps. None of the hikers who carried maps got lost.\nWhich of "
                "the following can be concluded?\nA.Some hikers did not get lost.\nB.All hikers carried "
                "maps.\nC.Hikers without maps got lost.\nD.No hiker got lost."
            ),
            thought=(
                "The hikers who carried maps exist and none of them got lost, so at least some hikers did "
                "not get lost. Nothing is said about hikers without maps."
            ),
            action="Finish[A]",
        ),
    )

    # ---- loading -------------------------------------------------------------------------
    def from_official_row(self, row: dict[str, Any], index: int, where: str) -> Item:
        require_fields(row, {"question": str, "answer": str}, where)
        check_optional(row, {"id": (str, int)}, where)
        gold = row["answer"]
        if gold.upper() not in LETTERS[:N_OPTIONS] or len(gold) != 1:
            raise DataError(f"{where}: LogiQA answer must be one letter a-d, got {gold!r}")
        return Item(
            task=self.name,
            id=str(index + 1),
            question=row["question"],
            gold=gold,
            options=parse_options(row["question"], expected=N_OPTIONS),
            source_id=None if row.get("id") is None else str(row["id"]),
        )

    def from_hub_row(self, row: dict[str, Any], index: int, **context: Any) -> Item:
        where = f"{self.hub_dataset} row {index}"
        require_fields(row, {"context": str, "query": str, "options": list}, where)
        options = [str(option).strip() for option in row["options"]]
        if len(options) != N_OPTIONS:
            raise DataError(f"{where}: expected {N_OPTIONS} options, got {len(options)}")
        correct = row.get("correct_option")
        if isinstance(correct, str) and correct.strip().isdigit():
            correct = int(correct)
        if not isinstance(correct, int) or not 0 <= correct < N_OPTIONS:
            raise DataError(f"{where}: correct_option must be an index 0-3, got {correct!r}")
        # the same layout as the official file: passage, query, then one "A.text" line per option
        lines = [row["context"].strip(), row["query"].strip()]
        lines += [f"{LETTERS[i]}.{option}" for i, option in enumerate(options)]
        return Item(
            task=self.name,
            id=str(index + 1),
            question="\n".join(lines),
            gold=LETTERS[correct].lower(),
            options=options,
            metadata={"source_split": context.get("split")},
        )

    def load_hub(self, split: str = "test", revision: str = "refs/convert/parquet", **options: Any) -> list[Item]:
        # The hub repository only holds a loading script, which datasets 4 no longer runs; its
        # automatic parquet export lives under the refs/convert/parquet revision.
        from datasets import load_dataset

        path = options.pop("path", self.hub_dataset)  # a mirror or local copy with the hub layout
        rows = load_dataset(path, split=split, revision=revision, **options)
        return [self.from_hub_row(dict(row), index, split=split) for index, row in enumerate(rows)]

    # ---- answers -------------------------------------------------------------------------
    def render_answer(self, answer: str) -> str:
        return f"Finish[{answer}]"

    def extract_answer(self, action: str, grader: str, item: Item | None = None) -> Extraction:
        if grader == "official":
            return official_finish(action)
        argument = finish_argument_balanced(action)
        if argument is None:
            return Extraction(None, "none", "no Finish[...] action")
        options = item.options if item is not None else []
        return read_option_extraction(argument, options, N_OPTIONS)

    def judge(self, item: Item, extraction: Extraction, grader: str) -> Verdict:
        assert extraction.answer is not None
        return self.verdict(extraction.answer.lower() == item.gold.lower(), grader, extraction)
