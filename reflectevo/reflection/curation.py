"""Curation as code: raw reflection records become the training sets D+, D± and Dpref (method.md §3),
a counts table, JSONL exports and TRL-ready rows; the released ReflectEvo-460K files load into the
same row schema.

Policies (:data:`POLICIES`). A question counts as *failed* when its first trial is not correct
(wrong, unparseable or timed out); only reflections on failed first trials are curated.

* D+: one row per successful reflection, i.e. its second trial is correct.
* D±: per failed question, every (correct-leading, wrong-leading) pair of reflections; a second trial
  that is wrong, unparseable or timed out is wrong-leading.
* Dpref: per failed question with two or more successful reflections, pairs of them are judged
  (by default in both orders); a pair is kept only when both orders prefer the same reflection.
  Ties, position-biased (inconsistent) and unparseable verdicts are counted, never kept silently; a
  reply without a verdict is also counted by why it ended (cut off at the judge's ``max_new_tokens``,
  or ended by itself), and every judgement record keeps its finish reason.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo import prompts
from reflectevo.core.jsonl import read_jsonl, write_jsonl_atomic
from reflectevo.core.seeds import derive_seed
from reflectevo.errors import DataError
from reflectevo.generation.requests import GenerationRequest
from reflectevo.tasks.base import OUTCOMES, Item, check_optional, require_fields

if TYPE_CHECKING:
    import pandas as pd

    from reflectevo.reflection.judges import Judge, JudgeReply
from reflectevo.errors import JudgeError

CURATION_VERSION = "curation-1"
POLICIES: dict[str, str] = {
    "d_plus": "one row per reflection on a failed first trial whose second trial is correct",
    "d_pm": "per failed question, every (correct-leading, wrong-leading) reflection pair; wrong includes "
    "parse failures and time-outs of the second trial",
    "d_pref": "per failed question with >= 2 successful reflections, judged pairs (both orders by default); "
    "kept only when both orders prefer the same reflection; ties, inconsistent and unparseable "
    "verdicts are counted",
}
SOURCE = "reflectevo"  # rows curated from this package's own records
RELEASED = "released"  # rows read from the released ReflectEvo files
JUDGE_OUTCOMES = ("pair", "tie", "inconsistent", "parse_failure")
TRAINING_KINDS = ("one_stage", "reflection", "correction", "dpo")
PROMPT_CHOICES = ("generic", "as_generated")
# the two second-trial prompts (reflect.second_trial, eval.second_trial): the reflection alone, or also the failed attempt
SECOND_TRIAL_VARIANTS = ("reflection", "reflection_and_attempt")
RELEASED_KINDS = ("d_plus", "d_pm", "d_pref", "raw")

RECORD_FIELDS: dict[str, type] = {"task": str, "id": str, "question": str, "answer": str, "output": list}
OUTPUT_FIELDS: dict[str, type] = {
    "trial": int,
    "key": str,
    "reasoning": str,
    "scratchpad": str,
    "generated_answer": str,
    "is_correct": bool,
    "outcome": str,
    "feedback": str,
    "reflections": list,
}


# ---- raw records ---------------------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The raw records of a ``raw.jsonl`` file, checked; errors name ``file:line`` and what to fix."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], int] = {}
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        check_record(record, where)
        check_unique_reflections(record, where, line, seen)
        records.append(record)
    return records


def check_record(record: dict[str, Any], where: str) -> None:
    """Raise :class:`DataError` unless ``record`` has the raw-record schema (see the module docstring)."""
    for name, kind in RECORD_FIELDS.items():
        if name not in record:
            raise DataError(
                f"{where}: missing field {name!r} (a raw record needs {sorted(RECORD_FIELDS)}; "
                f"this one has {sorted(record)})"
            )
        if not isinstance(record[name], kind):
            raise DataError(f"{where}: field {name!r} must be a {kind.__name__}, got {type(record[name]).__name__}")
    outputs = record["output"]
    if not outputs:
        raise DataError(f"{where}: 'output' is empty; it must start with the first trial")
    # the released files name no instruction for their reflections
    needs_instruction = record.get("source") != RELEASED
    for index, output in enumerate(outputs):
        check_output(output, index, f"{where}: output[{index}]", needs_instruction)


def check_output(output: Any, index: int, where: str, needs_instruction: bool = True) -> None:
    if not isinstance(output, dict):
        raise DataError(f"{where} must be a JSON object, got {type(output).__name__}")
    require_fields(output, OUTPUT_FIELDS, where)
    check_optional(output, {"instruction": str, "sample": int}, where)  # they key the reflection (hashed, compared)
    expected_trial = 1 if index == 0 else 2
    if output["trial"] != expected_trial:
        raise DataError(
            f"{where}: trial must be {expected_trial} (output[0] is the first trial, every later "
            f"output a second trial), got {output['trial']!r}"
        )
    if output["outcome"] not in OUTCOMES:
        raise DataError(f"{where}: outcome must be one of {OUTCOMES}, got {output['outcome']!r}")
    if output["is_correct"] != (output["outcome"] == "correct"):
        raise DataError(f"{where}: is_correct={output['is_correct']} contradicts outcome={output['outcome']!r}")
    if expected_trial == 2:
        if needs_instruction and (not isinstance(output.get("instruction"), str) or not output["instruction"]):
            raise DataError(f"{where}: a second trial needs 'instruction', the key of its reflection instruction")
        if not isinstance(output.get("sample"), int) or output["sample"] < 0:
            raise DataError(f"{where}: a second trial needs 'sample', the index of its reflection (an integer >= 0)")
        reflections = output["reflections"]
        if len(reflections) != 1 or not isinstance(reflections[0], str):
            raise DataError(
                f"{where}: 'reflections' of a second trial must hold exactly one string, got {len(reflections)} entries"
            )


def check_unique_reflections(record: dict[str, Any], where: str, line: int, seen: dict[tuple[Any, ...], int]) -> None:
    for output in record["output"]:
        slot = (record["task"], record["id"], output.get("instruction"), output.get("sample"))
        if slot in seen:
            raise DataError(
                f"{where}: (task, id, instruction, sample) = {slot} already appears on line {seen[slot]}; "
                "each question and each reflection must appear once per file (merge or deduplicate)"
            )
        seen[slot] = line


def first_trial(record: dict[str, Any]) -> dict[str, Any]:
    return record["output"][0]


def is_failed(record: dict[str, Any]) -> bool:
    return not first_trial(record)["is_correct"]


def second_trials(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The reflections (as their second-trial outputs) curation uses: those on a failed first trial."""
    return record["output"][1:] if is_failed(record) else []


