"""Stage 06 tables: dataset statistics, lengths, error localisation, stability over rounds."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from reflectevo.reflection.curation import read_records
from reflectevo.runs.plan import read_manifest
from reflectevo.tasks import OUTCOMES

# ---- the paper's dataset statistics (method.md §3.5) ----------------------------------------------
STATISTICS_ROWS = (
    "reflections generated",
    "questions reflected on",
    "% correct after reflection",
    "avg question length",
    "avg answer length, turn 1",
    "avg answer length, turn 2",
    "avg reflection length",
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


def length_frame(
    records: Sequence[dict[str, Any]],
    predictions: Iterable[dict[str, Any]],
    count_tokens: Callable[[str], int],
    protocol: str | None = None,
) -> Any:
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
LOCALISATION_COLUMNS = [
    "task",
    "id",
    "instruction",
    "sample",
    "success",
    "names_wrong_answer",
    "overlap",
    "position",
    "line",
]

_WORD = re.compile(r"[A-Za-z0-9]+")
_LABEL = re.compile(r"^[ \t]*(?:Thought|Action)[ \t]*:", re.MULTILINE)
_ACTION = re.compile(r"^[ \t]*Action[ \t]*:", re.MULTILINE)


def content_words(text: str) -> list[str]:
    """Lower-cased words of three or more letters (no digits) that are not in :data:`STOPWORDS`."""
    return [
        word
        for word in (token.lower() for token in _WORD.findall(text))
        if len(word) >= 3 and word.isalpha() and word not in STOPWORDS
    ]


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
            rows.append(
                {
                    "task": record["task"],
                    "id": record["id"],
                    "instruction": output.get("instruction"),
                    "sample": output.get("sample"),
                    "success": bool(output["is_correct"]),
                    "names_wrong_answer": named,
                    **localise(first["reasoning"], reflection),
                }
            )
    return pd.DataFrame(rows, columns=LOCALISATION_COLUMNS)


def training_phases(run_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """The phases (with their log histories) of every variant stage 03 (``kind`` "sft") or 04 ("dpo")
    trained in this run, read from ``<kind>/<variant>/metrics.json``; empty when the stage did not run."""

    phases = []
    for path in sorted((Path(run_dir) / kind).glob("*/metrics.json")):
        phases.extend(json.loads(path.read_text(encoding="utf-8"))["phases"])
    return phases


# ---- self-evolution: one row per round -------------------------------------------------------------------
STABILITY_FIGURE = "06_stability"  # drawn only by runs of several rounds, so not in FIGURES
STABILITY_COLUMNS = [
    "round",
    "generator",
    "acc_t1",
    "acc_t2",
    "delta",
    "wrong_to_right",
    "right_to_wrong",
    "train_acc_t1",
    "reflections",
    "reflection_length",
    "d_plus",
    "d_plus_yield",
    "next_generator",
    "validation_acc_t2",
]


def read_round(round_dir: str | Path) -> dict[str, Any]:
    """What the stability table reads of one round's folder: stage 05's ``summary.csv``, stage 02's raw
    records and ``counts.json``, and the round's manifest."""

    import pandas as pd

    round_dir = Path(round_dir)
    return {
        "summary": pd.read_csv(round_dir / "eval" / "summary.csv"),
        "records": read_records(round_dir / "reflect" / "raw.jsonl"),
        "counts": json.loads((round_dir / "reflect" / "counts.json").read_text(encoding="utf-8")),
        "manifest": read_manifest(round_dir),
    }


