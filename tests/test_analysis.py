"""Notebook 06's analysis (reflectevo.analysis) and its figures (reflectevo.plots), on hand-made stage 02
records (built with the pipeline's own ``trial_output``) and hand-made stage 05 predictions."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # no display needed; the figures are only saved

import pandas as pd
import pytest

from reflectevo import plots
from reflectevo.analysis import report
from reflectevo.analysis import tables as analysis_tables
from reflectevo.core import markdown
from reflectevo.reflection.pipeline import Attempt, Trial, trial_output
from reflectevo.tasks import Item, Verdict


def words(text: str) -> int:
    return len(text.split())


def output(
    task: str,
    item_id: str,
    text: str,
    outcome: str,
    extracted: str | None,
    *,
    trial: int = 1,
    instruction: str | None = None,
    sample: int | None = None,
    reflection: str | None = None,
) -> dict:
    item = Item(task, item_id, "q", "gold")
    key = f"{task}/{item_id}/t1" if trial == 1 else f"{task}/{item_id}/{instruction}/{sample}"
    verdict = Verdict(outcome, "official", extracted, f"Answer is {outcome}")
    entry = trial_output(Trial(item, Attempt(key, "user", text, ["prompt"], []), verdict), trial, key)
    if trial == 2:
        entry.update(instruction=instruction, sample=sample, reflections=[reflection])
    return entry


def record(task: str, item_id: str, question: str, first: dict, *seconds: dict) -> dict:
    return {
        "task": task,
        "id": item_id,
        "question": question,
        "answer": "gold",
        "protocol": "oracle",
        "output": [first, *seconds],
    }


def second(
    task: str, item_id: str, text: str, correct: bool, reflection: str, instruction: str = "1-1-1", sample: int = 0
) -> dict:
    return output(
        task,
        item_id,
        text,
        "correct" if correct else "wrong",
        "x",
        trial=2,
        instruction=instruction,
        sample=sample,
        reflection=reflection,
    )


@pytest.fixture
def records() -> list[dict]:
    """logiqa: q1 failed (2 reflections, 1 success), q2 correct; math: q3 failed (1 reflection, wrong)."""
    return [
        record(
            "logiqa",
            "q1",
            "one two three four",  # 4 words
            output("logiqa", "q1", "Thought: cats bark.\nAction: Finish[B]", "wrong", "B"),  # 5 words
            second("logiqa", "q1", "Thought: no.\nAction: Finish[A]", True, "I chose B wrongly", "1-1-1", 0),
            second("logiqa", "q1", "Thought: still B here.\nAction: Finish[B]", False, "Check the premise", "2-3-4", 0),
        ),
        record("logiqa", "q2", "a b", output("logiqa", "q2", "Thought: ok.\nAction: Finish[C]", "correct", "C")),
        record(
            "math",
            "q3",
            "x y z w v u",  # 6 words
            output("math", "q3", "Thought: add them up.\nAction: Finish<<<12>>>", "wrong", "12"),  # 6 words
            second(
                "math", "q3", "Thought: redo.\nAction: Finish<<<13>>>", False, "The sum 12 was off by one", "4-1-2", 1
            ),
        ),
    ]


# ---- dataset statistics ------------------------------------------------------------------------------
def test_dataset_statistics_on_a_known_example(records):
    table = analysis_tables.dataset_statistics(records, words)
    assert list(table.columns) == ["logiqa", "math", "total"]
    assert list(table.index) == list(analysis_tables.STATISTICS_ROWS)
    assert table.loc["reflections generated"].tolist() == [2, 1, 3]
    assert table.loc["questions reflected on"].tolist() == [1, 1, 2]
    assert table.loc["% correct after reflection"].tolist() == [50.0, 0.0, 33.33]
    assert table.loc["avg question length"].tolist() == [4.0, 6.0, 5.0]  # reflected questions only
    assert table.loc["avg answer length, turn 1"].tolist() == [5.0, 6.0, 5.5]  # q2's correct attempt not counted
    assert table.loc["avg answer length, turn 2"].tolist() == [5.0, 4.0, round((4 + 6 + 4) / 3, 1)]
    assert table.loc["avg reflection length"].tolist() == [3.5, 7.0, round((4 + 3 + 7) / 3, 1)]


def test_dataset_statistics_of_no_records_is_a_table_not_a_crash():
    table = analysis_tables.dataset_statistics([], words)
    assert list(table.columns) == ["total"] and list(table.index) == list(analysis_tables.STATISTICS_ROWS)
    assert table.loc["reflections generated", "total"] == 0 and table.loc["questions reflected on", "total"] == 0
    assert all(math.isnan(table.loc[row, "total"]) for row in analysis_tables.STATISTICS_ROWS[2:])


# ---- error localisation proxy ------------------------------------------------------------------------
def test_a_reflection_repeating_the_actions_answer_names_it_and_points_at_the_action():
    first = output(
        "logiqa", "q", "Thought: The premise says cats are mammals.\nAction: Finish[Penguins]", "wrong", "Penguins"
    )
    rows = analysis_tables.error_localisation(
        [
            record(
                "logiqa",
                "q",
                "Q",
                first,
                second(
                    "logiqa", "q", "Thought: t.\nAction: Finish[Whales]", True, "I wrongly picked penguins; reconsider."
                ),
            )
        ]
    )
    row = rows.iloc[0]
    assert rows["names_wrong_answer"].tolist() == [True]
    assert row["line"] == "action" and bool(row["success"])
    assert row["overlap"] == pytest.approx(1 / 5)  # premise, says, cats, mammals, penguins
    assert row["position"] == pytest.approx(1.0)  # the last word of the attempt


def test_position_is_the_mean_relative_position_of_repeated_words():
    # tokens without the labels: alpha beta gamma delta Finish zeta -> positions i / 5
    first = output("logiqa", "q", "Thought: alpha beta gamma delta\nAction: Finish[zeta]", "wrong", "zeta")
    reflection = "Gamma was fine, but zeta, and also gamma again."
    rows = analysis_tables.error_localisation(
        [record("logiqa", "q", "Q", first, second("logiqa", "q", "t", False, reflection))]
    )
    row = rows.iloc[0]
    assert row["position"] == pytest.approx((2 / 5 + 5 / 5) / 2)
    assert row["overlap"] == pytest.approx(2 / 5)
    assert row["line"] == "action"  # one occurrence each: a tie counts as the action
    thought_heavy = second("logiqa", "q", "t", False, "alpha beta then zeta")
    row = analysis_tables.error_localisation([record("logiqa", "q", "Q", first, thought_heavy)]).iloc[0]
    assert row["line"] == "thought" and row["position"] == pytest.approx((0 + 1 / 5 + 1) / 3)


def test_no_overlap_parse_failures_and_code_tasks():
    first = output("logiqa", "q", "Thought: gibberish words only\nAction: nothing", "parse_failure", None)
    rows = analysis_tables.error_localisation(
        [
            record("logiqa", "q", "Q", first, second("logiqa", "q", "t", False, "Unrelated text entirely.")),
            record(
                "mbpp",
                "m",
                "Q",
                output(
                    "mbpp",
                    "m",
                    "Thought: loop.\nAction: [BEGIN]\ndef f(): return 1\n[END]",
                    "wrong",
                    "def f(): return 1",
                ),
                second("mbpp", "m", "t", False, "The loop in f returns 1 too early"),
            ),
        ]
    )
    assert rows["names_wrong_answer"].tolist() == [False, None] and rows.loc[0, "overlap"] == 0.0
    assert pd.isna(rows.loc[0, "position"]) and pd.isna(rows.loc[0, "line"])
    assert rows.loc[1, "line"] == "thought"  # "loop" is in the thought
    assert list(analysis_tables.error_localisation([]).columns) == analysis_tables.LOCALISATION_COLUMNS


def test_names_answer_needs_a_standalone_match():
    assert analysis_tables.names_answer("I chose B, which was wrong", "B")
    assert not analysis_tables.names_answer("But the text says otherwise", "B")
    assert not analysis_tables.names_answer("a careful reading", "A")  # one letter: case matters
    assert analysis_tables.names_answer("the answer 12 was off", "12")
    assert not analysis_tables.names_answer("the answer 125 or 12.5", "12")
    assert analysis_tables.names_answer("it is  \\frac{3}{4} here", "\\frac{3}{4}")
    assert analysis_tables.names_answer("RED  Wine was wrong", "red wine")


# ---- length frame ------------------------------------------------------------------------------------
def prediction(
    variant: str, protocol: str, task: str, item_id: str, t1: str, reflection: str | None = None, t2: str | None = None
) -> dict:
    grades = {"official": {"outcome": "wrong", "extracted": None}}
    return {
        "variant": variant,
        "protocol": protocol,
        "task": task,
        "id": item_id,
        "question": "q",
        "gold": "g",
        "t1": {"text": t1, **grades},
        "reflected": reflection is not None,
        "reflection": reflection,
        "t2": None if t2 is None else {"text": t2, **grades},
        "final": None if variant == "sft/qa_pairs" else {"official": "wrong"},
    }


def test_length_frame_rows(records):
    predictions = [
        prediction("base", "oracle", "logiqa", "e1", "one two three", "ref one", "a b c d"),
        prediction("base", "self_verify", "logiqa", "e1", "one two three"),  # same first answer: counted once
        prediction("sft/qa_pairs", "oracle", "math", "e2", "just one answer here"),
    ]
    frame = analysis_tables.length_frame(records, predictions, words)
    assert list(frame.columns) == analysis_tables.LENGTH_COLUMNS
    stage = frame[frame["source"] == "stage 02"]
    assert stage["kind"].value_counts().to_dict() == {"turn-1 answer": 3, "reflection": 3, "turn-2 answer": 3}
    base = frame[frame["source"] == "eval base"].sort_values("kind")
    assert base[["kind", "tokens"]].values.tolist() == [["reflection", 2], ["turn-1 answer", 3], ["turn-2 answer", 4]]
    assert frame[frame["source"] == "eval sft/qa_pairs"][["task", "kind", "tokens"]].values.tolist() == [
        ["math", "turn-1 answer", 4]
    ]
    only = analysis_tables.length_frame([], predictions, words, protocol="self_verify")
    assert only.values.tolist() == [["eval base", "logiqa", "turn-1 answer", 3]]
    assert analysis_tables.length_frame([], [], words).empty


# ---- figures ----------------------------------------------------------------------------------------
def summary_frame() -> pd.DataFrame:
    rows = []
    for protocol in ("oracle", "self_verify"):
        for variant, t2 in (("base", 0.1), ("sft/one_stage", 0.2), ("sft/qa_pairs", math.nan)):
            for task in ("logiqa", "math", "overall"):
                t1 = 0.4
                rows.append(
                    {
                        "variant": variant,
                        "protocol": protocol,
                        "grader": "official",
                        "task": task,
                        "n": 50,
                        "acc_t1": t1,
                        "acc_t2": t1 + t2,
                        "delta": t2,
                        "acc_t1_low": t1 - 0.05,
                        "acc_t1_high": t1 + 0.05,
                        "acc_t2_low": t1 + t2 - 0.1,
                        "acc_t2_high": t1 + t2 + 0.1,
                        "delta_low": t2 - 0.1,
                        "delta_high": t2 + 0.1,
                    }
                )
    return pd.DataFrame(rows)


def matrices() -> dict[str, pd.DataFrame]:
    outcomes = ["correct", "wrong", "parse_failure", "timeout"]
    counts = pd.DataFrame([[5, 0, 0, 0], [3, 10, 1, 0], [1, 2, 3, 0], [0, 0, 0, 0]], index=outcomes, columns=outcomes)
    return {f"variant {i}": counts + i for i in range(4)}


def is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def drawings(records):
    return {
        "06_accuracy_by_task": (plots.accuracy_by_task, summary_frame()),
        "06_transitions": (plots.transition_heatmap, matrices()),
        "06_length_distributions": (
            plots.length_distributions,
            analysis_tables.length_frame(
                records, [prediction("base", "oracle", "logiqa", "e1", "one two three", "ref one", "a b c d")], words
            ),
        ),
        "06_error_localisation": (plots.error_localisation, analysis_tables.error_localisation(records)),
    }


def test_each_figure_saves_a_png_and_has_a_note(tmp_path, records):
    for stem, (draw, data) in drawings(records).items():
        path = tmp_path / f"{stem}.png"
        plots.close(draw(data, path, dpi=60))
        assert is_png(path), stem
        assert report.note_for(stem), stem
        assert draw.__doc__ and draw.__doc__.strip()
    plots.close(
        plots.accuracy_by_task(summary_frame(), tmp_path / "one.png", dpi=60, protocol="oracle", grader="official")
    )
    assert is_png(tmp_path / "one.png")


def test_figures_cope_with_empty_and_all_nan_inputs(tmp_path):
    nan_summary = summary_frame().assign(acc_t1=math.nan, acc_t2=math.nan)
    nan_matrix = {"nothing": pd.DataFrame(math.nan, index=range(4), columns=range(4)), "empty": pd.DataFrame()}
    nan_lengths = pd.DataFrame({"source": ["stage 02"], "task": ["math"], "kind": ["reflection"], "tokens": [math.nan]})
    nan_table = pd.DataFrame(
        {
            "task": ["math"],
            "id": ["1"],
            "instruction": ["1-1-1"],
            "sample": [0],
            "success": [False],
            "names_wrong_answer": [None],
            "overlap": [None],
            "position": [None],
            "line": [None],
        }
    )
    cases = [
        (plots.accuracy_by_task, pd.DataFrame()),
        (plots.accuracy_by_task, summary_frame().iloc[0:0]),
        (plots.accuracy_by_task, nan_summary),
        (plots.transition_heatmap, {}),
        (plots.transition_heatmap, nan_matrix),
        (plots.length_distributions, pd.DataFrame()),
        (plots.length_distributions, analysis_tables.length_frame([], [], words)),
        (plots.length_distributions, nan_lengths),
        (plots.error_localisation, analysis_tables.error_localisation([])),
        (plots.error_localisation, pd.DataFrame()),
        (plots.error_localisation, nan_table),
    ]
    for index, (draw, data) in enumerate(cases):
        path = tmp_path / f"empty_{index}.png"
        plots.close(draw(data, path, dpi=60))
        assert is_png(path), (draw.__name__, index)
    plots.close(plots.accuracy_by_task(summary_frame(), protocol="always_reflect"))


# ---- report -----------------------------------------------------------------------------------------
def test_write_report_renders_tables_figures_and_notes(tmp_path, records):
    run_dir = tmp_path / "run"
    figure = run_dir / "figures" / "06_accuracy_by_task.png"
    plots.close(plots.accuracy_by_task(summary_frame(), figure, dpi=60))
    stats = analysis_tables.dataset_statistics(records, words)
    path = report.write_report(
        run_dir,
        title="Run report",
        sections=[
            ("Data", ["Counts in tokens of `str.split`.", stats]),
            ("Evaluation", [figure, summary_frame().head(2)]),
        ],
    )
    assert path == run_dir / "report.md"
    text = path.read_text()
    assert text.startswith("# Run report\n") and "## Data" in text and "## Evaluation" in text
    assert "| feature | logiqa | math | total |" in text.splitlines()
    assert "| % correct after reflection | 50 | 0 | 33.33 |" in text.splitlines()
    assert "| variant | protocol | grader | task | n | acc_t1 |" in text  # a RangeIndex is not a column
    assert "![06_accuracy_by_task](figures/06_accuracy_by_task.png)" in text
    assert report.figure_notes["06_accuracy_by_task"] in text
    assert "figure file missing" not in text
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    with pytest.raises(TypeError):
        report.write_report(run_dir, title="t", sections=[("s", [42])])


def test_markdown_table_escapes_and_formats():
    frame = pd.DataFrame({"a": [1.0, math.nan, 0.123456], "b": ["x|y", None, "two\nlines"]})
    lines = markdown.markdown_table(frame).splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "|---|---|"
    assert lines[2:] == ["| 1 | x\\|y |", "|  |  |", "| 0.1235 | two lines |"]
    assert "(no rows)" in markdown.markdown_table(frame.iloc[0:0])


def test_provenance_names_everything_that_produced_the_numbers():
    from reflectevo.analysis.report import provenance

    record = {
        "split": "test",
        "items": {"logiqa": 500},
        "protocols": ["oracle", "oracle_free"],
        "graders": ["official", "robust"],
        "oracle_graders": ["official", "robust"],
        "attempt_calls": 2,
        "second_trial": "reflection_and_attempt",
        "fewshots": 3,
        "versions": {"review": "review-1", "tasks": {"logiqa": "2"}},
        "seed": 7,
        "bootstrap_samples": 1000,
        "confidence": 0.95,
        "allowed_mismatches": {"fewshots": "reflect.fewshots is 0, eval.fewshots is 3"},
    }
    text = provenance(record, "meta-llama/Meta-Llama-3-8B-Instruct")
    for part in (
        "logiqa: 500",
        "oracle, oracle_free",
        "gated and scored by it: official, robust",
        "2 call(s) per attempt",
        "review-1",
        "'logiqa': '2'",
        "seed 7",
        "95% intervals",
        "Meta-Llama-3-8B-Instruct",
        "differ on purpose in: reflect.fewshots is 0, eval.fewshots is 3",
    ):
        assert part in text
    older = {**record, "gate_grader": "official"}
    del older["oracle_graders"], older["allowed_mismatches"]
    assert "the oracle gated by official only" in provenance(older, "m")


def test_the_report_names_skipped_variants_small_splits_and_how_outputs_ended():
    manifest = {
        "stages": {
            "03_sft": {"status": "done", "skipped": {"two_stage": "training set sft_reflection is empty: ..."}},
            "04_dpo": {"status": "done", "skipped": {}},
        }
    }
    note = report.training_note(manifest)
    assert "`sft/two_stage`: training set sft_reflection is empty" in note and "not evaluated" in note
    assert report.training_note({"stages": {"03_sft": {"status": "done"}}}) == (
        "Every variant the params name was trained."
    )
    assert "Too few test items" in report.size_note({"items": {"logiqa": 3, "math": 40}})
    assert report.size_note({"items": {"logiqa": 30, "math": 40}}) is None
    cut = {
        "variant": "base",
        "protocol": "oracle",
        "task": "logiqa",
        "id": "1",
        "reflection": "r",
        "reflection_finish_reason": "length",
        "t1": {"finish_reason": "eos"},
        "t2": {"finish_reason": "length"},
    }
    unreflected = {**cut, "id": "2", "reflection": None, "t1": {"finish_reason": "length"}, "t2": None}
    del unreflected["reflection_finish_reason"]
    rows = [cut, dict(cut), unreflected]  # the same item under a second grader's oracle run is counted once
    table = analysis_tables.eval_endings(rows)
    assert table.to_dict("records") == [
        {
            "variant": "base",
            "protocol": "oracle",
            "answers t1": 2,
            "t1 cut": 1,
            "reflections": 1,
            "reflection cut": 1,
            "answers t2": 1,
            "t2 cut": 1,
        }
    ]