def reflection_of(output: dict[str, Any]) -> str:
    return output["reflections"][0]


def item_of(task: str, item_id: str, question: str, answer: str) -> Item:
    """A minimal item for the prompt builders (they read the question only)."""
    return Item(task=task, id=item_id, question=question, gold=answer)


def record_item(record: dict[str, Any]) -> Item:
    return item_of(record["task"], record["id"], record["question"], record["answer"])


def generic_reflection_prompt(item: Item, attempt: str, feedback: str) -> str:
    """The reflection prompt of training and test time alike (method.md §8.1.2)."""
    return prompts.reflection_prompt(item, attempt, feedback, prompts.GENERIC_INSTRUCTION)


# ---- D+ and D± -----------------------------------------------------------------------------------
def question_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The official fields every curated row starts with: the question and its failed first trial."""
    first = first_trial(record)
    return {
        "id": record["id"],
        "question": record["question"],
        "answer": record["answer"],
        "first_trial_reasoning": first["scratchpad"],
        "first_trial_answer": first["generated_answer"],
    }


def build_d_plus(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per successful reflection (first trial not correct, its second trial correct)."""
    rows = []
    for record in records:
        first = first_trial(record)
        for output in second_trials(record):
            if not output["is_correct"]:
                continue
            rows.append(
                {
                    **question_fields(record),
                    "second_trial_reasoning": output["scratchpad"],
                    "second_trial_answer": output["generated_answer"],
                    "reflections": reflection_of(output),
                    "reason_prompt": [first.get("reason_input"), output.get("reason_input")],
                    "reflect_prompt": output.get("reflection_input"),
                    "task": record["task"],
                    "instruction": output.get("instruction"),
                    "sample": output.get("sample"),
                    "grader": record.get("grader"),
                    "first_trial_feedback": first["feedback"],
                    "first_trial_attempt": first["reasoning"],
                    "second_trial_attempt": output["reasoning"],
                    "source": record.get("source", SOURCE),
                }
            )
    return rows


