"""Curation: hand-made raw records through every policy and edge case of D+, D± and Dpref, the counts
table, training rows, TRL datasets, and the released ReflectEvo example files.

Judges here are real :class:`EngineJudge` objects over a :class:`ReplayEngine` with scripted replies.
"""

from __future__ import annotations

import json

import pytest
from conftest import official_data_dir, skip_or_fail

from reflectevo import prompts
from reflectevo.core.jsonl import write_jsonl_atomic
from reflectevo.errors import DataError, JudgeError
from reflectevo.generation.engines import ReplayEngine
from reflectevo.reflection import curation, exports, released
from reflectevo.reflection.judges import EngineJudge
from reflectevo.tasks import get_task

INSTRUCTION_KEYS = list(prompts.INSTRUCTIONS)
FEEDBACK = {
    "correct": "Answer is CORRECT",
    "wrong": "Answer is INCORRECT",
    "parse_failure": "Invalid action. Answer with Finish[X].",
    "timeout": "Timed out",
}


def trial(outcome: str, task: str, qid: str, position: int) -> dict:
    """One output: position 0 is the first trial, position k > 0 the k-th reflection's second trial."""
    first = position == 0
    instruction = None if first else INSTRUCTION_KEYS[(position - 1) // 2]
    sample = None if first else (position - 1) % 2
    key = f"{task}/{qid}/t1" if first else f"{task}/{qid}/{instruction}/{sample}"
    answer = "" if outcome == "parse_failure" else ("B" if outcome == "correct" else "C")
    reasoning = f"Thought: attempt {position} on {qid}.\nAction: Finish[{answer}]"
    return {
        "trial": 1 if first else 2,
        "key": key,
        "instruction": instruction,
        "sample": sample,
        "reasoning": reasoning,
        "scratchpad": prompts.failed_trial(reasoning, FEEDBACK[outcome]),
        "generated_answer": answer,
        "is_correct": outcome == "correct",
        "outcome": outcome,
        "feedback": FEEDBACK[outcome],
        "error": None,
        "reflections": [] if first else [f"Reflection {position} on {qid}: check the premises."],
        "reason_input": f"attempt prompt of {key}",
        "reason_prompt": [f"<templated> attempt prompt of {key}"],
        "reflection_input": None if first else f"reflection prompt of {key}",
        "reflection_prompt": None if first else f"<templated> reflection prompt of {key}",
        "generation": {"attempt": [], "reflection": None},
    }


def record(qid: str, first: str, seconds: tuple[str, ...] = (), task: str = "logiqa") -> dict:
    outcomes = [first, *seconds]
    return {
        "task": task,
        "id": qid,
        "question": f"Question {qid}?\nA. yes\nB. no",
        "answer": "b",
        "protocol": "oracle",
        "grader": "official",
        "attempt_calls": 1,
        "second_trial_variant": "reflection",
        "fewshots": 0,
        "versions": {"task": "t", "prompts": prompts.PROMPT_VERSION, "reflection": prompts.REFLECTION_VERSION},
        "output": [trial(outcome, task, qid, position) for position, outcome in enumerate(outcomes)],
    }


@pytest.fixture
def records() -> list[dict]:
    return [
        record("none", "wrong", ("wrong", "wrong")),  # no positives
        record("allpos", "wrong", ("correct", "correct")),  # no negatives
        record("single", "wrong", ("correct",)),  # a single sample
        record("solved", "correct"),  # first trial correct: no reflections
        record("parse", "parse_failure", ("correct", "parse_failure", "timeout")),
        record("cart", "wrong", ("correct", "wrong", "correct", "wrong", "timeout"), task="math"),  # 2 pos x 3 neg
    ]


def rows_of(rows: list[dict], qid: str) -> list[dict]:
    return [row for row in rows if row["id"] == qid]


def replay_judge(texts: dict[str, str]) -> EngineJudge:
    return EngineJudge(
        ReplayEngine([{"key": key, "text": text, "prompt": f"<prompt of {key}>"} for key, text in texts.items()])
    )


def script(comparisons: list[curation.Comparison], *verdicts: str) -> dict[str, str]:
    """Replies for every request of every comparison, the same verdicts (one per order) for each."""
    return {
        request.key: f"Reasoning.\nVerdict: {verdict}"
        for comparison in comparisons
        for request, verdict in zip(comparison.requests, verdicts)
    }


# ---- D+ and D± -----------------------------------------------------------------------------------
D_PLUS_FIELDS = {
    "id",
    "question",
    "answer",
    "first_trial_reasoning",
    "first_trial_answer",
    "second_trial_reasoning",
    "second_trial_answer",
    "reflections",
    "reason_prompt",
    "reflect_prompt",
    "task",
    "instruction",
    "sample",
    "grader",
    "first_trial_feedback",
    "first_trial_attempt",
    "second_trial_attempt",
    "source",
}
D_PM_FIELDS = {
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
    "reason_prompt",
    "reflection_prompt",
    "task",
    "instruction_chosen",
    "sample_chosen",
    "instruction_rejected",
    "sample_rejected",
    "grader",
    "first_trial_feedback",
    "first_trial_attempt",
    "source",
}


def test_d_plus_has_one_row_per_successful_reflection(records):
    rows = curation.build_d_plus(records)
    assert [row["id"] for row in rows] == ["allpos", "allpos", "single", "parse", "cart", "cart"]
    assert all(set(row) == D_PLUS_FIELDS for row in rows)
    row = rows_of(rows, "single")[0]
    first, second = records[2]["output"]
    assert row["first_trial_reasoning"] == first["scratchpad"] and row["second_trial_reasoning"] == second["scratchpad"]
    assert row["first_trial_attempt"] == first["reasoning"] and row["second_trial_attempt"] == second["reasoning"]
    assert row["reflections"] == second["reflections"][0]
    assert row["reason_prompt"] == [first["reason_input"], second["reason_input"]]
    assert row["reflect_prompt"] == second["reflection_input"]
    assert (row["instruction"], row["sample"], row["source"], row["grader"]) == (
        INSTRUCTION_KEYS[0],
        0,
        "reflectevo",
        "official",
    )


def test_edge_cases_without_positives_negatives_or_reflections(records):
    d_plus, d_pm = curation.build_d_plus(records), curation.build_d_pm(records)
    assert rows_of(d_plus, "none") == [] and rows_of(d_pm, "none") == []  # no positives
    assert len(rows_of(d_plus, "allpos")) == 2 and rows_of(d_pm, "allpos") == []  # no negatives
    assert len(rows_of(d_plus, "single")) == 1 and rows_of(d_pm, "single") == []
    assert rows_of(d_plus, "solved") == [] and rows_of(d_pm, "solved") == []


def test_d_pm_is_the_cartesian_product_in_output_order(records):
    rows = rows_of(curation.build_d_pm(records), "cart")
    assert len(rows) == 6
    assert all(set(row) == D_PM_FIELDS for row in rows)
    # outputs 1, 3 are correct; 2, 4, 5 are not: chosen in output order, then rejected in output order
    pairs = [(row["reflection_chosen"].split()[1], row["reflection_rejected"].split()[1]) for row in rows]
    assert pairs == [("1", "2"), ("1", "4"), ("1", "5"), ("3", "2"), ("3", "4"), ("3", "5")]
    first = records[5]["output"][0]
    item = curation.record_item(records[5])
    assert rows[0]["reflection_prompt"] == prompts.reflection_prompt(
        item, first["reasoning"], first["feedback"], prompts.GENERIC_INSTRUCTION
    )
    assert rows[0]["reason_prompt"] == first["reason_input"]


def test_parse_failures_and_timeouts_of_the_second_trial_are_wrong_leading(records):
    rows = rows_of(curation.build_d_pm(records), "parse")
    assert [row["second_trial_answer_rejected"] for row in rows] == ["", "C"]
    assert [row["instruction_rejected"] for row in rows] == [INSTRUCTION_KEYS[0], INSTRUCTION_KEYS[1]]
    assert [row["sample_rejected"] for row in rows] == [1, 0]


# ---- Dpref ---------------------------------------------------------------------------------------
def test_plan_comparisons_pairs_successful_reflections_in_both_orders(records):
    comparisons = curation.plan_comparisons(records)
    assert [(c.id, c.orders) for c in comparisons] == [("allpos", ["ab", "ba"]), ("cart", ["ab", "ba"])]
    allpos = comparisons[0]
    base = f"logiqa/allpos/{INSTRUCTION_KEYS[0]}#0~{INSTRUCTION_KEYS[0]}#1"
    assert [r.key for r in allpos.requests] == [f"{base}/ab", f"{base}/ba"]
    first = records[1]["output"][0]
    item = curation.record_item(records[1])
    a, b = (output["reflections"][0] for output in records[1]["output"][1:])
    assert allpos.requests[0].messages == [
        {"role": "user", "content": prompts.judge_prompt(item, first["reasoning"], first["feedback"], a, b)}
    ]
    assert allpos.requests[1].messages[0]["content"] == prompts.judge_prompt(
        item, first["reasoning"], first["feedback"], b, a
    )


def test_consistent_verdicts_make_a_pair_and_every_request_is_recorded(records):
    comparisons = curation.plan_comparisons(records)
    # ab says B and ba says A: the second reflection wins in both orders
    result = curation.build_d_pref(records, replay_judge(script(comparisons, "B", "A")))
    assert result.outcomes == {"pair": 2, "tie": 0, "inconsistent": 0, "parse_failure": 0}
    row = result.rows[0]
    assert row["reflection_chosen"] == records[1]["output"][2]["reflections"][0]
    assert row["reflection_rejected"] == records[1]["output"][1]["reflections"][0]
    assert (row["judge"], row["judge_version"], row["verdicts"]) == ("self", prompts.JUDGE_VERSION, ["B", "A"])
    assert set(row) == D_PM_FIELDS | {"judge", "judge_version", "verdicts"}
    assert len(result.judgements) == 4
    judgement = result.judgements[1]
    assert judgement["order"] == "ba" and judgement["verdict"] == "A" and judgement["reply"].endswith("Verdict: A")
    assert judgement["prompt"] == f"<prompt of {judgement['key']}>"
    assert judgement["reflection_a"] == [INSTRUCTION_KEYS[0], 1] and judgement["reflection_b"] == [
        INSTRUCTION_KEYS[0],
        0,
    ]
    assert (judgement["judge"], judgement["judge_version"], judgement["task"], judgement["id"]) == (
        "self",
        prompts.JUDGE_VERSION,
        "logiqa",
        "allpos",
    )


def test_first_reflection_wins_when_ab_says_a_and_ba_says_b(records):
    comparisons = curation.plan_comparisons(records)
    result = curation.build_d_pref(records, replay_judge(script(comparisons, "A", "B")))
    assert result.rows[0]["reflection_chosen"] == records[1]["output"][1]["reflections"][0]


@pytest.mark.parametrize(
    ("verdicts", "outcome"),
    [
        (("tie", "tie"), "tie"),
        (("A", "tie"), "tie"),
        (("A", "A"), "inconsistent"),  # the judge prefers position A, not a reflection
        (("B", "B"), "inconsistent"),
    ],
)
def test_ties_and_position_bias_are_counted_not_kept(records, verdicts, outcome):
    comparisons = curation.plan_comparisons(records)
    result = curation.build_d_pref(records, replay_judge(script(comparisons, *verdicts)))
    assert result.rows == []
    assert result.outcomes[outcome] == 2 and sum(result.outcomes.values()) == 2
    assert all(judgement["pair_outcome"] == outcome for judgement in result.judgements)


def test_unparseable_replies_are_counted_as_parse_failures(records):
    comparisons = curation.plan_comparisons(records)
    texts = script(comparisons, "A", "B")
    texts[comparisons[0].requests[1].key] = "Both reflections are fine."
    result = curation.build_d_pref(records, replay_judge(texts))
    assert result.outcomes == {"pair": 1, "tie": 0, "inconsistent": 0, "parse_failure": 1}
    assert [row["id"] for row in result.rows] == ["cart"]
    assert result.judgements[1]["verdict"] is None


# An instruct model explains before its verdict line; with too small a budget it is cut off mid-sentence.
EXPLAINS_AT_LENGTH = (
    "Both reflections were written on the same failed attempt, so the question is which one finds the real mistake. "
    "Reflection A points at the step where the attempt misread the second premise and says to check every option "
    "against it, which is exactly where the attempt went wrong. Reflection B also mentions the premise, but its plan "
    "is vaguer: it tells the solver to be more careful without saying"
)
UNPARSED_COLUMNS = ["judge_unparsed_replies", "judge_unparsed_length", "judge_unparsed_stop", "judge_unparsed_other"]


def test_a_judge_cut_off_before_its_verdict_is_recorded_and_counted_by_finish_reason(records):
    comparisons = curation.plan_comparisons(records)
    cut, ended = comparisons[0].requests[1].key, comparisons[1].requests[0].key  # logiqa "ba", math "ab"
    rows = {
        key: {"key": key, "text": text, "finish_reason": "eos"} for key, text in script(comparisons, "A", "B").items()
    }
    rows[cut].update(text=EXPLAINS_AT_LENGTH, finish_reason="length")
    rows[ended].update(text="Reflection A is more precise about the premise.", finish_reason="eos")  # ended, no verdict
    result = curation.build_d_pref(records, EngineJudge(ReplayEngine(rows.values())))
    assert result.outcomes == {"pair": 0, "tie": 0, "inconsistent": 0, "parse_failure": 2} and result.rows == []
    judged = {judgement["key"]: judgement for judgement in result.judgements}
    assert (judged[cut]["verdict"], judged[cut]["finish_reason"], judged[cut]["reply"]) == (
        None,
        "length",
        EXPLAINS_AT_LENGTH,
    )
    assert (judged[ended]["verdict"], judged[ended]["finish_reason"]) == (None, "eos")
    assert judged[comparisons[0].requests[0].key]["finish_reason"] == "eos"  # every record has its finish reason
    table = curation.counts_table(records, curation.build_d_plus(records), curation.build_d_pm(records), result)
    assert table.loc["logiqa", UNPARSED_COLUMNS].tolist() == [1, 1, 0, 0]
    assert table.loc["math", UNPARSED_COLUMNS].tolist() == [1, 0, 1, 0]
    assert table.loc["all", ["judge_parse_failures", *UNPARSED_COLUMNS]].tolist() == [2, 2, 1, 1, 0]
    assert curation.counts_records(table)[-1]["judge_unparsed_length"] == 1  # as counts.json holds it


def test_the_judge_budget_fits_an_answer_that_explains_first():
    from reflectevo.config import JudgeParams, ReflectParams
    from reflectevo.reflection.judges import make_judge

    assert JudgeParams().max_new_tokens >= ReflectParams().max_new_tokens  # at least a reflection's budget
    judge = make_judge(JudgeParams(), engine=ReplayEngine([]))
    assert judge.settings.max_new_tokens == JudgeParams().max_new_tokens


def test_one_order_only(records):
    comparisons = curation.plan_comparisons(records, both_orders=False)
    assert all(c.orders == ["ab"] and len(c.requests) == 1 for c in comparisons)
    texts = {comparisons[0].requests[0].key: "Verdict: B", comparisons[1].requests[0].key: "Verdict: tie"}
    result = curation.build_d_pref(records, replay_judge(texts), both_orders=False)
    assert result.outcomes == {"pair": 1, "tie": 1, "inconsistent": 0, "parse_failure": 0}
    assert result.rows[0]["reflection_chosen"] == records[1]["output"][2]["reflections"][0]
    assert result.rows[0]["verdicts"] == ["B"]
    texts[comparisons[1].requests[0].key] = "no verdict"
    assert curation.build_d_pref(records, replay_judge(texts), both_orders=False).outcomes["parse_failure"] == 1


class CountingReplay(ReplayEngine):
    """A replay engine that counts its generate calls."""

    def __init__(self, rows):
        super().__init__(rows)
        self.calls = 0

    def generate(self, requests, settings, **options):
        self.calls += 1
        return super().generate(requests, settings, **options)


def test_the_judge_is_called_once_for_all_questions(records):
    engine = CountingReplay(
        [{"key": key, "text": text} for key, text in script(curation.plan_comparisons(records), "A", "B").items()]
    )
    curation.build_d_pref(records, EngineJudge(engine))
    assert engine.calls == 1


class ReversedJudge(EngineJudge):
    """A judge that breaks the protocol: its replies come back in reverse order."""

    def complete(self, requests):
        return list(reversed(super().complete(requests)))


def test_replies_out_of_order_are_an_error(records):
    texts = script(curation.plan_comparisons(records), "A", "B")
    judge = ReversedJudge(ReplayEngine([{"key": key, "text": text} for key, text in texts.items()]))
    with pytest.raises(JudgeError, match="one reply per request, in request order"):
        curation.build_d_pref(records, judge)


def test_max_pairs_per_question_is_a_seeded_stable_sample():
    many = record("many", "wrong", ("correct",) * 7)  # 21 pairs

    def keys(recs, seed=0):
        return [
            c.requests[0].key
            for c in curation.plan_comparisons(recs, max_pairs_per_question=5, seed=seed)
            if c.id == "many"
        ]

    chosen = keys([many])
    assert len(chosen) == 5
    assert (
        chosen == keys([many]) == keys([record("other", "wrong", ("correct",) * 4), many])
    )  # other questions change nothing
    positions = [
        (many["output"].index(c.first), many["output"].index(c.second))
        for c in curation.plan_comparisons([many], max_pairs_per_question=5)
    ]
    assert positions == sorted(positions) and all(i < j for i, j in positions)  # kept in output order
    assert any(keys([many], seed) != chosen for seed in (1, 2, 3))
    assert len(curation.plan_comparisons([many], max_pairs_per_question=21)) == 21
    with pytest.raises(ValueError, match="max_pairs_per_question"):
        curation.plan_comparisons([many], max_pairs_per_question=0)


# ---- counts and exports --------------------------------------------------------------------------
def test_outputs_cut_at_the_token_limit_are_counted_per_step(records):
    """A two-call attempt is cut when either call stopped at the limit; a reflection by its own call."""
    failed = next(r for r in records if r["task"] == "logiqa" and len(r["output"]) > 2)
    first, second, third = failed["output"][:3]
    first["generation"]["attempt"] = [{"finish_reason": "stop"}, {"finish_reason": "length"}]
    second["generation"].update(attempt=[{"finish_reason": "eos"}], reflection={"finish_reason": "length"})
    third["generation"].update(attempt=[{"finish_reason": "length"}], reflection={"finish_reason": "eos"})
    counts = curation.record_counts(failed)
    assert (counts["first_cut_at_limit"], counts["reflections_cut_at_limit"], counts["second_cut_at_limit"]) == (
        1,
        1,
        1,
    )
    table = curation.counts_table(records, [], [], None)
    assert table.loc["all", "reflections_cut_at_limit"] == 1 and table.loc["logiqa", "first_cut_at_limit"] == 1


def test_counts_table(records):
    d_plus, d_pm = curation.build_d_plus(records), curation.build_d_pm(records)
    d_pref = curation.build_d_pref(records, replay_judge(script(curation.plan_comparisons(records), "A", "A")))
    table = curation.counts_table(records, d_plus, d_pm, d_pref)
    assert list(table.index) == ["logiqa", "math", "all"]
    assert table.loc["logiqa"].to_dict() == {
        "questions": 5,
        "first_correct": 1,
        "first_wrong": 4,
        "first_parse_failures": 1,
        "first_cut_at_limit": 0,
        "reflections": 8,
        "reflections_cut_at_limit": 0,
        "second_correct": 4,
        "second_parse_failures": 1,
        "second_cut_at_limit": 0,
        "reflection_success_rate": 0.5,
        "questions_with_success": 3,
        "questions_with_pos_and_neg": 1,
        "d_plus": 4,
        "d_pm": 2,
        "d_pref": 0,
        "judge_pairs": 0,
        "judge_ties": 0,
        "judge_inconsistent": 1,
        "judge_parse_failures": 0,
        "judge_unparsed_replies": 0,
        "judge_unparsed_length": 0,
        "judge_unparsed_stop": 0,
        "judge_unparsed_other": 0,
    }
    everything = table.loc["all"]
    assert (everything["questions"], everything["reflections"], everything["second_correct"]) == (6, 13, 6)
    assert everything["reflection_success_rate"] == round(6 / 13, 4)
    assert (everything["d_plus"], everything["d_pm"], everything["judge_inconsistent"]) == (6, 8, 2)
    assert str(table["questions"].dtype) == "int64" and str(table["reflection_success_rate"].dtype) == "float64"
    without_judge = curation.counts_table(records, d_plus, d_pm, None)
    assert without_judge.loc["all", "judge_pairs"] == 0 and without_judge.loc["all", "d_pref"] == 0


def test_write_curated_round_trips_through_load_released(records, tmp_path):
    d_plus, d_pm = curation.build_d_plus(records), curation.build_d_pm(records)
    d_pref = curation.build_d_pref(records, replay_judge(script(curation.plan_comparisons(records), "B", "A")))
    paths = curation.write_curated(tmp_path, d_plus, d_pm, d_pref.rows, d_pref.judgements)
    assert sorted(path.name for path in paths.values()) == [
        "d_plus.jsonl",
        "d_pm.jsonl",
        "d_pref.jsonl",
        "judgements.jsonl",
    ]
    assert released.load_released(paths["d_plus"]) == d_plus
    assert released.load_released(paths["d_pm"]) == d_pm
    assert released.load_released(paths["d_pref"]) == d_pref.rows
    lines = paths["judgements"].read_text().splitlines()
    assert [json.loads(line) for line in lines] == d_pref.judgements
    raw = write_jsonl_atomic(tmp_path / "raw.jsonl", records)
    assert released.load_released(raw) == curation.read_records(raw) == records


# ---- validation ----------------------------------------------------------------------------------
def test_read_records_rejects_duplicates_and_malformed_records(records, tmp_path):
    path = write_jsonl_atomic(tmp_path / "raw.jsonl", [records[0], records[1], records[0]])
    with pytest.raises(DataError, match=r"raw\.jsonl:3: .*already appears on line 1"):
        curation.read_records(path)

    twice = record("twice", "wrong", ("correct", "wrong"))
    twice["output"][2]["sample"] = 0  # the same (instruction, sample) as output[1]
    with pytest.raises(DataError, match=r"raw\.jsonl:1: .*already appears"):
        curation.read_records(write_jsonl_atomic(tmp_path / "raw.jsonl", [twice]))

    def broken(change) -> str:
        bad = record("bad", "wrong", ("correct",))
        change(bad)
        write_jsonl_atomic(tmp_path / "raw.jsonl", [records[1], bad])
        with pytest.raises(DataError) as error:
            curation.read_records(tmp_path / "raw.jsonl")
        assert str(error.value).startswith(f"{tmp_path / 'raw.jsonl'}:2: ")
        return str(error.value)

    assert "missing field 'answer'" in broken(lambda r: r.pop("answer"))
    assert "output[0]: trial must be 1" in broken(lambda r: r["output"].reverse())
    assert "needs 'instruction'" in broken(lambda r: r["output"][1].update(instruction=None))
    assert "needs 'sample'" in broken(lambda r: r["output"][1].pop("sample"))
    assert "missing field 'scratchpad'" in broken(lambda r: r["output"][1].pop("scratchpad"))
    assert "contradicts" in broken(lambda r: r["output"][1].update(is_correct=False))
    assert "'output' is empty" in broken(lambda r: r.update(output=[]))


# ---- training rows -------------------------------------------------------------------------------
def test_training_rows_of_each_kind(records):
    d_plus = curation.build_d_plus(records)
    row = rows_of(d_plus, "single")[0]
    item = exports.row_item(row)
    attempt, feedback = row["first_trial_attempt"], row["first_trial_feedback"]

    reflection = exports.training_rows("reflection", [row])[0]
    assert reflection == {
        "task": "logiqa",
        "id": "single",
        "completion": row["reflections"],
        "prompt": prompts.reflection_prompt(item, attempt, feedback, prompts.GENERIC_INSTRUCTION),
    }
    assert exports.training_rows("reflection", [row], prompt="as_generated")[0]["prompt"] == row["reflect_prompt"]

    task = get_task("logiqa")
    one_stage = exports.training_rows("one_stage", [row])[0]
    assert one_stage["prompt"] == prompts.one_stage_prompt(task, item, attempt, feedback, prompts.GENERIC_INSTRUCTION)
    assert one_stage["completion"] == prompts.one_stage_completion(row["reflections"], row["second_trial_attempt"])
    assert prompts.split_one_stage(one_stage["completion"]) == (row["reflections"], row["second_trial_attempt"])
    generated = exports.training_rows("one_stage", [row], prompt="as_generated")[0]["prompt"]
    assert generated == prompts.one_stage_prompt(
        task, item, attempt, feedback, prompts.get_instruction(row["instruction"])
    )

    correction = exports.training_rows("correction", [row])[0]
    assert correction == {
        "task": "logiqa",
        "id": "single",
        "prompt": row["reason_prompt"][1],
        "completion": row["second_trial_attempt"],
    }
    assert "Observation" not in correction["completion"]

    pm = curation.build_d_pm(records)[0]
    dpo = exports.training_rows("dpo", [pm])[0]
    assert dpo == {
        "task": pm["task"],
        "id": pm["id"],
        "prompt": pm["reflection_prompt"],
        "chosen": pm["reflection_chosen"],
        "rejected": pm["reflection_rejected"],
    }


def test_training_rows_errors_and_empty_input(records):
    d_plus, d_pm = curation.build_d_plus(records), curation.build_d_pm(records)
    for kind in curation.TRAINING_KINDS:
        assert exports.training_rows(kind, []) == []
    with pytest.raises(ValueError, match="mix reflections generated under different instructions"):
        exports.training_rows("dpo", d_pm, prompt="as_generated")
    with pytest.raises(DataError, match="needs D\\+ rows"):
        exports.training_rows("reflection", d_pm)
    with pytest.raises(DataError, match="needs D± or Dpref rows"):
        exports.training_rows("dpo", d_plus)
    with pytest.raises(ValueError, match="unknown training kind"):
        exports.training_rows("sft", d_plus)
    with pytest.raises(ValueError, match="unknown prompt choice"):
        exports.training_rows("reflection", d_plus, prompt="demand")


def test_to_trl_dataset_makes_chat_messages(records):
    rows = exports.training_rows("reflection", curation.build_d_plus(records))
    dataset = exports.to_trl_dataset(rows)
    assert dataset.column_names == ["task", "id", "prompt", "completion"] and len(dataset) == len(rows)
    assert dataset[0]["prompt"] == [{"role": "user", "content": rows[0]["prompt"]}]
    assert dataset[0]["completion"] == [{"role": "assistant", "content": rows[0]["completion"]}]
    pairs = exports.to_trl_dataset(exports.training_rows("dpo", curation.build_d_pm(records)))
    assert pairs.column_names == ["task", "id", "prompt", "chosen", "rejected"]
    assert pairs[0]["rejected"][0]["role"] == "assistant"
    with pytest.raises(ValueError, match="different kinds"):
        exports.to_trl_dataset([rows[0], {"task": "x", "id": "1", "prompt": "p", "chosen": "c", "rejected": "r"}])


def test_qa_pair_rows_ask_the_first_trial_prompt_and_answer_the_gold():
    from reflectevo.prompts import attempt_prompt

    items = {name: get_task(name).load_samples("train")[:2] for name in ("logiqa", "mbpp")}
    rows = exports.qa_pair_rows(items)
    assert [(row["task"], row["id"]) for row in rows] == [
        (item.task, item.id) for part in items.values() for item in part
    ]
    logiqa = items["logiqa"][0]
    assert rows[0]["prompt"] == attempt_prompt(get_task("logiqa"), logiqa)
    assert rows[0]["completion"].endswith(f"Action: Finish[{logiqa.gold.upper()}]")
    for row, item in zip(rows, [*items["logiqa"], *items["mbpp"]], strict=True):  # the target grades correct
        task = get_task(item.task)
        if not task.needs_code_execution:
            assert task.grade(item, row["completion"]).correct


# ---- released ReflectEvo files -------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples():
    path = official_data_dir() / "examples"
    names = ["example_D+.jsonl", "example_D+-.jsonl", "example_Dpref.jsonl", "example_Reflection_raw.jsonl"]
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        skip_or_fail(
            f"released ReflectEvo example files not found in {path} (missing {', '.join(missing)}); "
            "set REFLECTEVO_OFFICIAL_DATA to the folder holding examples/"
        )
    return path


def test_load_released_d_plus(examples):
    rows = released.load_released(examples / "example_D+.jsonl")
    assert len(rows) == 5 and [row["id"] for row in rows] == ["1", "2", "3", "4", "5"]
    row = rows[0]
    assert set(row) == D_PLUS_FIELDS | {"task_inferred"}
    assert (row["source"], row["task"], row["task_inferred"], row["answer"]) == ("released", "bigbench", True, "b")
    assert (row["first_trial_answer"], row["second_trial_answer"]) == ("A", "B")
    assert row["first_trial_attempt"].startswith("Thought:") and row["first_trial_attempt"].endswith("Finish[A]")
    assert row["first_trial_feedback"] == "Answer is INCORRECT"
    assert row["second_trial_attempt"].endswith("Finish[B]") and "Observation" not in row["second_trial_attempt"]
    assert isinstance(row["reflections"], str) and row["reflections"].startswith("1. **Error Analysis:**")
    assert len(row["reason_prompt"]) == 2 and row["reflect_prompt"].startswith("Given the question")
    assert released.load_released(examples / "example_D+.jsonl", task="logiqa")[0]["task"] == "logiqa"


def test_released_correction_prompt_is_rebuilt_without_the_target(examples):
    row = released.load_released(examples / "example_D+.jsonl")[0]
    assert row["second_trial_reasoning"].strip() in row["reason_prompt"][1]  # the released prompt leaks the target
    task = get_task("bigbench")
    # rebuilt with the second-trial variant the evaluation shows: the reflection alone ...
    training = exports.training_rows("correction", [row], fewshots=2, second_trial="reflection")[0]
    assert row["second_trial_attempt"] not in training["prompt"]
    assert "Observation" not in training["prompt"] and "CORRECT" not in training["prompt"]
    assert training["prompt"] == prompts.second_trial_prompt(
        task, exports.row_item(row), row["reflections"], 2, previous=None
    )
    assert training["completion"] == row["second_trial_attempt"]
    # ... or also the failed first attempt with its verdict (the default, the paper's setting 2)
    both = exports.training_rows("correction", [row], fewshots=2)[0]
    assert both["prompt"] == prompts.second_trial_prompt(
        task,
        exports.row_item(row),
        row["reflections"],
        2,
        previous=(row["first_trial_attempt"], row["first_trial_feedback"]),
    )
    assert row["first_trial_attempt"] in both["prompt"] and row["second_trial_attempt"] not in both["prompt"]
    assert "Answer is CORRECT" not in both["prompt"]
    with pytest.raises(ValueError, match="unknown second_trial 'setting2'"):
        exports.training_rows("correction", [row], second_trial="setting2")


@pytest.mark.parametrize(("name", "kind"), [("example_D+-.jsonl", "d_pm"), ("example_Dpref.jsonl", "d_pref")])
def test_load_released_pairs(examples, name, kind):
    rows = released.load_released(examples / name)
    assert len(rows) == 5
    extra = {"judge", "judge_version", "verdicts"} if kind == "d_pref" else set()
    assert all(set(row) == D_PM_FIELDS | {"task_inferred"} | extra for row in rows)
    assert len({row["first_trial_reasoning"] for row in rows}) == 1  # the five pairs share one failed trial
    if kind == "d_pm":
        assert rows[0]["answer"] == "b" and rows[0]["second_trial_answer_chosen"] == "B"
        assert rows[0]["second_trial_answer_rejected"] == "D"
    else:
        assert rows[0]["answer"] == "a" and rows[0]["judge"] is None
        assert {row["second_trial_answer_rejected"] for row in rows} == {"A"}  # Dpref pairs two correct reflections
    dpo = exports.training_rows("dpo", rows)
    assert dpo[0]["prompt"].startswith(prompts.REFLECTION_INTRO) and dpo[0]["chosen"] == rows[0]["reflection_chosen"]


def test_load_released_raw_runs_through_curation(examples):
    records = released.load_released(examples / "example_Reflection_raw.jsonl")
    assert len(records) == 10 and records[0]["id"] == "2" and records[0]["task"] == "logiqa"
    first, second = records[0]["output"][:2]
    assert first["scratchpad"].endswith("Observation: Answer is INCORRECT") and first["reasoning"].endswith("Finish[B]")
    assert (first["trial"], second["trial"], second["sample"], second["instruction"]) == (1, 2, 0, None)
    assert records[8]["output"][0]["outcome"] == "parse_failure"  # an empty answer: the action could not be parsed
    # method.md §3.1: (correct, correct) x2, (correct, incorrect) x1, (incorrect, incorrect) x7
    assert len(curation.build_d_plus(records)) == 5
    assert len(curation.build_d_pm(records)) == 1
    assert len(curation.plan_comparisons(records)) == 2
    assert {row["source"] for row in curation.build_d_plus(records)} == {"released"}


def test_load_released_errors(tmp_path):
    bad = tmp_path / "d_plus.jsonl"
    bad.write_text(
        json.dumps(
            {
                "id": 1,
                "question": "q",
                "answer": "a",
                "first_trial_reasoning": "x",
                "first_trial_answer": "A",
                "second_trial_answer": "B",
                "reflections": "r",
            }
        )
        + "\n"
    )
    with pytest.raises(
        DataError, match=r"d_plus\.jsonl:1: missing field 'second_trial_reasoning' \(or 'second_reason'\)"
    ):
        released.load_released(bad)
    pretty = tmp_path / "raw.jsonl"
    pretty.write_text('{\n  "id": 1,\n  "question": "q",\n  "answer": "a",\n  "output": []\n}\n{\n  "id": 2\n}\n')
    with pytest.raises(DataError, match=r"raw\.jsonl:1: 'output' must be a non-empty list"):
        released.load_released(pretty)
    with pytest.raises(DataError, match="cannot tell which ReflectEvo file"):
        released.load_released(write_jsonl_atomic(tmp_path / "odd.jsonl", [{"id": 1}]))
    with pytest.raises(ValueError, match="unknown kind"):
        released.load_released(bad, kind="dplus")


def test_released_drift_is_tolerated(tmp_path):
    scratchpad = "\nThought: it is 2.\nAction: Finish<<<2>>>\nObservation: Answer is INCORRECT"
    row = {
        "id": 7,
        "question": "1+2?",
        "answer": "3",
        "first_trial_reasoning": scratchpad,
        "first_trial_answer": "2",
        "second_reason": "\nThought: it is 3.\nAction: Finish<<<3>>>\nObservation: Answer is CORRECT",
        "second_trial_answer": "3",
        "reflection": ["Add again."],
        "reflection_prompt": "reflect",
        "reason_prompt": "p1",
    }
    loaded = released.load_released(write_jsonl_atomic(tmp_path / "x.jsonl", [row]), kind="d_plus")[0]
    assert (loaded["id"], loaded["task"], loaded["reflections"], loaded["reflect_prompt"]) == (
        "7",
        "math",
        "Add again.",
        "reflect",
    )
    assert (
        loaded["reason_prompt"] == ["p1"]
        and loaded["second_trial_attempt"] == "Thought: it is 3.\nAction: Finish<<<3>>>"
    )
    raw = {
        "id": 3,
        "question": "q",
        "answer": "a",
        "output": [
            {
                "generated_answer": "B",
                "reflections": [],
                "reasoning": "\nThought: t\nAction: [BEGIN]x[END]\nObservation: fail",
                "is_correct": False,
                "trail": 1,
            },
            {
                "generated_answer": "A",
                "reflections": "fix it",
                "reasoning": "\nThought: u\nAction: [BEGIN]y[END]\nObservation: ok",
                "is_correct": True,
                "test_list": "",
                "trail": 2,
            },
        ],
    }
    record_ = released.load_released(write_jsonl_atomic(tmp_path / "r.jsonl", [raw]))[0]
    assert record_["task"] == "mbpp" and record_["output"][1]["reflections"] == ["fix it"]
    assert "test_list" not in record_ and "test_list" not in record_["output"][1]
    assert [row["reflections"] for row in curation.build_d_plus([record_])] == ["fix it"]


def test_released_task_is_inferred_from_the_question_shape(tmp_path):
    def d_plus_row(question: str, answer: str) -> dict:
        return {
            "id": 1,
            "question": question,
            "answer": answer,
            "first_trial_reasoning": "\nThought: \nA man lost it.\n\nAction: \nFinish[the man] \n\nObservation: Answer is INCORRECT",
            "first_trial_answer": "the man",
            "second_trial_answer": answer,
            "reflections": "Reread the story.",
            "second_trial_reasoning": f"\nThought: \nThe story names her.\n\nAction: \nFinish[{answer}] \n\nObservation: Answer is CORRECT",
        }

    # a free-text BIG-bench question: no options, a story line that starts with "A "
    free = d_plus_row(
        "A man and a girl walked home. The girl found the key.\n\nQuestion: Who found the key?", "the girl"
    )
    # LogiQA: options "A." to "D." without an "Options:" line; BIG-bench multiple choice: with one
    logiqa = d_plus_row("Passage.\nWhich must be true?\nA.Red wins.\nB.Blue wins.\nC.Nobody wins.\nD.Both win.", "b")
    choice = d_plus_row("Passage: p\nClaim: c\nOptions:\nA. True\nB. False\nC. Neither", "c")
    malformed = d_plus_row("Who won?\nA Shannan\nB Jiangnan\nC Shanbei\nD Jiangbei", "c")  # LogiQA row 441's shape
    rows = released.load_released(write_jsonl_atomic(tmp_path / "d_plus.jsonl", [free, logiqa, choice, malformed]))
    assert [(row["task"], row["task_inferred"]) for row in rows] == [
        ("bigbench", True),
        ("logiqa", True),
        ("bigbench", True),
        ("logiqa", True),
    ]
    named = released.load_released(tmp_path / "d_plus.jsonl", task="bigbench")
    assert {(row["task"], row["task_inferred"]) for row in named} == {("bigbench", False)}
