"""Evaluation metrics on small hand-made predictions: counts and rates per protocol, bootstrap
intervals (determinism, paired delta, stratified overall row), exact McNemar values, paired verdicts,
transition matrices, breakdowns, and the paper-table layout and numbers."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest

from reflectevo.evaluation.metrics import (
    CI_COLUMNS,
    COUNT_COLUMNS,
    FRAME_COLUMNS,
    PAPER_RESULTS,
    breakdown,
    compare_variants,
    format_cell,
    format_shares,
    mcnemar,
    paired_comparison,
    paper_reference,
    paper_table,
    prediction_frame,
    summarize,
    transition_matrix,
)
from reflectevo.tasks import OUTCOMES


def prediction(
    variant: str,
    task: str,
    item_id: str,
    t1: str | dict[str, str],
    final: str | dict[str, str] | None,
    *,
    protocol: str = "oracle",
    reflected: bool | None = None,
    breakdown: dict[str, Any] | None = None,
    graders: tuple[str, ...] = ("official",),
) -> dict[str, Any]:
    """One predictions.jsonl row (eval_spec.md); an outcome given as a string is the same for every grader."""
    t1 = t1 if isinstance(t1, dict) else dict.fromkeys(graders, t1)
    final = final if final is None or isinstance(final, dict) else dict.fromkeys(graders, final)
    if reflected is None:
        reflected = final is not None and t1[graders[0]] != "correct"
    second = None
    if reflected and final is not None:
        second = {"text": "Action: Finish[x]", **{g: {"outcome": final[g], "extracted": "x"} for g in graders}}
    return {
        "variant": variant,
        "protocol": protocol,
        "task": task,
        "id": item_id,
        "question": "q?",
        "gold": "x",
        "breakdown": breakdown or {},
        "roles": {
            "first_turn": "base",
            "reflector": None if final is None else variant,
            "second_turn": None if final is None else "base",
        },
        "t1": {"text": "Action: Finish[y]", **{g: {"outcome": t1[g], "extracted": "y"} for g in graders}},
        "reflected": reflected,
        "gate": {"by": "grader", "self_verify_text": None, "self_verdict": None},
        "reflection": "I was wrong." if reflected else None,
        "t2": second,
        "final": final,
    }


def rows(variant: str, task: str, pairs: list[tuple[str, str | None]], **options: Any) -> list[dict[str, Any]]:
    """Predictions for items ``<task>-0``, ``<task>-1``, ... from (t1, final) outcome pairs."""
    return [prediction(variant, task, f"{task}-{i}", t1, final, **options) for i, (t1, final) in enumerate(pairs)]


def outcomes(correct: int, total: int) -> list[str]:
    return ["correct"] * correct + ["wrong"] * (total - correct)


def one(summary: Any, **key: Any) -> Any:
    selected = summary
    for name, value in key.items():
        selected = selected[selected[name] == value]
    assert len(selected) == 1, key
    return selected.iloc[0]


# Ten LogiQA items, four right at t1 (ids 0-3); id 4 unparseable and id 5 timed out at t1.
FIRST = ["correct", "correct", "correct", "correct", "parse_failure", "timeout", "wrong", "wrong", "wrong", "wrong"]
ORACLE_FINAL = ["correct"] * 4 + ["correct", "correct", "correct", "parse_failure", "wrong", "wrong"]
FREE_FINAL = [
    "correct",
    "correct",
    "wrong",
    "timeout",
    "correct",
    "correct",
    "correct",
    "wrong",
    "parse_failure",
    "parse_failure",
]


@pytest.fixture()
def protocols_frame() -> Any:
    oracle = rows("base", "logiqa", list(zip(FIRST, ORACLE_FINAL)))
    free = rows("base", "logiqa", list(zip(FIRST, FREE_FINAL)), protocol="oracle_free", reflected=True)
    return prediction_frame(oracle + free)


# ---- prediction_frame -----------------------------------------------------------------------------
def test_prediction_frame_one_row_per_grader_with_breakdown_and_missing_t2():
    predictions = [
        prediction(
            "base",
            "math",
            "m1",
            {"official": "wrong", "robust": "correct"},
            {"official": "correct", "robust": "correct"},
            graders=("official", "robust"),
            breakdown={"level": "Level 3", "subject": "Algebra"},
        ),
        prediction(
            "sft/qa_pairs",
            "bigbench",
            "b1",
            "correct",
            None,
            graders=("official", "robust"),
            breakdown={"answer_type": "choice"},
        ),
    ]
    frame = prediction_frame(predictions)
    assert list(frame.columns) == FRAME_COLUMNS
    assert list(frame["grader"]) == ["official", "robust", "official", "robust"]
    assert list(frame["t1"]) == ["wrong", "correct", "correct", "correct"]
    assert list(frame["t2"][:2]) == ["correct", "correct"] and frame["t2"][2] is None and frame["t2"][3] is None
    assert list(frame["reflected"]) == [True, True, False, False]
    assert frame["level"][0] == "Level 3" and frame["subject"][1] == "Algebra" and frame["answer_type"][0] is None
    assert frame["answer_type"][2] == "choice" and frame["subject"][2] is None
    assert list(prediction_frame(predictions, graders=["robust"])["grader"]) == ["robust", "robust"]


def test_prediction_frame_rejects_a_row_missing_t1_naming_it():
    bad = prediction("sft/one_stage", "mbpp", "q7", "wrong", "correct")
    del bad["t1"]
    with pytest.raises(ValueError, match=r"variant 'sft/one_stage', task 'mbpp', id 'q7'.*t1"):
        prediction_frame([prediction("base", "mbpp", "q1", "wrong", "wrong"), bad])


def test_prediction_frame_rejects_a_missing_grader_and_unknown_outcomes():
    both = prediction("base", "logiqa", "a", "wrong", "wrong", graders=("official", "robust"))
    only_official = prediction("base", "logiqa", "b", "wrong", "wrong")
    with pytest.raises(ValueError, match=r"id 'b'.*'robust'"):
        prediction_frame([both, only_official])
    strange = prediction("base", "logiqa", "c", "maybe", "wrong")
    with pytest.raises(ValueError, match=r"id 'c'.*'maybe'"):
        prediction_frame([strange])


# ---- counts, rates, protocols ---------------------------------------------------------------------
def test_oracle_and_oracle_free_counts_on_the_same_items(protocols_frame):
    summary = summarize(protocols_frame, bootstrap_samples=0)
    assert list(summary.columns) == ["variant", "protocol", "grader", "task", *COUNT_COLUMNS, *CI_COLUMNS]
    oracle = one(summary, protocol="oracle", task="logiqa")
    assert oracle["n"] == 10 and oracle["reflected"] == 6
    assert oracle["acc_t1"] == pytest.approx(0.4) and oracle["acc_t2"] == pytest.approx(0.7)
    assert oracle["delta"] == pytest.approx(0.3)
    assert oracle["wrong_to_right"] == 3 and oracle["right_to_wrong"] == 0
    assert oracle["parse_failures_t1"] == pytest.approx(0.1) and oracle["parse_failures_t2"] == pytest.approx(0.1)
    assert oracle["timeouts_t1"] == 1 and oracle["timeouts_t2"] == 0

    free = one(summary, protocol="oracle_free", task="logiqa")
    assert free["n"] == 10 and free["reflected"] == 10
    assert free["acc_t1"] == pytest.approx(0.4) and free["acc_t2"] == pytest.approx(0.5)
    assert free["delta"] == pytest.approx(0.1)
    assert free["wrong_to_right"] == 3 and free["right_to_wrong"] == 2
    assert free["parse_failures_t1"] == pytest.approx(0.1) and free["parse_failures_t2"] == pytest.approx(0.2)
    assert free["timeouts_t1"] == 1 and free["timeouts_t2"] == 1
    assert all(math.isnan(free[column]) for column in CI_COLUMNS)
    # one task only: the overall row repeats it
    overall = one(summary, protocol="oracle_free", task="overall")
    assert overall["n"] == 10 and overall["acc_t2"] == pytest.approx(0.5)


def test_transition_matrix_counts(protocols_frame):
    table = transition_matrix(protocols_frame[protocols_frame["protocol"] == "oracle_free"])
    assert list(table.index) == list(OUTCOMES) and list(table.columns) == list(OUTCOMES)
    expected = {
        ("correct", "correct"): 2,
        ("correct", "wrong"): 1,
        ("correct", "timeout"): 1,
        ("parse_failure", "correct"): 1,
        ("timeout", "correct"): 1,
        ("wrong", "correct"): 1,
        ("wrong", "wrong"): 1,
        ("wrong", "parse_failure"): 2,
    }
    for t1 in OUTCOMES:
        for t2 in OUTCOMES:
            assert table.loc[t1, t2] == expected.get((t1, t2), 0), (t1, t2)
    oracle = transition_matrix(protocols_frame[protocols_frame["protocol"] == "oracle"])
    assert oracle.loc["correct"].sum() == oracle.loc["correct", "correct"] == 4  # never un-corrected
    assert int(oracle.to_numpy().sum()) == 10


def test_variant_without_second_turn_has_nan_t2_metrics():
    frame = prediction_frame(rows("sft/qa_pairs", "logiqa", [(o, None) for o in outcomes(3, 8)]))
    row = one(summarize(frame, bootstrap_samples=200), task="logiqa")
    assert row["n"] == 8 and row["acc_t1"] == pytest.approx(3 / 8)
    for column in (
        "acc_t2",
        "delta",
        "wrong_to_right",
        "right_to_wrong",
        "parse_failures_t2",
        "timeouts_t2",
        "acc_t2_low",
        "acc_t2_high",
        "delta_low",
        "delta_high",
    ):
        assert math.isnan(row[column]), column
    assert row["acc_t1_low"] <= 3 / 8 <= row["acc_t1_high"]
    assert transition_matrix(frame).to_numpy().sum() == 0


# ---- bootstrap intervals --------------------------------------------------------------------------
def mixed_frame(n: int, correct_t1: int, correct_t2: int, task: str = "logiqa", variant: str = "base") -> Any:
    pairs = [("correct" if i < correct_t1 else "wrong", "correct" if i < correct_t2 else "wrong") for i in range(n)]
    return prediction_frame(rows(variant, task, pairs))


def test_interval_contains_the_estimate_and_is_deterministic_per_seed():
    frame = mixed_frame(200, 70, 110)
    first = one(summarize(frame, seed=1), task="logiqa")
    for name in ("acc_t1", "acc_t2", "delta"):
        assert first[f"{name}_low"] <= first[name] <= first[f"{name}_high"]
        assert first[f"{name}_low"] < first[f"{name}_high"]
    again = one(summarize(frame, seed=1), task="logiqa")
    other = one(summarize(frame, seed=2), task="logiqa")
    assert [again[c] for c in CI_COLUMNS] == [first[c] for c in CI_COLUMNS]
    assert [other[c] for c in CI_COLUMNS] != [first[c] for c in CI_COLUMNS]


def test_all_correct_gives_a_degenerate_interval_and_zero_samples_gives_nan():
    frame = prediction_frame(rows("base", "mbpp", [("correct", "correct")] * 12))
    row = one(summarize(frame), task="mbpp")
    assert (row["acc_t1_low"], row["acc_t1_high"]) == (1.0, 1.0)
    assert (row["acc_t2_low"], row["acc_t2_high"]) == (1.0, 1.0)
    assert (row["delta_low"], row["delta_high"]) == (0.0, 0.0)
    none = one(summarize(frame, bootstrap_samples=0), task="mbpp")
    assert all(math.isnan(none[c]) for c in CI_COLUMNS)


def test_interval_narrows_as_n_grows():
    small = one(summarize(mixed_frame(20, 10, 10)), task="logiqa")
    large = one(summarize(mixed_frame(2000, 1000, 1000)), task="logiqa")
    assert small["acc_t1"] == large["acc_t1"] == 0.5
    assert large["acc_t1_high"] - large["acc_t1_low"] < (small["acc_t1_high"] - small["acc_t1_low"]) / 3


def test_delta_interval_is_paired():
    # the second turn changes nothing: every paired draw has delta 0, however uncertain each accuracy is
    row = one(summarize(mixed_frame(100, 40, 40)), task="logiqa")
    assert row["acc_t1_high"] - row["acc_t1_low"] > 0.1
    assert (row["delta_low"], row["delta_high"]) == (0.0, 0.0)


def test_overall_row_pools_tasks_with_a_stratified_bootstrap():
    frame = prediction_frame(
        rows("base", "logiqa", [("correct", "correct")] * 30)
        + rows("base", "mbpp", [("wrong", "wrong")] * 50)
        + rows("base", "math", [("wrong", "correct")] * 20)
    )
    summary = summarize(frame)
    assert list(summary["task"]) == ["logiqa", "mbpp", "math", "overall"]
    overall = one(summary, task="overall")
    assert overall["n"] == summary[summary["task"] != "overall"]["n"].sum() == 100
    assert overall["acc_t1"] == pytest.approx(0.3) and overall["acc_t2"] == pytest.approx(0.5)
    assert overall["wrong_to_right"] == 20
    # resampling within each task keeps every draw's task mix, and each task is all-or-nothing
    assert (overall["acc_t1_low"], overall["acc_t1_high"]) == pytest.approx((0.3, 0.3))
    assert (overall["acc_t2_low"], overall["acc_t2_high"]) == pytest.approx((0.5, 0.5))
    assert len(summarize(frame, overall=False)) == 3
    assert list(summarize(frame, by=("variant", "grader"))["n"]) == [100]


# ---- McNemar and paired comparisons ---------------------------------------------------------------
def paired(a_only: int, b_only: int, both: int = 5, neither: int = 5) -> tuple[list[bool], list[bool]]:
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return a, b


@pytest.mark.parametrize(
    ("a_only", "b_only", "p_value"),
    [
        (10, 0, 2 * 0.5**10),
        (0, 10, 2 * 0.5**10),
        (7, 7, 1.0),
        (0, 0, 1.0),
        (1, 4, 0.375),
        (4, 1, 0.375),
        (3, 9, 2 * (1 + 12 + 66 + 220) / 2**12),
    ],
)
def test_mcnemar_exact_values(a_only, b_only, p_value):
    result = mcnemar(*paired(a_only, b_only))
    assert result == {"n": a_only + b_only + 10, "a_only": a_only, "b_only": b_only, "p_value": pytest.approx(p_value)}


def test_mcnemar_needs_paired_lists():
    with pytest.raises(ValueError, match="paired"):
        mcnemar([True, False], [True])


@pytest.fixture()
def variants_frame() -> Any:
    """60 items over two tasks: base fixes 20, sft/one_stage 12 more, retry the same as base,
    sft/qa_pairs has no second turn."""
    predictions = []
    for variant, fixed in (("base", 20), ("retry", 20), ("sft/one_stage", 32)):
        pairs = [("correct" if i < 10 else "wrong", "correct" if i < 10 + fixed else "wrong") for i in range(60)]
        predictions += [
            prediction(variant, "logiqa" if i % 2 else "bigbench", f"q{i}", t1, final)
            for i, (t1, final) in enumerate(pairs)
        ]
    predictions += [
        prediction("sft/qa_pairs", "logiqa" if i % 2 else "bigbench", f"q{i}", "correct", None) for i in range(60)
    ]
    return prediction_frame(predictions)


def test_paired_comparison_verdicts(variants_frame):
    better = paired_comparison(variants_frame, "sft/one_stage", "base", protocol="oracle", grader="official")
    assert better["n"] == 60 and better["a_only"] == 12 and better["b_only"] == 0
    assert better["acc_a"] == pytest.approx(42 / 60) and better["acc_b"] == pytest.approx(30 / 60)
    assert better["difference"] == pytest.approx(0.2)
    assert 0 < better["difference_low"] <= 0.2 <= better["difference_high"]
    assert better["p_value"] == pytest.approx(2 * 0.5**12)
    assert better["verdict"].startswith("sft/one_stage beats base (")

    reversed_ = paired_comparison(variants_frame, "base", "sft/one_stage", protocol="oracle", grader="official")
    assert reversed_["difference"] == pytest.approx(-0.2) and reversed_["difference_high"] < 0
    assert reversed_["verdict"].startswith("sft/one_stage beats base (")

    same = paired_comparison(variants_frame, "retry", "base", protocol="oracle", grader="official")
    assert same["difference"] == 0 and same["p_value"] == 1.0
    assert same["verdict"].startswith("no difference shown between retry and base (")

    first_turn = paired_comparison(
        variants_frame, "sft/one_stage", "base", protocol="oracle", grader="official", metric="t1"
    )
    assert first_turn["difference"] == 0 and first_turn["verdict"].startswith("no difference shown")


def test_paired_comparison_small_difference_is_not_a_win(variants_frame):
    # within one task: 6 more fixed items out of 30 (p = 0.031) passes at 95% but not at 99%
    loose = paired_comparison(
        variants_frame, "sft/one_stage", "base", protocol="oracle", grader="official", task="logiqa"
    )
    strict = paired_comparison(
        variants_frame, "sft/one_stage", "base", protocol="oracle", grader="official", task="logiqa", confidence=0.99
    )
    assert loose["n"] == 30 and loose["a_only"] == 6 and loose["p_value"] == pytest.approx(2 * 0.5**6)
    assert loose["verdict"].startswith("sft/one_stage beats base")
    assert strict["verdict"].startswith("no difference shown between sft/one_stage and base")


def test_paired_comparison_errors(variants_frame):
    elsewhere = prediction_frame(rows("dpo/d_pm", "logiqa", [("wrong", "correct")] * 5))
    frame = pd.concat([variants_frame, elsewhere], ignore_index=True)
    with pytest.raises(ValueError, match="share no items"):
        paired_comparison(frame, "dpo/d_pm", "base", protocol="oracle", grader="official")
    with pytest.raises(ValueError, match="'dpo/d_pref' has no predictions"):
        paired_comparison(frame, "dpo/d_pref", "base", protocol="oracle", grader="official")
    with pytest.raises(ValueError, match="no second turn"):
        paired_comparison(frame, "sft/qa_pairs", "base", protocol="oracle", grader="official")
    assert paired_comparison(frame, "sft/qa_pairs", "base", protocol="oracle", grader="official", metric="t1")[
        "verdict"
    ].startswith("sft/qa_pairs beats base")


def test_compare_variants_rows(variants_frame):
    table = compare_variants(variants_frame, bootstrap_samples=200)
    assert list(table.columns[:5]) == ["variant", "reference", "protocol", "grader", "task"]
    assert list(zip(table["variant"], table["task"])) == [
        (variant, task) for variant in ("retry", "sft/one_stage") for task in ("overall", "bigbench", "logiqa")
    ]
    assert set(table["reference"]) == {"base"} and set(table["protocol"]) == {"oracle"}
    row = one(table, variant="sft/one_stage", task="overall")
    assert row["a_only"] == 12 and row["verdict"].startswith("sft/one_stage beats base")
    first_turn = compare_variants(variants_frame, metric="t1", bootstrap_samples=0)
    assert "sft/qa_pairs" in set(first_turn["variant"])
    with pytest.raises(ValueError, match="reference variant 'nope'"):
        compare_variants(variants_frame, reference="nope")


# ---- breakdown and the paper table ----------------------------------------------------------------
def test_breakdown_by_answer_type():
    choice = [
        prediction(
            "base",
            "bigbench",
            f"c{i}",
            "correct" if i < 3 else "wrong",
            "correct" if i < 5 else "wrong",
            breakdown={"answer_type": "choice"},
        )
        for i in range(6)
    ]
    free = [
        prediction(
            "base", "bigbench", f"f{i}", "wrong", "correct" if i < 1 else "wrong", breakdown={"answer_type": "free"}
        )
        for i in range(4)
    ]
    other = rows("base", "logiqa", [("correct", "correct")] * 5)
    table = breakdown(prediction_frame(choice + free + other), "answer_type", bootstrap_samples=0)
    assert list(table.columns[:5]) == ["variant", "protocol", "grader", "task", "answer_type"]
    assert list(table["answer_type"]) == ["choice", "free"] and "overall" not in set(table["task"])
    assert list(table["n"]) == [6, 4]
    assert list(table["acc_t1"]) == pytest.approx([0.5, 0.0]) and list(table["acc_t2"]) == pytest.approx([5 / 6, 0.25])
    assert list(table["wrong_to_right"]) == [2, 1]
    with pytest.raises(ValueError, match="no column 'difficulty'"):
        breakdown(prediction_frame(other), "difficulty")


def test_format_cell():
    assert format_cell(30.2, 38.8, 8.6) == "30.2 / 38.8 / +8.6"
    assert format_cell(46.6, None, None) == "46.6 / — / —"
    assert format_cell(40.0, 38.0, -2.0) == "40.0 / 38.0 / -2.0"
    assert format_cell(20.0, 20.0, -1e-12) == "20.0 / 20.0 / +0.0"
    assert format_cell(None, None, None) == "—"
    # from the shares summary.csv holds; NaN (pandas' empty cell) is not reported
    assert format_shares(0.302, 0.388, 0.086) == "30.2 / 38.8 / +8.6"
    assert format_shares(0.466, float("nan"), float("nan")) == "46.6 / — / —"
    assert format_shares(None, None, None) == "—"


def test_paper_table_layout_and_cells():
    predictions = (
        rows("base", "logiqa", list(zip(outcomes(3, 10), outcomes(5, 10))))
        + rows("adapter", "logiqa", list(zip(outcomes(3, 10), outcomes(3, 10))))
        + rows("sft/one_stage", "logiqa", list(zip(outcomes(3, 10), outcomes(2, 10))), reflected=True)
        + rows("sft/qa_pairs", "logiqa", [(o, None) for o in outcomes(4, 10)])
        + rows("base", "mbpp", list(zip(outcomes(1, 5), outcomes(1, 5))))
        + rows("base", "logiqa", list(zip(outcomes(1, 10), outcomes(1, 10))), protocol="oracle_free")
    )
    summary = summarize(prediction_frame(predictions), bootstrap_samples=0)
    table = paper_table(summary)
    assert list(table.index) == ["Prompt, w/ reflection", "SFT on QA pairs", "One-stage SFT w/ D+", "adapter"]
    assert list(table.columns) == ["logiqa", "mbpp", "overall"]
    assert table.loc["Prompt, w/ reflection", "logiqa"] == "30.0 / 50.0 / +20.0"
    assert table.loc["SFT on QA pairs", "logiqa"] == "40.0 / — / —"
    assert table.loc["One-stage SFT w/ D+", "logiqa"] == "30.0 / 20.0 / -10.0"
    assert table.loc["adapter", "logiqa"] == "30.0 / 30.0 / +0.0"
    assert table.loc["adapter", "mbpp"] == "—"
    assert table.loc["Prompt, w/ reflection", "overall"] == "26.7 / 40.0 / +13.3"
    assert list(paper_table(summary, tasks=["mbpp", "logiqa"]).columns) == ["mbpp", "logiqa", "overall"]
    assert paper_table(summary, protocol="oracle_free").loc["Prompt, w/ reflection", "logiqa"] == "10.0 / 10.0 / +0.0"
    with pytest.raises(ValueError, match="no summary rows for protocol 'self_verify'"):
        paper_table(summary, protocol="self_verify")


def test_paper_results_and_reference():
    llama = PAPER_RESULTS["meta-llama/Meta-Llama-3-8B-Instruct"]
    assert llama["sft/one_stage"]["bigbench"] == (38.2, 71.2, 33.0)
    assert PAPER_RESULTS["mistralai/Mistral-7B-Instruct-v0.2"]["sft/two_stage"]["bigbench"] == (36.6, 71.1, 34.5)
    for model in PAPER_RESULTS.values():  # each reported delta is t2 - t1 (a transcription check)
        assert len(model) == 7
        for cells in model.values():
            assert list(cells) == ["logiqa", "math", "mbpp", "bigbench"]
            for t1, t2, delta in cells.values():
                if t2 is not None:
                    assert t2 - t1 == pytest.approx(delta, abs=0.051)

    table = paper_reference("meta-llama/Meta-Llama-3-8B-Instruct")
    assert table.loc["One-stage SFT w/ D+", "bigbench"] == "38.2 / 71.2 / +33.0"
    assert table.loc["SFT on QA pairs", "math"] == "10.0 / — / —"
    assert table.loc["Prompt, w/o reflection", "logiqa"] == "30.2 / 38.8 / +8.6"
    for name in ("unsloth/llama-3-8b-Instruct", "/models/Meta-Llama-3-8B-Instruct/", "META-LLAMA-3-8B-INSTRUCT"):
        assert paper_reference(name).equals(table), name
    mistral = paper_reference("mistralai/Mistral-7B-Instruct-v0.2")
    assert mistral.loc["Two-stage SFT w/ D+", "math"] == "—"
    assert mistral.loc["DPO w/ Dpref", "mbpp"] == "20.4 / 22.6 / +2.2"
    for name in ("builtin:tiny", "meta-llama/Meta-Llama-3-70B-Instruct", "Qwen/Qwen2.5-7B-Instruct"):
        assert paper_reference(name) is None, name


def test_an_oracle_row_is_scored_by_the_grader_that_gated_it():
    """One question whose first answer only the robust grader accepts: the official run reflected on it and
    its second answer is wrong under both graders. Scored by the robust grader, that row would show a right
    answer turned wrong under the oracle; it is scored by the official grader only, and the robust run's row
    (not reflected) by the robust grader only."""
    both = ("official", "robust")
    official_run = prediction(
        "base",
        "logiqa",
        "q1",
        {"official": "wrong", "robust": "correct"},
        {"official": "wrong", "robust": "wrong"},
        reflected=True,
        graders=both,
    )
    robust_run = prediction(
        "base",
        "logiqa",
        "q1",
        {"official": "wrong", "robust": "correct"},
        {"official": "wrong", "robust": "correct"},
        reflected=False,
        graders=both,
    )
    official_run["gate_grader"], robust_run["gate_grader"] = "official", "robust"
    free = prediction(
        "base",
        "logiqa",
        "q1",
        {"official": "wrong", "robust": "correct"},
        {"official": "wrong", "robust": "wrong"},
        protocol="oracle_free",
        reflected=True,
        graders=both,
    )
    frame = prediction_frame([official_run, robust_run, free])
    scored = sorted(zip(frame["protocol"], frame["grader"], frame["t1"], frame["t2"]))
    assert scored == [
        ("oracle", "official", "wrong", "wrong"),
        ("oracle", "robust", "correct", "correct"),
        ("oracle_free", "official", "wrong", "wrong"),
        ("oracle_free", "robust", "correct", "wrong"),
    ]
    summary = summarize(frame, bootstrap_samples=0)
    assert (summary.loc[summary["protocol"] == "oracle", "right_to_wrong"] == 0).all()
    assert one(summary, protocol="oracle_free", grader="robust", task="overall")["right_to_wrong"] == 1
    # a row without gate_grader (a hand-made or older file) is scored by every grader, as before
    del official_run["gate_grader"]
    assert len(prediction_frame([official_run])) == 2
