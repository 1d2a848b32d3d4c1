"""report.md: every table, figure and note of a run in one file; provenance of every number."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reflectevo.analysis.tables import STABILITY_FIGURE, eval_endings, stage02_endings
from reflectevo.core.files import atomic_write_text
from reflectevo.core.markdown import markdown_table
from reflectevo.evaluation.metrics import paper_reference, read_predictions
from reflectevo.evaluation.variants import skipped_variants
from reflectevo.models.builtin.smollm2 import SMOLLM2, WEIGHTS_NOTE
from reflectevo.runs.plan import read_manifest

REPORT_FILE = "report.md"


# ---- figure notes and the report -----------------------------------------------------------------------
FIGURES = {  # what notebook 06 calls its figures (file stems, without the format suffix)
    "accuracy": "06_accuracy_by_task",
    "transitions": "06_transitions",
    "success": "06_reflection_success",
    "lengths": "06_length_distributions",
    "localisation": "06_error_localisation",
    "composition": "06_curation_counts",
    "sft_loss": "06_sft_loss",
    "dpo_loss": "06_dpo_loss",
}

figure_notes: dict[str, str] = {
    "01_question_lengths": "Question length in words per task and split, i.e. the prompt lengths the model will see.",
    "02_reflection_success": "Share of reflections whose second trial was correct, per part of the instruction key "
    "(verify style, error type, plan level) and task.",
    "02_curation_counts": "Number of curated training rows in D+, D± and Dpref per task.",
    "03_sft_loss": "SFT training loss per optimizer step (lines) and loss on held-out questions (points), per variant.",
    "04_dpo_loss": "DPO training loss per optimizer step (lines) and loss on held-out questions (points), per pair type.",
    "04_dpo_rewards": "DPO implicit rewards of chosen and rejected reflections, their margin and the share of pairs "
    "ranked correctly, per optimizer step.",
    FIGURES["accuracy"]: "Accuracy after the first turn (Acc@t1) and after reflection (Acc@t2) per task and variant, "
    "with bootstrap confidence intervals, one row per evaluation protocol.",
    FIGURES["transitions"]: "Counts of first-turn outcomes (rows) against final outcomes (columns), showing how many "
    "answers reflection fixed, broke or left unparseable.",
    FIGURES["lengths"]: "Token lengths of first answers, reflections and second answers in the reflection data "
    "(stage 02) and in each evaluated variant, per task.",
    FIGURES["localisation"]: "Where in the failed first attempt a reflection's words point (mean relative position, "
    "0 = start, 1 = end) and how often it names the wrong answer, split by whether the second "
    "trial succeeded; a lexical proxy, not a check that the true error was found.",
}

# notebook 06 redraws these figures of earlier stages from their data, under its own names
for _key, _earlier in (
    ("success", "02_reflection_success"),
    ("composition", "02_curation_counts"),
    ("sft_loss", "03_sft_loss"),
    ("dpo_loss", "04_dpo_loss"),
):
    figure_notes[FIGURES[_key]] = figure_notes[_earlier]
figure_notes[STABILITY_FIGURE] = (
    "Per round of self-evolution: Acc@t1 and Acc@t2 of the round's model (its prompted reflection, variant base, "
    "on the eval split), answers reflection fixed (wrong->right) and broke (right->wrong), the mean reflection "
    "length and the D+ yield (successful reflections per reflection) of the round's stage 02. A falling Acc@t1 "
    "with a rising Acc@t2 is the first answer getting worse so that correction looks better."
)


def prefill_note(prefill: str | None) -> str:
    """How far the action call was pre-filled, when it went past the paper's ``Action:``."""
    if prefill != "answer":
        return ""
    return (
        " (the action call pre-filled through the answer syntax, e.g. `Action: Finish[`: every attempt starts an "
        "answer, so parse failures come only from an answer left unclosed, and accuracy is that of a forced choice)"
    )


