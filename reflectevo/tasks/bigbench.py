"""BIG-bench: the paper's 500-item mix of multiple-choice and free-text rows (Srivastava et al., 2022).

Official file: ``bigbench_test.jsonl`` rows ``{question, answer}``, plus ``id`` on the
multiple-choice rows (kept as ``source_id``). A multiple-choice row lists its options as
``A. ...`` lines after ``Options:`` and has a single-letter gold (``a``); a free-text row has a
short text gold ("1930", "the girl"). Items are numbered by row (index + 1); each item records
``metadata["answer_type"]`` (``choice`` or ``free``) so results can be split by row type.

Grading reads the action only (the text after ``Action:``, see :meth:`Task.extract`). official:
the text between ``Finish[`` and the next ``]``, compared with the gold case-insensitively, for
every row (free text included), as the paper's code does. robust: multiple-choice rows read the
option letter tolerantly (a letter that is not an option is a wrong answer, not a parse failure);
free-text rows use SQuAD-normalised exact match, and report token F1.
"""

from __future__ import annotations

import re
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
    squad_normalize,
    token_f1,
)

_SINGLE_LETTER = re.compile(r"[A-Za-z]")


class BigBench(Task):
    name = "bigbench"
    version = "2"
    description = "BIG-bench mix: multiple-choice rows (letter) and free-text rows (short answer)"
    answer_format = (
        "finish with your answer inside square brackets after Finish: the option letter for a "
        "multiple-choice question, for example Finish[A], otherwise a short phrase, for example Finish[1930]"
    )
    invalid_hint = "Invalid action. Give your answer as Finish[<answer>], for example Finish[B] or Finish[Paris]."
    official_file = "bigbench_test.jsonl"
    official_sha256 = (
        "d6673ddf3b6a06a362d974bd77678492aa75cd19b79033d473e9643e81cd341e"  # the file at the paper's commit 6634f923
    )
    hub_splits = ("train", "validation")
    hub_dataset = "tasksource/bigbench"
    fewshots = (
        FewShot(
            question=(
                "Based only on the passage, answer whether the claim is True, False or Neither.\n\n"
                "Passage: The Danube flows through ten countries before it reaches the Black Sea.\n"
                "Claim: The Danube ends in the Black Sea.\nOptions:\nA. True\nB. False\nC. Neither"
            ),
            thought="The passage says the river reaches the Black Sea, which is where it ends. The claim holds.",
            action="Finish[A]",
        ),
        FewShot(
            question=(
                "Based only on the passage, answer whether the claim is True, False or Neither.\n\n"
                "Passage: The museum opened in 1994 and welcomed 2,000 visitors in its first week.\n"
                "Claim: The museum is the oldest in the city.\nOptions:\nA. True\nB. False\nC. Neither"
            ),
            thought="The passage gives the opening year and visitor numbers but says nothing about other museums.",
            action="Finish[C]",
        ),
        FewShot(
            question=(
                "My grandmother planted the oak behind our house the summer she turned twenty, in 1952. "
                "It now shades the whole garden.\n\nQuestion: In which year was the oak planted?"
            ),
            thought="The passage states the oak was planted in 1952.",
            action="Finish[1952]",
        ),
    )

    # ---- loading -------------------------------------------------------------------------
    def _item(self, question: str, gold: str, index: int, source_id: str | None, where: str, **metadata: Any) -> Item:
        options = parse_options(question)
        choice = bool(_SINGLE_LETTER.fullmatch(gold)) and gold.upper() in LETTERS[: len(options)]
        if _SINGLE_LETTER.fullmatch(gold) and options and not choice:
            raise DataError(f"{where}: gold letter {gold!r} is not one of the {len(options)} options")
        return Item(
            task=self.name,
            id=str(index + 1),
            question=question,
            gold=gold,
            options=options if choice else [],
            source_id=source_id,
            metadata={"answer_type": "choice" if choice else "free", **metadata},
        )

    def from_official_row(self, row: dict[str, Any], index: int, where: str) -> Item:
        require_fields(row, {"question": str, "answer": (str, dict)}, where)
        check_optional(row, {"id": (str, int)}, where)
        gold = row["answer"]
        if isinstance(gold, dict):  # the official env accepts {"answer": ...} golds as well
            gold = gold.get("answer")
            if not isinstance(gold, str):
                raise DataError(f"{where}: answer object has no string 'answer' field")
        if not gold.strip():
            raise DataError(f"{where}: empty answer")
        source_id = None if row.get("id") is None else str(row["id"])
        return self._item(row["question"], gold, index, source_id, where)

    def from_hub_row(self, row: dict[str, Any], index: int, **context: Any) -> Item:
        subtask = context.get("subtask", "")
        where = f"{self.hub_dataset}/{subtask} row {index}"
        require_fields(row, {"inputs": str, "targets": list}, where)
        choices = list(row.get("multiple_choice_targets") or [])
        scores = list(row.get("multiple_choice_scores") or [])
        source_id = f"{subtask}:{row.get('idx', index)}"
        if choices:
            if len(scores) != len(choices) or scores.count(1) != 1:
                raise DataError(f"{where}: needs exactly one correct multiple_choice_target, got scores {scores}")
            if len(choices) > len(LETTERS):
                raise DataError(f"{where}: {len(choices)} options is more than the letters A-Z")
            # the official rows list the options as "A. text" lines after "Options:"
            question = (
                row["inputs"].rstrip()
                + "\nOptions:\n"
                + "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
            )
            gold = LETTERS[scores.index(1)].lower()
        else:
            targets = [target for target in row["targets"] if isinstance(target, str) and target.strip()]
            if not targets:
                raise DataError(f"{where}: no target answer")
            question, gold = row["inputs"].rstrip(), targets[0]
        return self._item(question, gold, index, source_id, where, subtask=subtask, all_targets=list(row["targets"]))

    def load_hub(
        self, split: str = "validation", subtasks: tuple[str, ...] = ("vitaminc_fact_verification",), **options: Any
    ) -> list[Item]:
        # There is no hub twin of the paper's 500-item mix: name the BIG-bench subtasks to draw from.
        from datasets import load_dataset

        path = options.pop("path", self.hub_dataset)  # a mirror or local copy with the hub layout
        items: list[Item] = []
        for subtask in subtasks:
            for row in load_dataset(path, subtask, split=split, **options):
                items.append(self.from_hub_row(dict(row), len(items), subtask=subtask))
        return items

    # ---- answers -------------------------------------------------------------------------
    def render_answer(self, answer: str) -> str:
        return f"Finish[{answer}]"

    def extract_answer(self, action: str, grader: str, item: Item | None = None) -> Extraction:
        if grader == "official":
            return official_finish(action)
        argument = finish_argument_balanced(action)
        if argument is None:
            return Extraction(None, "none", "no Finish[...] action")
        if item is not None and item.metadata.get("answer_type") == "choice":
            return read_option_extraction(argument, item.options, len(item.options))
        if not argument.strip():
            return Extraction(None, "none", "empty Finish[]")
        return Extraction(argument.strip(), "finish")

    def judge(self, item: Item, extraction: Extraction, grader: str) -> Verdict:
        answer = extraction.answer
        assert answer is not None
        if grader == "official" or item.metadata.get("answer_type") == "choice":
            return self.verdict(answer.lower() == item.gold.lower(), grader, extraction)
        exact = squad_normalize(answer) == squad_normalize(item.gold)
        f1 = token_f1(answer, item.gold)
        verdict = self.verdict(exact, grader, extraction, exact_match=float(exact), f1=round(f1, 4))
        if not exact:  # the paper's free-text environment shows the scores after a wrong answer
            verdict.feedback = f"Answer is INCORRECT. F1 Score: {f1:.4f} Exact Match Score: {float(exact)}"
        return verdict
