"""The analysis of notebook 06: tables and long frames built from stage 02's raw records and stage 05's
predictions, the one-sentence notes shown under every figure, and the run's ``report.md``.

    stats = dataset_statistics(records, count_tokens)          # the paper's §3.5 table for this run
    lengths = length_frame(records, predictions, count_tokens)  # -> plots.length_distributions
    where = error_localisation(records)                         # -> plots.error_localisation
    write_report(run_dir, title="...", sections=[("Data", [stats, run_dir / "figures" / "06_x.png"])])

The notebook only calls these and displays what they return; everything here is plain pandas so it
is tested without a model. Lengths are counted with a callable ``count_tokens(text) -> int`` that the
notebook builds from the run's tokenizer (tests pass ``lambda text: len(text.split())``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from reflectevo.runs import atomic_write_text

REPORT_FILE = "report.md"

# ---- the paper's dataset statistics (method.md §3.5) ----------------------------------------------
STATISTICS_ROWS = (
    "reflections generated", "questions reflected on", "% correct after reflection", "avg question length",
    "avg answer length, turn 1", "avg answer length, turn 2", "avg reflection length",
)


def _mean(values: Sequence[int]) -> float:
    return round(sum(values) / len(values), 1) if values else math.nan


def _statistics_column(records: Sequence[dict[str, Any]], count_tokens: Callable[[str], int]) -> dict[str, Any]:
    reflected = [record for record in records if len(record["output"]) > 1 and not record["output"][0]["is_correct"]]
    seconds = [output for record in records for output in record["output"][1:]]
    successes = sum(bool(output["is_correct"]) for output in seconds)
    return {
        "reflections generated": len(seconds),
        "questions reflected on": len(reflected),
        "% correct after reflection": round(100 * successes / len(seconds), 2) if seconds else math.nan,
        "avg question length": _mean([count_tokens(record["question"]) for record in reflected]),
        "avg answer length, turn 1": _mean([count_tokens(record["output"][0]["reasoning"]) for record in reflected]),
        "avg answer length, turn 2": _mean([count_tokens(output["reasoning"]) for output in seconds]),
        "avg reflection length": _mean([count_tokens(_reflection_text(output)) for output in seconds]),
    }


def _reflection_text(output: dict[str, Any]) -> str:
    reflections = output.get("reflections") or [""]
    return reflections[0] or ""


def dataset_statistics(records: Sequence[dict[str, Any]], count_tokens: Callable[[str], int]) -> Any:
    """The paper's ReflectEvo-460K statistics table (method.md §3.5) for this run's stage 02 records: one
    column per task (in the order the records first name them) plus "total" (all records pooled, not an
    average of the task columns), one row per feature:

    - reflections generated: trial-2 outputs (one per sampled reflection);
    - questions reflected on: questions whose first trial failed and got at least one reflection;
    - % correct after reflection: share of reflections whose second trial was correct, in percent (2 decimals);
    - avg question length: over the questions reflected on (the paper's table describes its reflection
      data set, whose questions are the failed ones);
    - avg answer length, turn 1: the first attempts (``reasoning``, Thought and Action) of those questions;
    - avg answer length, turn 2: every second attempt;
    - avg reflection length: every reflection.

    Lengths (1 decimal) are in tokens of ``count_tokens``, which the notebook builds from this run's
    tokenizer; the paper does not state its unit (presumably tokens of its own generators' tokenizers),
    so compare the shape of the numbers, not their exact values. With no records the table still has
    every row and a "total" column: counts 0, rates and lengths NaN.
    """
    import pandas as pd

    tasks = list(dict.fromkeys(record["task"] for record in records))
    columns = {task: _statistics_column([r for r in records if r["task"] == task], count_tokens) for task in tasks}
    columns["total"] = _statistics_column(records, count_tokens)
    table = pd.DataFrame({name: pd.Series(column, dtype=object) for name, column in columns.items()})
    table = table.reindex(list(STATISTICS_ROWS))
    table.index.name = "feature"
    return table


# ---- length distributions ------------------------------------------------------------------------
LENGTH_COLUMNS = ["source", "task", "kind", "tokens"]
STAGE02_SOURCE = "stage 02"


def length_frame(records: Sequence[dict[str, Any]], predictions: Iterable[dict[str, Any]],
                 count_tokens: Callable[[str], int], protocol: str | None = None) -> Any:
    """Token lengths in long form (columns source, task, kind, tokens) for :func:`reflectevo.plots.length_distributions`.

    Stage 02 (source "stage 02"): every question's first attempt ("turn-1 answer", not only the failed
    ones, as in the evaluation), every reflection and every second attempt ("turn-2 answer").
    Stage 05 (source "eval <variant>"): each prediction's t1 text, its reflection and t2 text when
    present (not None). ``protocol`` keeps one evaluation protocol; without it every protocol is kept and
    a first answer that several protocols share (same variant, task, id and text) is counted once, so the
    turn-1 distribution is not weighted by the number of protocols. Lengths are in tokens of ``count_tokens``.
    """
    import pandas as pd

    rows: list[dict[str, Any]] = []

    def add(source: str, task: str, kind: str, text: str) -> None:
        rows.append({"source": source, "task": task, "kind": kind, "tokens": count_tokens(text)})

    for record in records:
        add(STAGE02_SOURCE, record["task"], "turn-1 answer", record["output"][0]["reasoning"])
        for output in record["output"][1:]:
            add(STAGE02_SOURCE, record["task"], "reflection", _reflection_text(output))
            add(STAGE02_SOURCE, record["task"], "turn-2 answer", output["reasoning"])
    seen_first: set[tuple[str, str, str, str]] = set()
    # the oracle has one row per gating grader; where two graders gated alike, the row's reflection and second
    # turn are the same generation, counted once
    seen_oracle: set[tuple[str, str, str, str, str]] = set()
    for prediction in predictions:
        if protocol is not None and prediction.get("protocol") != protocol:
            continue
        source, task = f"eval {prediction['variant']}", prediction["task"]
        first = (prediction.get("t1") or {}).get("text")
        if first is not None and (prediction["variant"], task, str(prediction["id"]), first) not in seen_first:
            seen_first.add((prediction["variant"], task, str(prediction["id"]), first))
            add(source, task, "turn-1 answer", first)
        later = [("reflection", prediction.get("reflection"))]
        if prediction.get("t2") is not None:
            later.append(("turn-2 answer", prediction["t2"].get("text")))
        for kind, text in later:
            if text is None:
                continue
            key = (prediction["variant"], kind, task, str(prediction["id"]), text)
            if prediction.get("protocol") == "oracle":
                if key in seen_oracle:
                    continue
                seen_oracle.add(key)
            add(source, task, kind, text)
    frame = pd.DataFrame(rows, columns=LENGTH_COLUMNS)
    frame["tokens"] = frame["tokens"].astype(int)
    return frame


# ---- where a reflection points in the failed attempt (a proxy for error localisation) ----------------
_STOPWORD_TEXT = """
the and for are but not you all any can had her was one our out has him his how its may new now old see two way who
did get let put say she too use that with this from they them then than there their these those what when where which
while will would could should shall into onto over under about above after again also been being both each few more
most other some such only own same very just because before below between during through until upon your yours
were have having does doing done here why whom whose itself myself yourself ourselves themselves
answer question thought action finish begin end
"""
# function words, plus the attempt format's own words (labels, Finish[...], [BEGIN] ... [END])
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
LOCALISATION_COLUMNS = ["task", "id", "instruction", "sample", "success", "names_wrong_answer", "overlap", "position", "line"]

_WORD = re.compile(r"[A-Za-z0-9]+")
_LABEL = re.compile(r"^[ \t]*(?:Thought|Action)[ \t]*:", re.MULTILINE)
_ACTION = re.compile(r"^[ \t]*Action[ \t]*:", re.MULTILINE)


def content_words(text: str) -> list[str]:
    """Lower-cased words of three or more letters (no digits) that are not in :data:`STOPWORDS`."""
    return [word for word in (token.lower() for token in _WORD.findall(text))
            if len(word) >= 3 and word.isalpha() and word not in STOPWORDS]


def _attempt_tokens(attempt: str) -> list[tuple[str, str]]:
    """The attempt's word tokens in order, each with the part it lies in ("thought" or "action"); the
    "Thought:" and "Action:" labels are dropped. Everything from the first line that starts with
    "Action:" on is the action (for code, the whole program); an attempt without one is all thought."""
    marker = _ACTION.search(attempt)
    cut = marker.start() if marker else len(attempt)
    parts = [("thought", attempt[:cut]), ("action", attempt[cut:])]
    return [(token, part) for part, text in parts for token in _WORD.findall(_LABEL.sub(" ", text))]


def names_answer(reflection: str, answer: str) -> bool:
    """Whether ``reflection`` contains ``answer`` as a standalone token sequence: not inside a longer word
    or number ("B" does not match "But", "3" does not match "35" or "3.5"). Whitespace is normalised;
    the match ignores case except for one-letter answers (so "A" is not the article "a")."""
    answer = " ".join(answer.split())
    if not answer:
        return False
    flags = 0 if len(answer) == 1 else re.IGNORECASE
    pattern = r"(?<!\w)(?<!\d[.,])" + re.escape(answer) + r"(?!\w)(?![.,]\d)"
    return re.search(pattern, " ".join(reflection.split()), flags) is not None


def localise(attempt: str, reflection: str) -> dict[str, Any]:
    """Overlap, position and line of one reflection against the failed attempt (see :func:`error_localisation`)."""
    tokens = _attempt_tokens(attempt)
    vocabulary = set(content_words(attempt))
    repeated = vocabulary & set(content_words(reflection))
    hits = [(index, part) for index, (token, part) in enumerate(tokens) if token.lower() in repeated]
    if not hits:
        return {"overlap": (0.0 if vocabulary else None), "position": None, "line": None}
    last = max(len(tokens) - 1, 1)
    thought = sum(part == "thought" for _, part in hits)
    return {
        "overlap": len(repeated) / len(vocabulary),
        "position": sum(index / last for index, _ in hits) / len(hits),
        "line": "thought" if thought > len(hits) - thought else "action",
    }


def error_localisation(records: Sequence[dict[str, Any]]) -> Any:
    """One row per reflection in stage 02's records: where in the failed first attempt its words point.

    This is a lexical proxy: it measures which parts of the failed attempt a reflection repeats, not
    whether the reflection found the attempt's true error. Columns:

    - task, id, instruction, sample; success: the second trial after this reflection was correct;
    - names_wrong_answer: the reflection contains the first trial's extracted answer
      (``output[0]["generated_answer"]``) as a standalone token sequence (:func:`names_answer`); False
      when nothing was extracted (a parse failure); None for MBPP, whose "answer" is a whole program;
    - overlap: share of the first attempt's distinct content words (:func:`content_words`: lower-cased
      words of 3+ letters, minus :data:`STOPWORDS`) that the reflection also contains; None when the
      attempt has no content word;
    - position: the mean relative position, in the first attempt, of every occurrence of a repeated
      content word. The attempt (``reasoning``: the Thought and Action, not the verdict) is split into
      word tokens (runs of letters or digits, "Thought:"/"Action:" labels dropped); token i of n sits at
      i / (n - 1), so 0 is the first word and 1 the last. Missing (NaN) when nothing is repeated;
    - line: the part of the attempt holding more of those occurrences: "thought" or "action" (the Action
      line on, which for code is the whole program); a tie counts as "action"; missing when nothing is repeated.
    """
    import pandas as pd

    rows = []
    for record in records:
        first = record["output"][0]
        wrong = str(first.get("generated_answer") or "")
        for output in record["output"][1:]:
            reflection = _reflection_text(output)
            named = None if record["task"] == "mbpp" else (bool(wrong.strip()) and names_answer(reflection, wrong))
            rows.append({"task": record["task"], "id": record["id"], "instruction": output.get("instruction"),
                         "sample": output.get("sample"), "success": bool(output["is_correct"]), "names_wrong_answer": named,
                         **localise(first["reasoning"], reflection)})
    return pd.DataFrame(rows, columns=LOCALISATION_COLUMNS)


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
for _key, _earlier in (("success", "02_reflection_success"), ("composition", "02_curation_counts"),
                       ("sft_loss", "03_sft_loss"), ("dpo_loss", "04_dpo_loss")):
    figure_notes[FIGURES[_key]] = figure_notes[_earlier]


def training_phases(run_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """The phases (with their log histories) of every variant stage 03 (``kind`` "sft") or 04 ("dpo")
    trained in this run, read from ``<kind>/<variant>/metrics.json``; empty when the stage did not run."""
    import json

    phases = []
    for path in sorted((Path(run_dir) / kind).glob("*/metrics.json")):
        phases.extend(json.loads(path.read_text(encoding="utf-8"))["phases"])
    return phases


# ---- self-evolution: one row per round -------------------------------------------------------------------
STABILITY_FIGURE = "06_stability"  # drawn only by runs of several rounds, so not in FIGURES
STABILITY_COLUMNS = [
    "round", "generator", "acc_t1", "acc_t2", "delta", "wrong_to_right", "right_to_wrong", "train_acc_t1",
    "reflections", "reflection_length", "d_plus", "d_plus_yield", "next_generator", "validation_acc_t2",
]
figure_notes[STABILITY_FIGURE] = (
    "Per round of self-evolution: Acc@t1 and Acc@t2 of the round's model (its prompted reflection, variant base, "
    "on the eval split), answers reflection fixed (wrong->right) and broke (right->wrong), the mean reflection "
    "length and the D+ yield (successful reflections per reflection) of the round's stage 02. A falling Acc@t1 "
    "with a rising Acc@t2 is the first answer getting worse so that correction looks better.")


def read_round(round_dir: str | Path) -> dict[str, Any]:
    """What the stability table reads of one round's folder: stage 05's ``summary.csv``, stage 02's raw
    records and ``counts.json``, and the round's manifest."""
    import json

    import pandas as pd

    from reflectevo.curation import read_records
    from reflectevo.runs import read_manifest

    round_dir = Path(round_dir)
    return {"summary": pd.read_csv(round_dir / "eval" / "summary.csv"),
            "records": read_records(round_dir / "reflect" / "raw.jsonl"),
            "counts": json.loads((round_dir / "reflect" / "counts.json").read_text(encoding="utf-8")),
            "manifest": read_manifest(round_dir)}


