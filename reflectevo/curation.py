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

import functools
import itertools
import json
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo import prompts
from reflectevo.config import derive_seed
from reflectevo.errors import DataError, DataFileNotFound
from reflectevo.generation import GenerationRequest
from reflectevo.jsonl import read_jsonl, reject_lone_surrogates, write_jsonl_atomic
from reflectevo.tasks import get_task
from reflectevo.tasks.base import OUTCOMES, Item, check_optional, require_fields

if TYPE_CHECKING:
    import datasets
    import pandas as pd

    from reflectevo.judges import Judge, JudgeReply

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
    "trial": int, "key": str, "reasoning": str, "scratchpad": str, "generated_answer": str,
    "is_correct": bool, "outcome": str, "feedback": str, "reflections": list,
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
            raise DataError(f"{where}: missing field {name!r} (a raw record needs {sorted(RECORD_FIELDS)}; "
                            f"this one has {sorted(record)})")
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
        raise DataError(f"{where}: trial must be {expected_trial} (output[0] is the first trial, every later "
                        f"output a second trial), got {output['trial']!r}")
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
            raise DataError(f"{where}: 'reflections' of a second trial must hold exactly one string, got {len(reflections)} entries")


def check_unique_reflections(record: dict[str, Any], where: str, line: int, seen: dict[tuple[Any, ...], int]) -> None:
    for output in record["output"]:
        slot = (record["task"], record["id"], output.get("instruction"), output.get("sample"))
        if slot in seen:
            raise DataError(f"{where}: (task, id, instruction, sample) = {slot} already appears on line {seen[slot]}; "
                            "each question and each reflection must appear once per file (merge or deduplicate)")
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
    return {"id": record["id"], "question": record["question"], "answer": record["answer"],
            "first_trial_reasoning": first["scratchpad"], "first_trial_answer": first["generated_answer"]}