def stability_table(
    rounds: dict[int, dict[str, Any]],
    count_tokens: Callable[[str], int],
    *,
    protocol: str,
    grader: str,
    variant: str = "base",
) -> Any:
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
        picked = summary[
            (summary["variant"] == variant)
            & (summary["protocol"] == protocol)
            & (summary["grader"] == grader)
            & (summary["task"] == "overall")
        ]
        metrics = picked.iloc[0] if len(picked) else {}
        totals = next((row for row in data["counts"] if row.get("task") == "all"), {})
        reflections = [_reflection_text(output) for record in data["records"] for output in record["output"][1:]]
        stages = data["manifest"].get("stages", {})
        generator = (stages.get("02_reflect", {}).get("generator") or {}).get("variant")
        validation = stages.get("05_eval", {}).get("validation") or {}
        questions, d_plus = totals.get("questions", 0), totals.get("d_plus", 0)
        rows.append(
            {
                "round": number,
                "generator": generator or ("base model" if number == 1 else None),
                **{
                    key: float(metrics[key]) if key in metrics and pd.notna(metrics[key]) else math.nan
                    for key in ("acc_t1", "acc_t2", "delta", "wrong_to_right", "right_to_wrong")
                },
                "train_acc_t1": round(totals.get("first_correct", 0) / questions, 4) if questions else math.nan,
                "reflections": len(reflections),
                "reflection_length": _mean([count_tokens(text) for text in reflections]),
                "d_plus": d_plus,
                "d_plus_yield": round(d_plus / len(reflections), 4) if reflections else math.nan,
                "next_generator": validation.get("generator"),
                "validation_acc_t2": validation.get("score", math.nan)
                if validation.get("score") is not None
                else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=STABILITY_COLUMNS)


def transition_matrices(transitions: Any, grader: str, protocols: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"<variant> · <protocol>": 4x4 counts}`` from stage 05's ``transitions.csv`` (long form), for one grader."""
    rows = transitions[transitions["grader"] == grader]
    if protocols is not None:
        rows = rows[rows["protocol"].isin(protocols)]

    return {
        f"{variant} · {protocol}": part.pivot(index="t1", columns="final", values="items").reindex(
            index=list(OUTCOMES), columns=list(OUTCOMES), fill_value=0
        )
        for (variant, protocol), part in rows.groupby(["variant", "protocol"], sort=False)
    }


# ---- how outputs ended -----------------------------------------------------------------------------
STAGE02_ENDINGS = [
    "questions",
    "first_parse_failures",
    "first_cut_at_limit",
    "reflections",
    "reflections_cut_at_limit",
    "second_parse_failures",
    "second_cut_at_limit",
    "d_plus",
    "d_pm",
    "d_pref",
    "judge_parse_failures",
]


def stage02_endings(counts: Sequence[dict[str, Any]]) -> Any:
    """Stage 02 per task (``reflect/counts.json``): parse failures and outputs cut at the token limit at
    each step, and the curated rows they left. A real small model's rambling shows here first."""
    import pandas as pd

    return pd.DataFrame(counts).set_index("task").reindex(columns=STAGE02_ENDINGS)


ENDING_COUNTS = ["answers t1", "t1 cut", "reflections", "reflection cut", "answers t2", "t2 cut"]


def eval_endings(predictions: Iterable[dict[str, Any]]) -> Any:
    """Stage 05 per variant and protocol: answers and reflections, and the share of each cut at the token
    limit (finish reason "length": the model was still writing). Oracle rows of a second grader repeat the
    first grader's turns where they were shared, so each (variant, protocol) counts its rows once per item."""
    import pandas as pd

    rows: dict[tuple[str, str], dict[str, int]] = {}
    seen: set[tuple[str, str, str, str]] = set()
    for row in predictions:
        key = (row["variant"], row["protocol"], row["task"], row["id"])
        if key in seen:
            continue
        seen.add(key)
        counts = rows.setdefault((row["variant"], row["protocol"]), dict.fromkeys(ENDING_COUNTS, 0))
        counts["answers t1"] += 1
        counts["t1 cut"] += (row["t1"] or {}).get("finish_reason") == "length"
        if row.get("reflection") is not None:
            counts["reflections"] += 1
            counts["reflection cut"] += row.get("reflection_finish_reason") == "length"
        if row.get("t2") is not None:
            counts["answers t2"] += 1
            counts["t2 cut"] += row["t2"].get("finish_reason") == "length"
    table = pd.DataFrame(
        [{"variant": variant, "protocol": protocol, **counts} for (variant, protocol), counts in rows.items()]
    )
    if table.empty:
        return pd.DataFrame(columns=["variant", "protocol", *ENDING_COUNTS])
    return table