def stability_table(rounds: dict[int, dict[str, Any]], count_tokens: Callable[[str], int], *, protocol: str,
                    grader: str, variant: str = "base") -> Any:
    """One row per round (``rounds``: round number -> :func:`read_round`), so that collapse or reward hacking
    shows across rounds:

    - generator: the variant of the previous round merged into this round's model (round 1: the base model);
    - acc_t1, acc_t2, delta, wrong_to_right, right_to_wrong: stage 05 on the eval split, all tasks, for
      ``variant`` (``base``: the round's own model answering and reflecting), under ``protocol`` and ``grader``;
    - train_acc_t1: the share of stage 02's first trials (on the reflection split) that were correct;
    - reflections, reflection_length: the reflections stage 02 generated and their mean length in tokens
      of ``count_tokens``; d_plus: its successful reflections; d_plus_yield = d_plus / reflections;
    - next_generator, validation_acc_t2: the variant this round chose for the next one and its validation score.
    """
    import pandas as pd

    rows = []
    for number in sorted(rounds):
        data = rounds[number]
        summary = data["summary"]
        picked = summary[(summary["variant"] == variant) & (summary["protocol"] == protocol)
                         & (summary["grader"] == grader) & (summary["task"] == "overall")]
        metrics = picked.iloc[0] if len(picked) else {}
        totals = next((row for row in data["counts"] if row.get("task") == "all"), {})
        reflections = [_reflection_text(output) for record in data["records"] for output in record["output"][1:]]
        stages = data["manifest"].get("stages", {})
        generator = (stages.get("02_reflect", {}).get("generator") or {}).get("variant")
        validation = stages.get("05_eval", {}).get("validation") or {}
        questions, d_plus = totals.get("questions", 0), totals.get("d_plus", 0)
        rows.append({
            "round": number,
            "generator": generator or ("base model" if number == 1 else None),
            **{key: float(metrics[key]) if key in metrics and pd.notna(metrics[key]) else math.nan
               for key in ("acc_t1", "acc_t2", "delta", "wrong_to_right", "right_to_wrong")},
            "train_acc_t1": round(totals.get("first_correct", 0) / questions, 4) if questions else math.nan,
            "reflections": len(reflections),
            "reflection_length": _mean([count_tokens(text) for text in reflections]),
            "d_plus": d_plus,
            "d_plus_yield": round(d_plus / len(reflections), 4) if reflections else math.nan,
            "next_generator": validation.get("generator"),
            "validation_acc_t2": validation.get("score", math.nan) if validation.get("score") is not None else math.nan,
        })
    return pd.DataFrame(rows, columns=STABILITY_COLUMNS)