def evolution_note(params: Any, manifest: dict[str, Any], rounds: Sequence[int]) -> str:
    """One paragraph on how the rounds were run: the generator rule, the data policy, and why it stopped."""
    evolve = params.evolve
    stopped = (manifest.get("evolve") or {}).get("stopped") or {}
    ending = (
        f"It stopped after round {stopped['after_round']}: {stopped['reason']}."
        if stopped
        else f"It ran all {evolve.rounds} rounds"
        + (f" (stop margin {evolve.stop_margin:g})." if evolve.stop_margin is not None else " (no stopping rule).")
    )
    return (
        f"{len(rounds)} round(s) of self-evolution. Each round after the first generates with, and trains further, "
        f"the previous round's `{evolve.generator}` variant merged into the model's weights (chosen by validation "
        f"Acc@t2 under the `{evolve.protocol}` protocol); each round trains on "
        + ("its own data only" if evolve.data == "fresh" else "the data of every round so far, de-duplicated")
        + f". {ending} The sections after this one analyse round {rounds[-1]}, the last round."
    )


def provenance(record: dict[str, Any], model_name: str) -> str:
    """One paragraph saying what produced stage 05's numbers, from its ``results.json``."""
    items = ", ".join(f"{task}: {count}" for task, count in record["items"].items())
    # results.json written before the oracle ran once per grader name the one grader that gated it
    oracle = (
        f"the oracle run once per grader, gated and scored by it: {', '.join(record['oracle_graders'])}"
        if "oracle_graders" in record
        else f"the oracle gated by {record.get('gate_grader')} only"
    )
    left_out = record.get("excluded_tasks") or []
    items += f"; left out with no {record['split']} items: {', '.join(left_out)}" if left_out else ""
    mismatches = record.get("allowed_mismatches") or {}
    differing = (
        ("; training and test inputs differ on purpose in: " + "; ".join(mismatches.values())) if mismatches else ""
    )
    return (
        f"Split `{record['split']}` ({items} items); protocols {', '.join(record['protocols'])}; graders "
        f"{', '.join(record['graders'])} ({oracle}); second trial `{record['second_trial']}`; "
        f"{record.get('attempt_calls', 1)} call(s) per attempt{prefill_note(record.get('attempt_prefill'))}; "
        f"{record['fewshots']} few-shot examples; prompt and grader versions {record['versions']}; seed {record['seed']}; "
        f"{record['bootstrap_samples']} bootstrap samples, {record['confidence']:.0%} intervals; model `{model_name}`"
        f"{weights_note(model_name)}{differing}."
    )


ENDINGS_NOTE = (
    "Stage 02 per task (parse failures: no answer could be read from the action; cut: the output stopped at "
    "the token limit, the model still writing), then stage 05 per variant and protocol. Under the oracle a "
    "parse failure counts as wrong and gets a reflection; the accuracy tables do not show how many there were."
)


# Below this many test items per task, a task's accuracy cannot separate variants: the report says so.
FEW_TEST_ITEMS = 30


def size_note(record: dict[str, Any]) -> str | None:
    """What the test split's size allows, when it is too small for the per-task numbers to mean much."""
    counts = [count for count in record["items"].values() if count]
    if not counts or min(counts) >= FEW_TEST_ITEMS:
        return None
    smallest = min(counts)
    return (
        f"**Too few test items to compare variants.** With {smallest} test item(s) in the smallest task, one "
        f"answer moves that task's accuracy by {100 / smallest:.0f} points, and the confidence intervals below "
        "span most of the scale: these tables show the pipeline working on this model, not whether reflection "
        "helps it. Read the paired tests before any difference."
    )


def weights_note(model_name: str) -> str:
    """What a built-in real model's weights are, where they are not the hub's."""
    return f" ({WEIGHTS_NOTE})" if model_name == SMOLLM2 else ""


def training_note(manifest: dict[str, Any]) -> str:
    """Which variants stages 03 and 04 trained, and which they skipped for want of data (and why)."""
    skipped = skipped_variants(manifest)
    if not skipped:
        return "Every variant the params name was trained."
    lines = "; ".join(f"`{name}`: {why}" for name, why in skipped.items())
    return (
        f"Not trained, for want of training data, hence not evaluated: {lines}. The curation counts say "
        "which of D+, D± and Dpref came out empty."
    )