def build_d_plus(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per successful reflection (first trial not correct, its second trial correct)."""
    rows = []
    for record in records:
        first = first_trial(record)
        for output in second_trials(record):
            if not output["is_correct"]:
                continue
            rows.append({
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
            })
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
    decisions: list[dict[str, Any]] = field(default_factory=list)  # per unordered pair: task, id, refs, verdicts, outcome


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
    text = prompts.judge_prompt(record_item(record), first["reasoning"], first["feedback"], reflection_of(a), reflection_of(b))
    return GenerationRequest(key, [{"role": "user", "content": text}])


def plan_comparisons(records: Sequence[dict[str, Any]], *, max_pairs_per_question: int = 16, both_orders: bool = True,
                     seed: int = 0) -> list[Comparison]:
    """The pairs of successful reflections to judge, with one request per order ("ab", then "ba")."""
    check_max_pairs(max_pairs_per_question)
    orders = ["ab", "ba"] if both_orders else ["ab"]
    comparisons = []
    for record in records:
        successes = [output for output in second_trials(record) if output["is_correct"]]
        for i, j in chosen_pairs(record, len(successes), max_pairs_per_question, seed):
            first, second = successes[i], successes[j]
            base = f"{record['task']}/{record['id']}/{ref_text(first)}~{ref_text(second)}"
            requests = [judge_request(record, *((first, second) if order == "ab" else (second, first)), f"{base}/{order}")
                        for order in orders]
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
    from reflectevo.judges import JudgeError

    keys = [request.key for request in requests]
    got = [reply.key for reply in replies]
    if got != keys:
        raise JudgeError(f"judge {getattr(judge, 'name', '?')!r} answered {len(got)} replies for {len(keys)} requests "
                         "or out of order; a judge must return one reply per request, in request order")


def build_d_pref(records: Sequence[dict[str, Any]], judge: Judge, *, max_pairs_per_question: int = 16,
                 both_orders: bool = True, seed: int = 0) -> DPrefResult:
    """Judge the planned pairs in one batched call and keep the pairs the judge is consistent about."""
    comparisons = plan_comparisons(records, max_pairs_per_question=max_pairs_per_question, both_orders=both_orders, seed=seed)
    requests = [request for comparison in comparisons for request in comparison.requests]
    replies = judge.complete(requests) if requests else []
    check_replies(requests, replies, judge)
    result = DPrefResult(rows=[], judgements=[], outcomes=Counter(dict.fromkeys(JUDGE_OUTCOMES, 0)))
    position = 0
    for comparison in comparisons:
        mine = replies[position:position + len(comparison.requests)]
        position += len(comparison.requests)
        verdicts = [prompts.parse_verdict(reply.text) for reply in mine]
        outcome, winner = decide(comparison.orders, verdicts)
        result.outcomes[outcome] += 1
        result.decisions.append({"task": comparison.task, "id": comparison.id, "first": reflection_ref(comparison.first),
                                 "second": reflection_ref(comparison.second), "verdicts": verdicts, "outcome": outcome})
        result.judgements.extend(judgement(comparison, order, reply, verdict, outcome)
                                 for order, reply, verdict in zip(comparison.orders, mine, verdicts))
        if winner is not None:
            chosen, rejected = (comparison.first, comparison.second) if winner == 0 else (comparison.second, comparison.first)
            row = pair_row(comparison.record, chosen, rejected)
            row.update({"judge": mine[0].judge, "judge_version": prompts.JUDGE_VERSION, "verdicts": verdicts})
            result.rows.append(row)
    return result


def judgement(comparison: Comparison, order: str, reply: JudgeReply, verdict: str | None, outcome: str) -> dict[str, Any]:
    a, b = (comparison.first, comparison.second) if order == "ab" else (comparison.second, comparison.first)
    return {"key": reply.key, "task": comparison.task, "id": comparison.id, "order": order,
            "reflection_a": reflection_ref(a), "reflection_b": reflection_ref(b), "prompt": reply.prompt,
            "reply": reply.text, "verdict": verdict, "pair_outcome": outcome, "finish_reason": reply.finish_reason,
            "judge": reply.judge, "judge_version": prompts.JUDGE_VERSION}


# ---- counts and exports --------------------------------------------------------------------------
COUNT_COLUMNS = (
    "questions", "first_correct", "first_wrong", "first_parse_failures", "reflections", "second_correct",
    "second_parse_failures", "reflection_success_rate", "questions_with_success", "questions_with_pos_and_neg",
    "d_plus", "d_pm", "d_pref", "judge_pairs", "judge_ties", "judge_inconsistent", "judge_parse_failures",
    "judge_unparsed_replies", "judge_unparsed_length", "judge_unparsed_stop", "judge_unparsed_other",
)
JUDGE_COLUMNS = {"pair": "judge_pairs", "tie": "judge_ties", "inconsistent": "judge_inconsistent",
                 "parse_failure": "judge_parse_failures"}
# Judge replies without a verdict (per reply; judge_parse_failures counts pairs), by why they ended:
# "length", cut off at reflect.judge.max_new_tokens (raise it); "stop", ended by itself ("eos" of a local
# engine, "stop" of an endpoint: the judge gave no verdict line); "other", any other or no finish reason.
UNPARSED_COLUMNS = {"length": "judge_unparsed_length", "eos": "judge_unparsed_stop", "stop": "judge_unparsed_stop"}


def unparsed_column(finish_reason: str | None) -> str:
    """The counts column of a judge reply without a verdict, by its finish reason."""
    return UNPARSED_COLUMNS.get(finish_reason or "", "judge_unparsed_other")


def record_counts(record: dict[str, Any]) -> Counter:
    first = first_trial(record)
    outputs = second_trials(record)
    correct = sum(output["is_correct"] for output in outputs)
    return Counter({
        "questions": 1,
        "first_correct": int(first["is_correct"]),
        "first_wrong": int(not first["is_correct"]),
        "first_parse_failures": int(first["outcome"] == "parse_failure"),
        "reflections": len(outputs),
        "second_correct": correct,
        "second_parse_failures": sum(output["outcome"] == "parse_failure" for output in outputs),
        "questions_with_success": int(correct > 0),
        "questions_with_pos_and_neg": int(0 < correct < len(outputs)),
    })


def counts_table(records: Sequence[dict[str, Any]], d_plus: Sequence[dict[str, Any]], d_pm: Sequence[dict[str, Any]],
                 d_pref: DPrefResult | None) -> pd.DataFrame:
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
                {"judge_unparsed_replies": 1, unparsed_column(judged.get("finish_reason")): 1})
    total = sum(per_task.values(), Counter())
    table = [count_row(name, counts) for name, counts in sorted(per_task.items())] + [count_row("all", total)]
    return pd.DataFrame(table).set_index("task")


def counts_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The counts table as JSON-ready rows (``task`` first; a NaN rate becomes None)."""
    rows = table.reset_index().to_dict("records")
    return [{key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in row.items()} for row in rows]


def count_row(task: str, counts: Counter) -> dict[str, Any]:
    row: dict[str, Any] = {"task": task}
    for column in COUNT_COLUMNS:
        row[column] = int(counts.get(column, 0))
    reflections = row["reflections"]
    row["reflection_success_rate"] = round(row["second_correct"] / reflections, 4) if reflections else float("nan")
    return row


def write_curated(out_dir: str | Path, d_plus: Sequence[dict[str, Any]], d_pm: Sequence[dict[str, Any]],
                  d_pref_rows: Sequence[dict[str, Any]], judgements: Sequence[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write the four JSONL files atomically; ``judgements.jsonl`` is empty when no judge ran."""
    out_dir = Path(out_dir)
    parts = {"d_plus": d_plus, "d_pm": d_pm, "d_pref": d_pref_rows, "judgements": judgements or []}
    return {name: write_jsonl_atomic(out_dir / f"{name}.jsonl", rows) for name, rows in parts.items()}


# ---- training rows -------------------------------------------------------------------------------
KIND_FIELDS = {
    "one_stage": ("reflections", "second_trial_attempt", "first_trial_attempt", "first_trial_feedback"),
    "reflection": ("reflections", "first_trial_attempt", "first_trial_feedback"),
    "correction": ("reflections", "second_trial_attempt"),
    "dpo": ("reflection_chosen", "reflection_rejected", "first_trial_attempt", "first_trial_feedback"),
}


def training_rows(kind: str, rows: Sequence[dict[str, Any]], *, prompt: str = "generic", fewshots: int = 0,
                  second_trial: str = "reflection_and_attempt") -> list[dict[str, Any]]:
    """Plain-text training rows (user prompt not yet chat-templated) with ``task`` and ``id``.

    one_stage, reflection and correction take D+ rows and give {prompt, completion}; dpo takes D± or
    Dpref rows and gives {prompt, chosen, rejected}. ``prompt`` picks the reflection prompt: "generic"
    (the test-time prompt) or "as_generated" (the instruction the reflection was generated with). It
    does not apply to correction, whose prompt is the trial-2 prompt; ``fewshots`` and ``second_trial``
    (the evaluation's variant: the reflection alone, or also the failed attempt) are used when that
    prompt has to be rebuilt (released rows, whose stored one holds the target).
    """
    if second_trial not in SECOND_TRIAL_VARIANTS:
        raise ValueError(f"unknown second_trial {second_trial!r}; choose one of {', '.join(SECOND_TRIAL_VARIANTS)}")
    if kind not in TRAINING_KINDS:
        raise ValueError(f"unknown training kind {kind!r}; choose one of {', '.join(TRAINING_KINDS)}")
    if prompt not in PROMPT_CHOICES:
        raise ValueError(f"unknown prompt choice {prompt!r}; choose one of {', '.join(PROMPT_CHOICES)}")
    if kind == "dpo" and prompt == "as_generated":
        raise ValueError("DPO pairs mix reflections generated under different instructions, so there is no single "
                         "'as generated' prompt; use prompt='generic' (the reflection prompt used at test time)")
    build = {"one_stage": one_stage_row, "reflection": reflection_row, "correction": functools.partial(correction_row,
             second_trial=second_trial), "dpo": dpo_row}[kind]
    out = []
    for index, row in enumerate(rows):
        missing = [name for name in ("task", "id", "question", "answer", *KIND_FIELDS[kind]) if name not in row]
        if missing:
            wanted = "D± or Dpref" if kind == "dpo" else "D+"
            raise DataError(f"row {index}: training kind {kind!r} needs {wanted} rows; this row lacks {missing}")
        out.append({"task": row["task"], "id": row["id"], **build(row, prompt, fewshots)})
    return out


def row_item(row: dict[str, Any]) -> Item:
    return item_of(row["task"], row["id"], row["question"], row["answer"])


def row_instruction(row: dict[str, Any], prompt: str) -> prompts.Instruction:
    """The generic instruction, or the one the reflection was generated with (released rows have none)."""
    key = row.get("instruction")
    if prompt == "as_generated" and key:
        return prompts.get_instruction(key)
    return prompts.GENERIC_INSTRUCTION


def reflection_row(row: dict[str, Any], prompt: str, fewshots: int) -> dict[str, str]:
    if prompt == "generic":
        text = generic_reflection_prompt(row_item(row), row["first_trial_attempt"], row["first_trial_feedback"])
    else:
        text = row.get("reflect_prompt")
        if not text:
            raise DataError(f"row {row['task']}/{row['id']} has no stored reflect_prompt; use prompt='generic'")
    return {"prompt": text, "completion": row["reflections"]}


def one_stage_row(row: dict[str, Any], prompt: str, fewshots: int) -> dict[str, str]:
    text = prompts.one_stage_prompt(get_task(row["task"]), row_item(row), row["first_trial_attempt"],
                                    row["first_trial_feedback"], row_instruction(row, prompt))
    return {"prompt": text, "completion": prompts.one_stage_completion(row["reflections"], row["second_trial_attempt"])}


def correction_row(row: dict[str, Any], prompt: str, fewshots: int, second_trial: str = "reflection_and_attempt") -> dict[str, str]:
    stored = row.get("reason_prompt") or []
    if row.get("source") == RELEASED or len(stored) < 2 or not stored[1]:
        # the released reason_prompt[1] already holds the finished second trial (method.md §8.1.3): rebuilt
        # with the second-trial variant the evaluation shows, so the corrector is trained on its test prompt
        previous = (row["first_trial_attempt"], row["first_trial_feedback"]) if second_trial == "reflection_and_attempt" else None
        text = prompts.second_trial_prompt(get_task(row["task"]), row_item(row), row["reflections"], fewshots, previous=previous)
    else:
        text = stored[1]
    return {"prompt": text, "completion": row["second_trial_attempt"]}


def dpo_row(row: dict[str, Any], prompt: str, fewshots: int) -> dict[str, str]:
    text = generic_reflection_prompt(row_item(row), row["first_trial_attempt"], row["first_trial_feedback"])
    return {"prompt": text, "chosen": row["reflection_chosen"], "rejected": row["reflection_rejected"]}


def qa_pair_rows(items: Mapping[str, Sequence[Item]], *, fewshots: int = 0) -> list[dict[str, str]]:
    """The paper's "SFT on QA pairs" baseline (method.md §5.6): every question with its gold answer,
    no reflection. The prompt is the first-trial prompt (so the trained model is asked the way it is
    evaluated); the completion is the gold answer in the task's answer syntax after a fixed thought."""
    rows = []
    for task_name, task_items in items.items():
        task = get_task(task_name)
        for item in task_items:
            rows.append({"task": item.task, "id": item.id, "prompt": prompts.attempt_prompt(task, item, fewshots),
                         "completion": prompts.qa_pair_completion(task, item)})
    return rows


MESSAGE_COLUMNS = ("prompt", "completion", "chosen", "rejected")
ROLES = {"prompt": "user", "completion": "assistant", "chosen": "assistant", "rejected": "assistant"}


def to_trl_dataset(rows: Sequence[dict[str, Any]]) -> datasets.Dataset:
    """A ``datasets.Dataset`` in TRL's conversational prompt-completion (or preference) form: the
    prompt a one-message user turn, the completion (or chosen / rejected) a one-message assistant
    turn. TRL renders them with the training model's own chat template, so the trained tokens are
    the completion followed by exactly the end-of-turn tokens that template writes."""
    import datasets

    columns = {tuple(row) for row in rows}
    if len(columns) > 1:
        raise ValueError(f"rows of different kinds cannot share one dataset: {sorted(columns)}")
    converted = [{key: [{"role": ROLES[key], "content": value}] if key in MESSAGE_COLUMNS else value
                  for key, value in row.items()} for row in rows]
    return datasets.Dataset.from_list(converted, features=training_features(next(iter(columns), ())))


def training_features(columns: Sequence[str]) -> datasets.Features:
    import datasets

    message = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
    return datasets.Features({c: message if c in MESSAGE_COLUMNS else datasets.Value("string") for c in columns})


# The training sets stage 02 saves, and what each is built from (D+, D±, Dpref or the questions).
TRAINING_DATASETS = {
    "sft_one_stage": ("one_stage", "d_plus"),
    "sft_reflection": ("reflection", "d_plus"),
    "sft_correction": ("correction", "d_plus"),
    "sft_qa_pairs": ("qa_pairs", "items"),
    "dpo_d_pm": ("dpo", "d_pm"),
    "dpo_d_pref": ("dpo", "d_pref"),
}
SFT_COLUMNS = ("task", "id", "prompt", "completion")
TRAINING_COLUMNS = {"one_stage": SFT_COLUMNS, "reflection": SFT_COLUMNS, "correction": SFT_COLUMNS, "qa_pairs": SFT_COLUMNS,
                    "dpo": ("task", "id", "prompt", "chosen", "rejected")}


def save_training_datasets(out_dir: str | Path, d_plus: Sequence[dict[str, Any]], d_pm: Sequence[dict[str, Any]],
                           d_pref: Sequence[dict[str, Any]], items: Mapping[str, Sequence[Item]], *,
                           prompt: str = "generic", fewshots: int = 0,
                           second_trial: str = "reflection_and_attempt") -> dict[str, int]:
    """Every TRL-ready set of :data:`TRAINING_DATASETS` under ``out_dir/<name>`` (``datasets.save_to_disk``,
    each folder replaced whole). ``items`` are the questions of the reflection split, for the QA-pairs
    baseline. An empty set is saved too, with its columns, so a later stage can say exactly which set
    is empty. Returns the row count of each set."""
    from reflectevo.runs import atomic_directory

    sources = {"d_plus": d_plus, "d_pm": d_pm, "d_pref": d_pref}
    sizes = {}
    for name, (kind, source) in TRAINING_DATASETS.items():
        if kind == "qa_pairs":
            rows = qa_pair_rows(items, fewshots=fewshots)
        else:
            rows = training_rows(kind, sources[source], prompt="generic" if kind == "dpo" else prompt, fewshots=fewshots,
                                 second_trial=second_trial)
        dataset = to_trl_dataset(rows) if rows else empty_training_set(kind)
        with atomic_directory(Path(out_dir) / name) as folder:
            dataset.save_to_disk(str(folder), num_shards=1)  # an empty set needs its one (empty) shard to load back
        sizes[name] = len(rows)
    return sizes


def empty_training_set(kind: str) -> datasets.Dataset:
    import datasets

    columns = TRAINING_COLUMNS[kind]
    return datasets.Dataset.from_dict({column: [] for column in columns}, features=training_features(columns))


# ---- released ReflectEvo files -------------------------------------------------------------------
RELEASED_FIELDS = {
    "d_plus": ("id", "question", "answer", "first_trial_reasoning", "first_trial_answer",
               "second_trial_reasoning", "second_trial_answer", "reflections"),
    "d_pm": ("id", "question", "answer", "first_trial_reasoning", "first_trial_answer",
             "second_trial_reasoning_chosen", "second_trial_answer_chosen", "reflection_chosen",
             "second_trial_reasoning_rejected", "second_trial_answer_rejected", "reflection_rejected"),
    "raw": ("id", "question", "answer", "output"),
}
RELEASED_FIELDS["d_pref"] = RELEASED_FIELDS["d_pm"]
# Field names that drifted between the README, the training scripts and the example files (method.md §3, §8.1.6).
ALIASES = {"second_trial_reasoning": "second_reason", "reflections": "reflection", "reflect_prompt": "reflection_prompt"}
OPTIONS_LINE = re.compile(r"^Options:\s*$", re.MULTILINE)
# A LogiQA option line: "A." to "D." at the start of a line (four official rows write "A text")
LOGIQA_OPTION_LINE = re.compile(r"^[ \t]*([A-D])(?:[.?]|[ \t])", re.MULTILINE)
_NON_SPACE = re.compile(r"\S")


def read_json_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, object)`` for JSON objects written one per line or pretty-printed one after another."""
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"data file not found: {path}")
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a byte-order mark (here, not in the codec: error offsets stay right)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{bad_line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None
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
            raise DataError(f"{path}:{line}: a number too long to read (more than {sys.get_int_max_str_digits()} digits)") from None
        except RecursionError:
            raise DataError(f"{path}:{line}: lists or objects nested too deeply to read") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
        if "\\u" in text[found.start():end]:
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
    raise DataError(f"{where or path}: cannot tell which ReflectEvo file this is from its fields {sorted(row)}; pass kind= "
                    f"(one of {', '.join(RELEASED_KINDS)})")


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
            raise DataError(f"{where}: missing field {name!r}{alias}; a {kind} row needs {list(RELEASED_FIELDS[kind])}, "
                            f"this one has {sorted(row)}")


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
    head = {"id": scalar_field(row, "id", where), "question": text_field(row, "question", where),
            "answer": scalar_field(row, "answer", where), "first_trial_reasoning": first,
            "first_trial_answer": scalar_field(row, "first_trial_answer", where)}
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
            "task": named["task"], "instruction": None, "sample": None, "grader": None,
            "first_trial_feedback": feedback, "first_trial_attempt": attempt,
            "second_trial_attempt": split_scratchpad(second)[0],
            "source": RELEASED, "task_inferred": named["task_inferred"],
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
        "task": named["task"], "instruction_chosen": None, "sample_chosen": None,
        "instruction_rejected": None, "sample_rejected": None, "grader": None,
        "first_trial_feedback": feedback, "first_trial_attempt": attempt,
        "source": RELEASED, "task_inferred": named["task_inferred"],
    }
    if kind == "d_pref":
        # the paper's judge and its verdicts were not released
        out.update({"judge": row.get("judge"), "judge_version": row.get("judge_version"), "verdicts": row.get("verdicts")})
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
    converted = [released_output(output, index, named["task"], item_id, f"{where}: output[{index}]")
                 for index, output in enumerate(outputs)]
    out = {"task": named["task"], "id": item_id, "question": record["question"], "answer": scalar_field(record, "answer", where)}
    if isinstance(record.get("test_list"), list):
        out["test_list"] = record["test_list"]
    out.update({"protocol": "oracle", "grader": None, "source": RELEASED, "task_inferred": named["task_inferred"],
                "output": converted})
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