def evolution_note(params: Any, manifest: dict[str, Any], rounds: Sequence[int]) -> str:
    """One paragraph on how the rounds were run: the generator rule, the data policy, and why it stopped."""
    evolve = params.evolve
    stopped = (manifest.get("evolve") or {}).get("stopped") or {}
    ending = (f"It stopped after round {stopped['after_round']}: {stopped['reason']}." if stopped
              else f"It ran all {evolve.rounds} rounds" + (f" (stop margin {evolve.stop_margin:g})." if evolve.stop_margin
                                                           is not None else " (no stopping rule)."))
    return (f"{len(rounds)} round(s) of self-evolution. Each round after the first generates with, and trains further, "
            f"the previous round's `{evolve.generator}` variant merged into the model's weights (chosen by validation "
            f"Acc@t2 under the `{evolve.protocol}` protocol); each round trains on "
            + ("its own data only" if evolve.data == "fresh" else "the data of every round so far, de-duplicated")
            + f". {ending} The sections after this one analyse round {rounds[-1]}, the last round.")


def transition_matrices(transitions: Any, grader: str, protocols: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"<variant> · <protocol>": 4x4 counts}`` from stage 05's ``transitions.csv`` (long form), for one grader."""
    rows = transitions[transitions["grader"] == grader]
    if protocols is not None:
        rows = rows[rows["protocol"].isin(protocols)]
    from reflectevo.tasks import OUTCOMES

    return {f"{variant} · {protocol}": part.pivot(index="t1", columns="final", values="items")
            .reindex(index=list(OUTCOMES), columns=list(OUTCOMES), fill_value=0)
            for (variant, protocol), part in rows.groupby(["variant", "protocol"], sort=False)}