def pair_row(record: dict[str, Any], chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
    """A D± / Dpref row: one failed question, a chosen and a rejected reflection."""
    first = first_trial(record)
    return {
        **question_fields(record),
        "second_trial_reasoning_chosen": chosen["scratchpad"],
        "second_trial_answer_chosen": chosen["generated_answer"],
        "reflection_chosen": reflection_of(chosen),
        "second_trial_reasoning_rejected": rejected["scratchpad"],
        "second_trial_answer_rejected": rejected["generated_answer"],
        "reflection_rejected": reflection_of(rejected),
        "reason_prompt": first.get("reason_input"),
        "reflection_prompt": generic_reflection_prompt(record_item(record), first["reasoning"], first["feedback"]),
        "task": record["task"],
        "instruction_chosen": chosen.get("instruction"),
        "sample_chosen": chosen.get("sample"),
        "instruction_rejected": rejected.get("instruction"),
        "sample_rejected": rejected.get("sample"),
        "grader": record.get("grader"),
        "first_trial_feedback": first["feedback"],
        "first_trial_attempt": first["reasoning"],
        "source": record.get("source", SOURCE),
    }


def build_d_pm(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per failed question, every (correct-leading, wrong-leading) pair: chosen in output order, then
    rejected in output order."""
    rows = []
    for record in records:
        outputs = second_trials(record)
        positives = [output for output in outputs if output["is_correct"]]
        negatives = [output for output in outputs if not output["is_correct"]]
        rows.extend(pair_row(record, chosen, rejected) for chosen in positives for rejected in negatives)
    return rows


# ---- Dpref ---------------------------------------------------------------------------------------
def reflection_ref(output: dict[str, Any]) -> list[Any]:
    """(instruction, sample) of a reflection, as a JSON-friendly list."""
    return [output.get("instruction"), output.get("sample")]


def ref_text(output: dict[str, Any]) -> str:
    instruction = output.get("instruction")
    return f"{'?' if instruction is None else instruction}#{output.get('sample')}"


@dataclass
class Comparison:
    """One unordered pair of successful reflections of a failed question and its judge requests.

    ``first`` comes before ``second`` in output order; in order "ab" ``first`` is reflection A, in
    order "ba" it is reflection B.
    """

    record: dict[str, Any]
    first: dict[str, Any]
    second: dict[str, Any]
    orders: list[str]
    requests: list[GenerationRequest]

    @property
    def task(self) -> str:
        return self.record["task"]

    @property
    def id(self) -> str:
        return self.record["id"]


@dataclass
class DPrefResult:
    rows: list[dict[str, Any]]  # the Dpref rows (pairs both orders agree on)
    judgements: list[dict[str, Any]]  # one per judge request: prompt, reply, parsed verdict
    outcomes: Counter[str]  # per unordered pair: pair, tie, inconsistent, parse_failure
    decisions: list[dict[str, Any]] = field(
        default_factory=list
    )  # per unordered pair: task, id, refs, verdicts, outcome


def check_max_pairs(max_pairs_per_question: int) -> int:
    if not isinstance(max_pairs_per_question, int) or max_pairs_per_question < 1:
        raise ValueError(f"max_pairs_per_question must be an integer >= 1, got {max_pairs_per_question!r}")
    return max_pairs_per_question


def chosen_pairs(record: dict[str, Any], count: int, max_pairs: int, seed: int) -> list[tuple[int, int]]:
    """All index pairs i < j, or a seeded sample of ``max_pairs`` of them kept in sorted order. The seed
    depends on the question only, so adding questions never changes another question's pairs."""
    pairs = list(itertools.combinations(range(count), 2))
    if len(pairs) <= max_pairs:
        return pairs
    rng = random.Random(derive_seed(seed, record["task"], record["id"], "judge"))
    return sorted(rng.sample(pairs, max_pairs))


def judge_request(record: dict[str, Any], a: dict[str, Any], b: dict[str, Any], key: str) -> GenerationRequest:
    first = first_trial(record)
    text = prompts.judge_prompt(
        record_item(record), first["reasoning"], first["feedback"], reflection_of(a), reflection_of(b)
    )
    return GenerationRequest(key, [{"role": "user", "content": text}])


def plan_comparisons(
    records: Sequence[dict[str, Any]], *, max_pairs_per_question: int = 16, both_orders: bool = True, seed: int = 0
) -> list[Comparison]:
    """The pairs of successful reflections to judge, with one request per order ("ab", then "ba")."""
    check_max_pairs(max_pairs_per_question)
    orders = ["ab", "ba"] if both_orders else ["ab"]
    comparisons = []
    for record in records:
        successes = [output for output in second_trials(record) if output["is_correct"]]
        for i, j in chosen_pairs(record, len(successes), max_pairs_per_question, seed):
            first, second = successes[i], successes[j]
            base = f"{record['task']}/{record['id']}/{ref_text(first)}~{ref_text(second)}"
            requests = [
                judge_request(record, *((first, second) if order == "ab" else (second, first)), f"{base}/{order}")
                for order in orders
            ]
            comparisons.append(Comparison(record, first, second, list(orders), requests))
    return comparisons


def winner_of(order: str, verdict: str) -> int:
    """0 when the verdict prefers the pair's first reflection, 1 when the second."""
    prefers_a = verdict == "A"
    return 0 if prefers_a == (order == "ab") else 1


def decide(orders: Sequence[str], verdicts: Sequence[str | None]) -> tuple[str, int | None]:
    """The outcome of one pair from its verdicts: ("pair", winner index) or (tie | inconsistent |
    parse_failure, None). An unparseable reply outranks a tie, a tie outranks disagreement."""
    if any(verdict is None for verdict in verdicts):
        return "parse_failure", None
    if "tie" in verdicts:
        return "tie", None
    winners = {winner_of(order, verdict) for order, verdict in zip(orders, verdicts)}
    if len(winners) > 1:
        return "inconsistent", None  # both orders named the same position: position bias
    return "pair", winners.pop()


def check_replies(requests: Sequence[GenerationRequest], replies: Sequence[JudgeReply], judge: Judge) -> None:
    keys = [request.key for request in requests]
    got = [reply.key for reply in replies]
    if got != keys:
        raise JudgeError(
            f"judge {getattr(judge, 'name', '?')!r} answered {len(got)} replies for {len(keys)} requests "
            "or out of order; a judge must return one reply per request, in request order"
        )


def build_d_pref(
    records: Sequence[dict[str, Any]],
    judge: Judge,
    *,
    max_pairs_per_question: int = 16,
    both_orders: bool = True,
    seed: int = 0,
) -> DPrefResult:
    """Judge the planned pairs in one batched call and keep the pairs the judge is consistent about."""
    comparisons = plan_comparisons(
        records, max_pairs_per_question=max_pairs_per_question, both_orders=both_orders, seed=seed
    )
    requests = [request for comparison in comparisons for request in comparison.requests]
    replies = judge.complete(requests) if requests else []
    check_replies(requests, replies, judge)
    result = DPrefResult(rows=[], judgements=[], outcomes=Counter(dict.fromkeys(JUDGE_OUTCOMES, 0)))
    position = 0
    for comparison in comparisons:
        mine = replies[position : position + len(comparison.requests)]
        position += len(comparison.requests)
        verdicts = [prompts.parse_verdict(reply.text) for reply in mine]
        outcome, winner = decide(comparison.orders, verdicts)
        result.outcomes[outcome] += 1
        result.decisions.append(
            {
                "task": comparison.task,
                "id": comparison.id,
                "first": reflection_ref(comparison.first),
                "second": reflection_ref(comparison.second),
                "verdicts": verdicts,
                "outcome": outcome,
            }
        )
        result.judgements.extend(
            judgement(comparison, order, reply, verdict, outcome)
            for order, reply, verdict in zip(comparison.orders, mine, verdicts)
        )
        if winner is not None:
            chosen, rejected = (
                (comparison.first, comparison.second) if winner == 0 else (comparison.second, comparison.first)
            )
            row = pair_row(comparison.record, chosen, rejected)
            row.update({"judge": mine[0].judge, "judge_version": prompts.JUDGE_VERSION, "verdicts": verdicts})
            result.rows.append(row)
    return result


def judgement(
    comparison: Comparison, order: str, reply: JudgeReply, verdict: str | None, outcome: str
) -> dict[str, Any]:
    a, b = (comparison.first, comparison.second) if order == "ab" else (comparison.second, comparison.first)
    return {
        "key": reply.key,
        "task": comparison.task,
        "id": comparison.id,
        "order": order,
        "reflection_a": reflection_ref(a),
        "reflection_b": reflection_ref(b),
        "prompt": reply.prompt,
        "reply": reply.text,
        "verdict": verdict,
        "pair_outcome": outcome,
        "finish_reason": reply.finish_reason,
        "judge": reply.judge,
        "judge_version": prompts.JUDGE_VERSION,
    }


# ---- counts and exports --------------------------------------------------------------------------
COUNT_COLUMNS = (
    "questions",
    "first_correct",
    "first_wrong",
    "first_parse_failures",
    "first_cut_at_limit",
    "reflections",
    "reflections_cut_at_limit",
    "second_correct",
    "second_parse_failures",
    "second_cut_at_limit",
    "reflection_success_rate",
    "questions_with_success",
    "questions_with_pos_and_neg",
    "d_plus",
    "d_pm",
    "d_pref",
    "judge_pairs",
    "judge_ties",
    "judge_inconsistent",
    "judge_parse_failures",
    "judge_unparsed_replies",
    "judge_unparsed_length",
    "judge_unparsed_stop",
    "judge_unparsed_other",
)
JUDGE_COLUMNS = {
    "pair": "judge_pairs",
    "tie": "judge_ties",
    "inconsistent": "judge_inconsistent",
    "parse_failure": "judge_parse_failures",
}
# Judge replies without a verdict (per reply; judge_parse_failures counts pairs), by why they ended:
# "length", cut off at reflect.judge.max_new_tokens (raise it); "stop", ended by itself ("eos" of a local
# engine, "stop" of an endpoint: the judge gave no verdict line); "other", any other or no finish reason.
UNPARSED_COLUMNS = {"length": "judge_unparsed_length", "eos": "judge_unparsed_stop", "stop": "judge_unparsed_stop"}


def unparsed_column(finish_reason: str | None) -> str:
    """The counts column of a judge reply without a verdict, by its finish reason."""
    return UNPARSED_COLUMNS.get(finish_reason or "", "judge_unparsed_other")


def cut_at_limit(output: dict[str, Any], call: str = "attempt") -> bool:
    """Whether an output's attempt (any of its calls) or its reflection stopped at the token limit
    (finish reason "length") rather than ending by itself: a real model's rambling, counted per task."""
    calls = (output.get("generation") or {}).get(call)
    calls = calls if isinstance(calls, list) else [calls]
    return any((info or {}).get("finish_reason") == "length" for info in calls)


def record_counts(record: dict[str, Any]) -> Counter:
    first = first_trial(record)
    outputs = second_trials(record)
    correct = sum(output["is_correct"] for output in outputs)
    return Counter(
        {
            "questions": 1,
            "first_correct": int(first["is_correct"]),
            "first_wrong": int(not first["is_correct"]),
            "first_parse_failures": int(first["outcome"] == "parse_failure"),
            "first_cut_at_limit": int(cut_at_limit(first)),
            "reflections": len(outputs),
            "reflections_cut_at_limit": sum(cut_at_limit(output, "reflection") for output in outputs),
            "second_correct": correct,
            "second_parse_failures": sum(output["outcome"] == "parse_failure" for output in outputs),
            "second_cut_at_limit": sum(cut_at_limit(output) for output in outputs),
            "questions_with_success": int(correct > 0),
            "questions_with_pos_and_neg": int(0 < correct < len(outputs)),
        }
    )


def counts_table(
    records: Sequence[dict[str, Any]],
    d_plus: Sequence[dict[str, Any]],
    d_pm: Sequence[dict[str, Any]],
    d_pref: DPrefResult | None,
) -> pd.DataFrame:
    """One row per task and an "all" row (index ``task``). The success rate is second-trial correct
    over reflections on failed first trials (NaN when there are none); judge columns are 0 without a judge.
    ``judge_parse_failures`` counts pairs, ``judge_unparsed_*`` the replies without a verdict, by finish
    reason (:data:`UNPARSED_COLUMNS`)."""
    import pandas as pd

    per_task: dict[str, Counter] = {}
    for record in records:
        per_task.setdefault(record["task"], Counter()).update(record_counts(record))
    for name, rows in (("d_plus", d_plus), ("d_pm", d_pm), ("d_pref", d_pref.rows if d_pref else [])):
        for row in rows:
            per_task.setdefault(row["task"], Counter())[name] += 1
    for decision in d_pref.decisions if d_pref else []:
        per_task.setdefault(decision["task"], Counter())[JUDGE_COLUMNS[decision["outcome"]]] += 1
    for judged in d_pref.judgements if d_pref else []:
        if judged["verdict"] is None:
            per_task.setdefault(judged["task"], Counter()).update(
                {"judge_unparsed_replies": 1, unparsed_column(judged.get("finish_reason")): 1}
            )
    total = sum(per_task.values(), Counter())
    table = [count_row(name, counts) for name, counts in sorted(per_task.items())] + [count_row("all", total)]
    return pd.DataFrame(table).set_index("task")


def counts_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The counts table as JSON-ready rows (``task`` first; a NaN rate becomes None)."""
    rows = table.reset_index().to_dict("records")
    return [
        {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in row.items()}
        for row in rows
    ]


def count_row(task: str, counts: Counter) -> dict[str, Any]:
    row: dict[str, Any] = {"task": task}
    for column in COUNT_COLUMNS:
        row[column] = int(counts.get(column, 0))
    reflections = row["reflections"]
    row["reflection_success_rate"] = round(row["second_correct"] / reflections, 4) if reflections else float("nan")
    return row


def write_curated(
    out_dir: str | Path,
    d_plus: Sequence[dict[str, Any]],
    d_pm: Sequence[dict[str, Any]],
    d_pref_rows: Sequence[dict[str, Any]],
    judgements: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write the four JSONL files atomically; ``judgements.jsonl`` is empty when no judge ran."""
    out_dir = Path(out_dir)
    parts = {"d_plus": d_plus, "d_pm": d_pm, "d_pref": d_pref_rows, "judgements": judgements or []}
    return {name: write_jsonl_atomic(out_dir / f"{name}.jsonl", rows) for name, rows in parts.items()}