def data_note(data_dir: str | Path, eval_split: str) -> str:
    """One paragraph on the data stage 01 wrote, from its ``summary.json``: where each task's splits came
    from, what the contamination guard dropped (or that it was off), test splits cut from a hub split, and
    the tasks evaluation on ``eval_split`` leaves out."""
    summary = json.loads((Path(data_dir) / "summary.json").read_text(encoding="utf-8"))
    sources = "; ".join(
        f"{task}: " + ", ".join(f"{split} {source}" for split, source in splits.items())
        for task, splits in summary["sources"].items()
    )
    parts = [f"Data (stage 01): {sources}."]
    guard = summary.get("decontamination")
    if guard is None:  # summary.json written before the guard existed
        parts.append("Contamination guard: not recorded; rerun stage 01 to check train and validation against test.")
    elif guard["enabled"]:
        dropped = {task: counts for task, counts in guard["dropped"].items() if any(counts.values())}
        total = {split: sum(counts[split] for counts in guard["dropped"].values()) for split in ("train", "validation")}
        detail = "; ".join(
            f"{task}: train {counts['train']}, validation {counts['validation']}" for task, counts in dropped.items()
        )
        parts.append(
            f"Contamination guard on (data.decontaminate): {total['train']} train and {total['validation']} "
            "validation items that repeat a test question were dropped" + (f" ({detail})." if detail else ".")
        )
    else:
        parts.append(
            "Contamination guard OFF (data.decontaminate: false): train and validation items were not "
            "compared with the test items and may repeat test questions."
        )
    for task, cut in (summary.get("test_cuts") or {}).items():
        parts.append(
            f"{task}: the test split is a seeded cut of the hub's {cut['from_split']} split "
            f"({cut['moved']} items, share {cut['test_share']:g})."
        )
    excluded = (summary.get("eval_exclusions") or {}).get(eval_split) or []
    if excluded:
        parts.append(
            f"Left out of evaluation, with no `{eval_split}` items (data.allow_empty_eval): "
            f"{', '.join(excluded)}; the `overall` rows pool the other tasks only."
        )
    return " ".join(parts)


def note_for(stem: str) -> str | None:
    """The note of a figure file stem: an exact entry of :data:`figure_notes`, else the longest entry the
    stem starts with (``06_accuracy_by_task_oracle`` gets the note of ``06_accuracy_by_task``)."""
    if stem in figure_notes:
        return figure_notes[stem]
    prefixes = [key for key in figure_notes if stem.startswith(key)]
    return figure_notes[max(prefixes, key=len)] if prefixes else None


def _figure_markdown(run_dir: Path, figure: Path) -> str:
    try:
        link = figure.resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        link = Path(os.path.relpath(figure.resolve(), run_dir.resolve())).as_posix()
    text = f"![{figure.stem}]({link})"
    note = note_for(figure.stem)
    return f"{text}\n\n*{note}*" if note else text