def provenance(record: dict[str, Any], model_name: str) -> str:
    """One paragraph saying what produced stage 05's numbers, from its ``results.json``."""
    items = ", ".join(f"{task}: {count}" for task, count in record["items"].items())
    # results.json written before the oracle ran once per grader name the one grader that gated it
    oracle = (f"the oracle run once per grader, gated and scored by it: {', '.join(record['oracle_graders'])}"
              if "oracle_graders" in record else f"the oracle gated by {record.get('gate_grader')} only")
    left_out = record.get("excluded_tasks") or []
    items += f"; left out with no {record['split']} items: {', '.join(left_out)}" if left_out else ""
    mismatches = record.get("allowed_mismatches") or {}
    differing = ("; training and test inputs differ on purpose in: " + "; ".join(mismatches.values())) if mismatches else ""
    return (f"Split `{record['split']}` ({items} items); protocols {', '.join(record['protocols'])}; graders "
            f"{', '.join(record['graders'])} ({oracle}); second trial `{record['second_trial']}`; "
            f"{record.get('attempt_calls', 1)} call(s) per attempt; "
            f"{record['fewshots']} few-shot examples; prompt and grader versions {record['versions']}; seed {record['seed']}; "
            f"{record['bootstrap_samples']} bootstrap samples, {record['confidence']:.0%} intervals; model `{model_name}`"
            f"{differing}.")

def data_note(data_dir: str | Path, eval_split: str) -> str:
    """One paragraph on the data stage 01 wrote, from its ``summary.json``: where each task's splits came
    from, what the contamination guard dropped (or that it was off), test splits cut from a hub split, and
    the tasks evaluation on ``eval_split`` leaves out."""
    summary = json.loads((Path(data_dir) / "summary.json").read_text(encoding="utf-8"))
    sources = "; ".join(f"{task}: " + ", ".join(f"{split} {source}" for split, source in splits.items())
                        for task, splits in summary["sources"].items())
    parts = [f"Data (stage 01): {sources}."]
    guard = summary.get("decontamination")
    if guard is None:  # summary.json written before the guard existed
        parts.append("Contamination guard: not recorded; rerun stage 01 to check train and validation against test.")
    elif guard["enabled"]:
        dropped = {task: counts for task, counts in guard["dropped"].items() if any(counts.values())}
        total = {split: sum(counts[split] for counts in guard["dropped"].values()) for split in ("train", "validation")}
        detail = "; ".join(f"{task}: train {counts['train']}, validation {counts['validation']}"
                           for task, counts in dropped.items())
        parts.append(f"Contamination guard on (data.decontaminate): {total['train']} train and {total['validation']} "
                     "validation items that repeat a test question were dropped" + (f" ({detail})." if detail else "."))
    else:
        parts.append("Contamination guard OFF (data.decontaminate: false): train and validation items were not "
                     "compared with the test items and may repeat test questions.")
    for task, cut in (summary.get("test_cuts") or {}).items():
        parts.append(f"{task}: the test split is a seeded cut of the hub's {cut['from_split']} split "
                     f"({cut['moved']} items, share {cut['test_share']:g}).")
    excluded = (summary.get("eval_exclusions") or {}).get(eval_split) or []
    if excluded:
        parts.append(f"Left out of evaluation, with no `{eval_split}` items (data.allow_empty_eval): "
                     f"{', '.join(excluded)}; the `overall` rows pool the other tasks only.")
    return " ".join(parts)