def write_report(run_dir: str | Path, *, title: str, sections: Sequence[tuple[str, Sequence[Any]]]) -> Path:
    """Write ``run_dir/report.md`` atomically and return its path.

    ``sections`` is a list of (heading, items); an item is a markdown string (written as is), a pandas
    DataFrame (a markdown table, :func:`markdown_table`) or a figure path (a :class:`os.PathLike`, never
    a plain string): an image link relative to ``run_dir`` (``figures/<name>``) followed by its note from
    :data:`figure_notes` when the stem has one. A missing figure is linked all the same, with a warning
    line, so a report never hides that a figure was expected.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    blocks = [f"# {title}"]
    for heading, items in sections:
        blocks.append(f"## {heading}")
        for item in items:
            if isinstance(item, pd.DataFrame):
                blocks.append(markdown_table(item))
            elif isinstance(item, os.PathLike):
                figure = Path(item)
                blocks.append(_figure_markdown(run_dir, figure))
                if not figure.is_file():
                    blocks.append(f"> figure file missing: `{figure.name}`")
            elif isinstance(item, str):
                blocks.append(item.strip("\n"))
            else:
                raise TypeError(
                    f"report item must be a markdown string, a DataFrame or a path, not {type(item).__name__}"
                )
    return atomic_write_text(run_dir / REPORT_FILE, "\n\n".join(blocks) + "\n")


OVERALL_COLUMNS = [
    "variant",
    "protocol",
    "grader",
    "n",
    "acc_t1",
    "acc_t2",
    "delta",
    "acc_t2_low",
    "acc_t2_high",
    "wrong_to_right",
    "right_to_wrong",
    "parse_failures_t1",
    "parse_failures_t2",
]
COMPARISON_COLUMNS = ["variant", "protocol", "grader", "n", "difference", "p_value", "verdict"]


def run_report(
    params: Any,
    run: Any,
    *,
    analysed: Any,
    figures: dict[str, Path],
    statistics: Any,
    stability: Any = None,
    rounds: Sequence[int] = (),
) -> tuple[Path, list[str]]:
    """Notebook 06's report.md: provenance, the paper-layout tables of every protocol (graded by the first of
    ``eval.graders``), accuracies with intervals, paired tests, the figures and, over several rounds, the
    stability table. ``analysed`` is the params whose stages 02-05 were analysed (the last round's, if any).
    Returns the report's path and its section headings."""
    import pandas as pd

    run.check_writable()  # the report is written into the run: only while the notebook holds it
    eval_dir = analysed.run_dir / "eval"
    record = json.loads((eval_dir / "results.json").read_text(encoding="utf-8"))
    summary = pd.read_csv(eval_dir / "summary.csv")
    comparisons = pd.read_csv(eval_dir / "comparisons.csv")
    grader = record["graders"][0]
    overall = summary[summary["task"] == "overall"]
    roles = pd.DataFrame(record["roles"]).T.rename_axis("variant").reindex(list(dict.fromkeys(summary["variant"])))
    sections = [
        (
            "What produced these numbers",
            [
                provenance(record, analysed.model.name),
                *filter(None, [size_note(record)]),
                data_note(run.stage_dir("01_data"), record["split"]),
                roles,
            ],
        ),
        *[
            (
                f"Acc@t1 / Acc@t2 / Δ (%), protocol {p}, grader {grader}",
                [pd.read_csv(eval_dir / f"paper_table_{p}_{grader}.csv", index_col=0)],
            )
            for p in record["protocols"]
        ],
        (
            "Accuracy with confidence intervals",
            [figures["accuracy"], overall[OVERALL_COLUMNS].round(3).reset_index(drop=True)],
        ),
        (
            "Paired tests against the base model",
            [comparisons[comparisons["task"] == "overall"][COMPARISON_COLUMNS].reset_index(drop=True)],
        ),
        ("Transitions", [figures["transitions"]]),
        (
            "How the model's outputs ended",
            [
                ENDINGS_NOTE,
                stage02_endings(json.loads((analysed.run_dir / "reflect" / "counts.json").read_text(encoding="utf-8"))),
                eval_endings(read_predictions(eval_dir / "predictions.jsonl")),
            ],
        ),
        ("The reflection data", [statistics, figures["success"], figures["lengths"], figures["localisation"]]),
        (
            "Training",
            [
                training_note(read_manifest(analysed.run_dir)),  # the analysed round's stages 03-04
                *(figures[key] for key in ("composition", "sft_loss", "dpo_loss") if key in figures),
            ],
        ),
    ]
    reference = paper_reference(params.model.name)
    if reference is not None:
        sections.insert(1 + len(record["protocols"]), (f"The paper's own numbers for {params.model.name}", [reference]))
    if rounds:
        sections.insert(
            0,
            (
                "Self-evolution over rounds",
                [evolution_note(params, run.manifest(), rounds), stability, figures[STABILITY_FIGURE]],
            ),
        )
    path = write_report(params.run_dir, title=f"ReflectEvo run `{params.run.name}`", sections=sections)
    return path, [heading for heading, _ in sections]