def note_for(stem: str) -> str | None:
    """The note of a figure file stem: an exact entry of :data:`figure_notes`, else the longest entry the
    stem starts with (``06_accuracy_by_task_oracle`` gets the note of ``06_accuracy_by_task``)."""
    if stem in figure_notes:
        return figure_notes[stem]
    prefixes = [key for key in figure_notes if stem.startswith(key)]
    return figure_notes[max(prefixes, key=len)] if prefixes else None


def _cell(value: Any) -> str:
    import pandas as pd

    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4f}".rstrip("0").rstrip(".")
    return " ".join(str(value).split()).replace("|", r"\|")


def markdown_table(frame: Any) -> str:
    """A DataFrame as a GitHub markdown table (no ``tabulate`` needed). The index is a column unless it is
    the default 0..n-1 range; NaN and None are empty cells, floats show at most 4 decimals."""
    import pandas as pd

    keep_index = not (isinstance(frame.index, pd.RangeIndex) and frame.index.start == 0 and frame.index.step == 1)
    header = ([_cell(frame.index.name or "")] if keep_index else []) + [_cell(column) for column in frame.columns]
    if not header:
        return "*(empty table)*"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in zip(frame.index, frame.itertuples(index=False, name=None)):
        cells = ([_cell(label)] if keep_index else []) + [_cell(value) for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    if len(frame) == 0:
        lines.append("| " + " | ".join(["(no rows)"] + [""] * (len(header) - 1)) + " |")
    return "\n".join(lines)


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
                raise TypeError(f"report item must be a markdown string, a DataFrame or a path, not {type(item).__name__}")
    return atomic_write_text(run_dir / REPORT_FILE, "\n\n".join(blocks) + "\n")
