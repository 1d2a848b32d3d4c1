"""Accuracy tables, confidence intervals and paired tests over stage 05's predictions (method.md §6.2, §7).

    frame = prediction_frame(read_predictions("outputs/<run>/eval/predictions.jsonl"))
    summary = summarize(frame)                          # one row per variant x protocol x grader x task (+ "overall")
    paper_table(summary)                                # the paper's "Acc@t1 / Acc@t2 / Δ" layout
    compare_variants(frame, reference="base")           # every variant against the reference, with a verdict

The metrics (per group of items, e.g. one variant x protocol x grader x task):

* Acc@t1: share of items whose first answer is correct. Acc@t2: share whose *final* answer (the
  second attempt when there was one, else the first) is correct; this is the paper's Acc@t2, which
  counts a correct first answer as correct at t2 too. delta = Acc@t2 - Acc@t1.
* wrong_to_right / right_to_wrong: items whose outcome flipped. Under the paper's oracle protocol a
  first answer the gating grader accepted is never re-asked. Stage 05 runs the oracle once per grader,
  gated by it, and a row with a ``gate_grader`` is scored by that grader only (:func:`prediction_frame`),
  so in every oracle table right_to_wrong is 0 and Acc@t2 >= Acc@t1 by construction. Scored by another
  grader than the one that gated, neither would hold (an answer only the gating grader rejected can be
  reflected on and turn wrong). The oracle-free protocols can un-correct answers, and this count shows
  how often.
* parse failures and time-outs are counted apart from wrong answers (rates and counts at t1 and in
  the final answer), so a model that stops producing an answer is not mistaken for one that reasons
  badly. A variant with no second turn (``sft/qa_pairs``: final is None) has NaN for everything
  about t2.

Uncertainty: the test sets are small (the paper uses N=500 per task), so every accuracy gets a
percentile-bootstrap confidence interval. Items are resampled with replacement (``samples`` draws of
``n`` indices, vectorised as one index matrix); Acc@t1, Acc@t2 and delta come from the *same* draws,
so the delta interval is paired (it reflects the per-item changes, not two independent
accuracies). The "overall" row pools all tasks and resamples within each task (a stratified
bootstrap), so every draw keeps the real task mix. Each group's generator is seeded with
``derive_seed(seed, *group key)``: the same call gives the same intervals, and adding a group never
shifts another's.

Comparing two variants on the same items (:func:`paired_comparison`): the difference of accuracies
with a paired bootstrap interval, and the exact two-sided McNemar test on the discordant items
(A right and B wrong vs. A wrong and B right; a binomial test with p = 1/2, computed exactly with
integer binomial coefficients). A verdict says one variant beats the other only when both agree: the
interval excludes 0 and p < 1 - confidence. Otherwise it says no difference was *shown*, which is not
the same as the variants being equal.

:data:`PAPER_RESULTS` holds the paper's own main table (method.md §7) so that a run on the same base
model can be printed next to it (:func:`paper_reference`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from reflectevo.core.jsonl import read_jsonl
from reflectevo.core.seeds import derive_seed
from reflectevo.tasks import OUTCOMES

log = logging.getLogger(__name__)

FRAME_COLUMNS = [
    "variant",
    "protocol",
    "grader",
    "task",
    "id",
    "t1",
    "t2",
    "reflected",
    "answer_type",
    "level",
    "subject",
]
REQUIRED_KEYS = ("variant", "protocol", "task", "id", "t1", "reflected", "final")
BREAKDOWN_KEYS = ("answer_type", "level", "subject")
DEFAULT_BY = ("variant", "protocol", "grader", "task")
OVERALL = "overall"
COUNT_COLUMNS = [
    "n",
    "acc_t1",
    "acc_t2",
    "delta",
    "wrong_to_right",
    "right_to_wrong",
    "reflected",
    "parse_failures_t1",
    "parse_failures_t2",
    "timeouts_t1",
    "timeouts_t2",
]
CI_COLUMNS = ["acc_t1_low", "acc_t1_high", "acc_t2_low", "acc_t2_high", "delta_low", "delta_high"]
COMPARISON_FIELDS = [
    "n",
    "acc_a",
    "acc_b",
    "difference",
    "difference_low",
    "difference_high",
    "a_only",
    "b_only",
    "p_value",
    "verdict",
]
MAX_DRAWN = 4_000_000  # index-matrix elements drawn at once (bounds memory for very large groups)


# ---- predictions -> one long frame ------------------------------------------------------------
def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``predictions.jsonl`` file (errors name the file and line)."""

    return [row for _, row in read_jsonl(path)]


def _where(row: dict[str, Any]) -> str:
    return f"variant {row.get('variant')!r}, task {row.get('task')!r}, id {row.get('id')!r}"


def _outcome(value: Any, row: dict[str, Any], what: str) -> str:
    if value not in OUTCOMES:
        raise ValueError(f"prediction ({_where(row)}): {what} is {value!r}, expected one of {', '.join(OUTCOMES)}")
    return value


def _row_graders(row: dict[str, Any]) -> list[str]:
    t1 = row.get("t1")
    return [key for key, value in t1.items() if isinstance(value, dict)] if isinstance(t1, dict) else []


def prediction_frame(predictions: Iterable[dict[str, Any]], graders: Sequence[str] | None = None) -> Any:
    """One row per prediction per grader (a DataFrame with :data:`FRAME_COLUMNS`).

    ``t1`` is the first answer's outcome, ``t2`` the final answer's (None when the variant has no
    second turn), and answer_type / level / subject come from the row's ``breakdown`` (None when
    absent). ``graders`` defaults to every grader found in the rows' ``t1``; a row lacking one of them
    (or any required key) raises ``ValueError`` naming the row's variant, task and id. An oracle row
    with a ``gate_grader`` is scored by that grader only: who reflected was decided by it, and scoring
    the row by another grader would mix two gates in one table.
    """
    import pandas as pd

    rows = list(predictions)
    for row in rows:
        missing = [key for key in REQUIRED_KEYS if key not in row]
        if missing:
            raise ValueError(f"prediction ({_where(row)}) lacks required key(s): {', '.join(missing)}")
        if not isinstance(row["t1"], dict):
            raise TypeError(f"prediction ({_where(row)}): t1 must be an object, got {type(row['t1']).__name__}")
    if graders is None:
        graders = list(dict.fromkeys(grader for row in rows for grader in _row_graders(row)))
    records = []
    for row in rows:
        breakdown = row.get("breakdown") or {}
        final = row["final"]
        for grader in graders:
            if row["protocol"] == "oracle" and row.get("gate_grader") not in (None, grader):
                continue
            graded = row["t1"].get(grader)
            if not isinstance(graded, dict) or "outcome" not in graded:
                raise ValueError(
                    f"prediction ({_where(row)}): t1 has no outcome from grader {grader!r} "
                    f"(graders present: {', '.join(_row_graders(row)) or 'none'})"
                )
            t1 = _outcome(graded["outcome"], row, f"t1 outcome ({grader})")
            if final is None:
                t2 = None
            elif not isinstance(final, dict) or grader not in final:
                raise ValueError(f"prediction ({_where(row)}): final has no outcome from grader {grader!r}")
            else:
                t2 = _outcome(final[grader], row, f"final outcome ({grader})")
            records.append(
                {
                    "variant": str(row["variant"]),
                    "protocol": str(row["protocol"]),
                    "grader": grader,
                    "task": str(row["task"]),
                    "id": str(row["id"]),
                    "t1": t1,
                    "t2": t2,
                    "reflected": bool(row["reflected"]),
                    **{key: breakdown.get(key) for key in BREAKDOWN_KEYS},
                }
            )
    # object columns keep None as None (pandas would otherwise turn it into NaN in a string column)
    return pd.DataFrame(
        {
            column: pd.Series([record[column] for record in records], dtype=bool if column == "reflected" else object)
            for column in FRAME_COLUMNS
        },
        columns=FRAME_COLUMNS,
    )


# ---- bootstrap ----------------------------------------------------------------------------------
def _bootstrap_sums(strata: Sequence[Any], samples: int, rng: Any) -> tuple[Any, Any]:
    """Resample each stratum's items with replacement ``samples`` times; per draw, the number of items
    with bit 0 set and with bit 1 set in their code (bit 0 / bit 1 = the two outcomes being compared).
    The same index matrix serves both bits, so the two sums are paired."""
    import numpy as np

    first = np.zeros(samples, dtype=np.int64)
    second = np.zeros(samples, dtype=np.int64)
    for codes in strata:
        size = len(codes)
        chunk = max(1, MAX_DRAWN // max(size, 1))
        for start in range(0, samples, chunk):
            stop = min(samples, start + chunk)
            drawn = codes[rng.integers(0, size, size=(stop - start, size), dtype=np.int64)]
            first[start:stop] += (drawn & 1).sum(axis=1)
            second[start:stop] += (drawn >> 1).sum(axis=1)
    return first, second


def _interval(values: Any, confidence: float) -> tuple[float, float]:
    import numpy as np

    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _check_bootstrap(samples: int, confidence: float) -> None:
    if int(samples) != samples or samples < 0:
        raise ValueError(f"bootstrap_samples must be a whole number >= 0, got {samples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")


# ---- summaries ----------------------------------------------------------------------------------
def _summary_row(
    key: dict[str, Any], strata: Sequence[Any], samples: int, confidence: float, seed: Any
) -> dict[str, Any]:
    """The metrics of one group; ``strata`` are its parts resampled separately (one per task for "overall")."""
    import numpy as np
    import pandas as pd

    part = pd.concat(strata) if len(strata) > 1 else strata[0]
    t1 = part["t1"].to_numpy(dtype=object)
    t2 = part["t2"].to_numpy(dtype=object)
    has_t2 = bool(part["t2"].notna().any())  # a row lacking t2 in a group that has t2 counts as not correct
    right1 = t1 == "correct"
    right2 = t2 == "correct"
    n = len(part)
    nan = float("nan")
    row = {**key, "n": n, "acc_t1": float(right1.mean())}
    if has_t2:
        row.update(
            acc_t2=float(right2.mean()),
            delta=float(right2.mean() - right1.mean()),
            wrong_to_right=int((~right1 & right2).sum()),
            right_to_wrong=int((right1 & ~right2).sum()),
        )
    else:
        row.update(acc_t2=nan, delta=nan, wrong_to_right=nan, right_to_wrong=nan)
    row["reflected"] = int(part["reflected"].astype(bool).sum())
    row["parse_failures_t1"] = float((t1 == "parse_failure").mean())
    row["parse_failures_t2"] = float((t2 == "parse_failure").mean()) if has_t2 else nan
    row["timeouts_t1"] = int((t1 == "timeout").sum())
    row["timeouts_t2"] = int((t2 == "timeout").sum()) if has_t2 else nan
    row.update(dict.fromkeys(CI_COLUMNS, nan))
    if samples:
        rng = np.random.default_rng(derive_seed(seed, *key.values()))
        codes = [
            (s["t1"].to_numpy(dtype=object) == "correct").astype(np.int8)
            + 2 * (s["t2"].to_numpy(dtype=object) == "correct").astype(np.int8)
            for s in strata
        ]
        sum1, sum2 = _bootstrap_sums(codes, samples, rng)
        row["acc_t1_low"], row["acc_t1_high"] = _interval(sum1 / n, confidence)
        if has_t2:
            row["acc_t2_low"], row["acc_t2_high"] = _interval(sum2 / n, confidence)
            row["delta_low"], row["delta_high"] = _interval((sum2 - sum1) / n, confidence)
    return row


def _groups(frame: Any, keys: Sequence[str]) -> list[tuple[dict[str, Any], Any]]:
    """(key dict, rows) per group, in order of first appearance; None is a key value like any other."""
    if not keys:
        return [({}, frame)] if len(frame) else []
    groups = []
    for key, part in frame.groupby(list(keys), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        groups.append((dict(zip(keys, key)), part))
    return groups


def summarize(
    frame: Any,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: Any = 0,
    by: Sequence[str] = DEFAULT_BY,
    overall: bool = True,
) -> Any:
    """One row per group of ``by`` with the metrics of the module docstring and bootstrap intervals.

    With ``overall`` (and "task" in ``by``) each group of the other keys also gets a row with
    task="overall" that pools all its tasks (stratified bootstrap). Columns: the ``by`` keys,
    :data:`COUNT_COLUMNS`, :data:`CI_COLUMNS` (NaN when ``bootstrap_samples`` is 0).
    """
    import pandas as pd

    by = list(by)
    _check_bootstrap(bootstrap_samples, confidence)
    missing = [key for key in [*by, "t1", "t2", "reflected"] if key not in frame.columns]
    if missing:
        raise ValueError(f"summarize: the frame lacks column(s) {', '.join(missing)} (use prediction_frame)")
    rows = []
    if overall and "task" in by:
        outer = [key for key in by if key != "task"]
        for outer_key, part in _groups(frame, outer):
            tasks = _groups(part, ["task"])
            for task_key, task_part in tasks:
                key = {name: {**outer_key, **task_key}[name] for name in by}
                rows.append(_summary_row(key, [task_part], bootstrap_samples, confidence, seed))
            key = {name: OVERALL if name == "task" else outer_key[name] for name in by}
            rows.append(_summary_row(key, [task_part for _, task_part in tasks], bootstrap_samples, confidence, seed))
    else:
        for key, part in _groups(frame, by):
            rows.append(_summary_row(key, [part], bootstrap_samples, confidence, seed))
    return pd.DataFrame(rows, columns=[*by, *COUNT_COLUMNS, *CI_COLUMNS])


def breakdown(frame: Any, column: str, **summarize_kwargs: Any) -> Any:
    """:func:`summarize` per variant, protocol, grader, task and ``column`` (e.g. "answer_type" for
    BIG-bench multiple-choice vs. free-text items, "level" or "subject" for MATH), over the rows where
    ``column`` is not None; no "overall" rows."""
    if column not in frame.columns:
        raise ValueError(f"breakdown: no column {column!r} (known: {', '.join(map(str, frame.columns))})")
    return summarize(frame[frame[column].notna()], by=[*DEFAULT_BY, column], overall=False, **summarize_kwargs)


def transition_matrix(frame: Any) -> Any:
    """Counts of first-answer outcome (rows) x final outcome (columns), all four outcomes in
    :data:`OUTCOMES` order with zeros kept. Rows without a final outcome (no second turn) are left out.
    Meant for one variant / protocol / grader (filter first; otherwise items are counted once per grader)."""
    import pandas as pd

    rows = frame[frame["t2"].notna()]
    table = pd.crosstab(
        pd.Categorical(rows["t1"], categories=OUTCOMES), pd.Categorical(rows["t2"], categories=OUTCOMES), dropna=False
    )
    table = table.reindex(index=list(OUTCOMES), columns=list(OUTCOMES), fill_value=0).astype(int)
    table.index.name, table.columns.name = "t1", "t2"
    return table


# ---- paired tests -------------------------------------------------------------------------------
def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test on paired outcomes: with b = #(A right, B wrong) and
    c = #(A wrong, B right), p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c))), exact integer
    arithmetic; p = 1 when no item is discordant. Returns n, a_only (= b), b_only (= c), p_value."""
    import numpy as np

    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"mcnemar: the two outcome lists must be paired (same length), got {a.shape} and {b.shape}")
    a_only = int((a & ~b).sum())
    b_only = int((~a & b).sum())
    discordant = a_only + b_only
    if discordant == 0:
        p_value = 1.0
    else:
        tail = sum(math.comb(discordant, k) for k in range(min(a_only, b_only) + 1))
        p_value = min(1.0, 2 * tail / 2**discordant)
    return {"n": len(a), "a_only": a_only, "b_only": b_only, "p_value": float(p_value)}


def _signed(value: float) -> str:
    return f"{value + 0.0:+.3f}"


def _verdict(a: str, b: str, low: float, high: float, difference: float, p_value: float, confidence: float) -> str:
    """Who wins: both the bootstrap interval (when computed) and McNemar must agree."""
    alpha = 1.0 - confidence
    has_ci = not (math.isnan(low) or math.isnan(high))
    evidence = (
        f"{confidence:.0%} paired-bootstrap CI of the difference [{_signed(low)}, {_signed(high)}], "
        if has_ci
        else "no bootstrap interval, "
    )
    evidence += f"exact McNemar p = {p_value:.3g}"
    significant = p_value < alpha
    if significant and (low > 0 if has_ci else difference > 0):
        return f"{a} beats {b} ({evidence})"
    if significant and (high < 0 if has_ci else difference < 0):
        return f"{b} beats {a} ({evidence})"
    return f"no difference shown between {a} and {b} ({evidence})"


def _has_t2(frame: Any) -> bool:
    return bool(frame["t2"].notna().any())


def paired_comparison(
    frame: Any,
    a: str,
    b: str,
    *,
    protocol: str,
    grader: str,
    task: str | None = None,
    metric: str = "t2",
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: Any = 0,
) -> dict[str, Any]:
    """Variant ``a`` against variant ``b`` on the items both answered (same task and id), under one
    protocol and grader, one task or (task None) all tasks pooled with a task-stratified bootstrap.
    ``metric`` "t1" compares first answers, "t2" final answers. Returns n, acc_a, acc_b, difference
    (a - b), difference_low/high (paired bootstrap), a_only, b_only, p_value (exact McNemar) and a
    verdict: "<a> beats <b>" / "<b> beats <a>" when the interval excludes 0 on that side and
    p < 1 - confidence (with bootstrap_samples=0: McNemar and the sign of the difference), else
    "no difference shown between <a> and <b>", followed by the interval and p-value in parentheses."""
    import numpy as np

    if metric not in ("t1", "t2"):
        raise ValueError(f"metric must be 't1' or 't2', got {metric!r}")
    _check_bootstrap(bootstrap_samples, confidence)
    where = f"protocol {protocol!r}, grader {grader!r}" + (f", task {task!r}" if task is not None else "")
    rows = frame[(frame["protocol"] == protocol) & (frame["grader"] == grader)]
    if task is not None:
        rows = rows[rows["task"] == task]
    sides = {}
    for name in (a, b):
        side = rows[rows["variant"] == name]
        if not len(side):
            present = ", ".join(map(str, dict.fromkeys(rows["variant"]))) or "none"
            raise ValueError(
                f"paired_comparison: variant {name!r} has no predictions for {where} (variants: {present})"
            )
        if metric == "t2" and not _has_t2(side):
            raise ValueError(
                f"paired_comparison: variant {name!r} has no second turn (t2 is None), so metric 't2' "
                f"cannot compare it; use metric='t1'"
            )
        sides[name] = side[["task", "id", metric]]
    joined = sides[a].merge(sides[b], on=["task", "id"], how="inner", suffixes=("_a", "_b"), validate="one_to_one")
    if not len(joined):
        raise ValueError(f"paired_comparison: variants {a!r} and {b!r} share no items (task, id) for {where}")
    right_a = (joined[f"{metric}_a"] == "correct").to_numpy(dtype=bool)
    right_b = (joined[f"{metric}_b"] == "correct").to_numpy(dtype=bool)
    n = len(joined)
    result: dict[str, Any] = {"n": n, "acc_a": float(right_a.mean()), "acc_b": float(right_b.mean())}
    result["difference"] = result["acc_a"] - result["acc_b"]
    low = high = float("nan")
    if bootstrap_samples:
        codes = right_a.astype(np.int8) + 2 * right_b.astype(np.int8)
        tasks = joined["task"].to_numpy(dtype=object)
        strata = [codes[tasks == name] for name in dict.fromkeys(tasks)]
        rng = np.random.default_rng(derive_seed(seed, "paired", a, b, protocol, grader, task or OVERALL, metric))
        sum_a, sum_b = _bootstrap_sums(strata, bootstrap_samples, rng)
        low, high = _interval((sum_a - sum_b) / n, confidence)
    result["difference_low"], result["difference_high"] = low, high
    test = mcnemar(right_a, right_b)
    result.update(a_only=test["a_only"], b_only=test["b_only"], p_value=test["p_value"])
    result["verdict"] = _verdict(a, b, low, high, result["difference"], test["p_value"], confidence)
    return result


def compare_variants(
    frame: Any,
    reference: str = "base",
    *,
    metric: str = "t2",
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: Any = 0,
) -> Any:
    """:func:`paired_comparison` of every other variant (as ``a``) against ``reference`` (as ``b``),
    per protocol x grader, over all tasks ("overall") and per task. With metric "t2", variants with no
    second turn are skipped; so are a protocol/grader without the reference and tasks (or variants)
    that share no items with it. Columns: variant, reference, protocol, grader, task, then :data:`COMPARISON_FIELDS`."""
    import pandas as pd

    if reference not in set(frame["variant"]):
        raise ValueError(
            f"compare_variants: reference variant {reference!r} is not in the predictions "
            f"(variants: {', '.join(map(str, dict.fromkeys(frame['variant'])))})"
        )
    options = {"metric": metric, "bootstrap_samples": bootstrap_samples, "confidence": confidence, "seed": seed}
    rows = []
    for key, part in _groups(frame, ["protocol", "grader"]):
        reference_rows = part[part["variant"] == reference]
        if not len(reference_rows) or (metric == "t2" and not _has_t2(reference_rows)):
            log.info("compare_variants: no %s rows usable as reference for %s", reference, key)
            continue
        for variant, rows_a in _groups(part[part["variant"] != reference], ["variant"]):
            name = variant["variant"]
            if metric == "t2" and not _has_t2(rows_a):
                continue
            shared = rows_a[["task", "id"]].merge(reference_rows[["task", "id"]], on=["task", "id"])
            if not len(shared):
                log.info("compare_variants: %s and %s share no items under %s", name, reference, key)
                continue
            pair = part[part["variant"].isin([name, reference])]
            for task in [None, *dict.fromkeys(shared["task"])]:
                result = paired_comparison(pair, name, reference, task=task, **key, **options)
                rows.append({"variant": name, "reference": reference, **key, "task": task or OVERALL, **result})
    return pd.DataFrame(rows, columns=["variant", "reference", "protocol", "grader", "task", *COMPARISON_FIELDS])


# ---- the paper's table --------------------------------------------------------------------------
SETTINGS = {  # variant name -> the paper's row label, in the paper's row order
    "retry": "Prompt, w/o reflection",
    "base": "Prompt, w/ reflection",
    "sft/qa_pairs": "SFT on QA pairs",
    "sft/one_stage": "One-stage SFT w/ D+",
    "sft/two_stage": "Two-stage SFT w/ D+",
    "dpo/d_pm": "DPO w/ D±",
    "dpo/d_pref": "DPO w/ Dpref",
}
PAPER_TASKS = ("logiqa", "math", "mbpp", "bigbench")
DASH = "—"

# The paper's main table (method.md §7): oracle protocol, official graders, N=500 test items per task.
# Per model, variant and task: (Acc@t1, Acc@t2, delta) in percent / points; None where the paper has "—"
# (no second turn for SFT on QA pairs; Mistral's MATH self-training rows are not reported at all).
_NOT_REPORTED = (None, None, None)
PAPER_RESULTS: dict[str, dict[str, dict[str, tuple[float | None, float | None, float | None]]]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        "retry": {
            "logiqa": (30.2, 38.8, 8.6),
            "math": (14.4, 15.0, 0.6),
            "mbpp": (28.4, 44.0, 15.6),
            "bigbench": (38.2, 52.4, 14.2),
        },
        "base": {
            "logiqa": (30.2, 36.2, 6.0),
            "math": (14.4, 16.0, 1.6),
            "mbpp": (28.4, 45.8, 17.4),
            "bigbench": (38.2, 51.0, 12.8),
        },
        "sft/qa_pairs": {
            "logiqa": (46.6, None, None),
            "math": (10.0, None, None),
            "mbpp": (31.2, None, None),
            "bigbench": (61.6, None, None),
        },
        "sft/one_stage": {
            "logiqa": (30.2, 43.8, 13.6),
            "math": (14.4, 23.6, 9.2),
            "mbpp": (28.4, 29.6, 1.2),
            "bigbench": (38.2, 71.2, 33.0),
        },
        "sft/two_stage": {
            "logiqa": (30.2, 49.4, 19.2),
            "math": (14.4, 14.5, 0.1),
            "mbpp": (28.4, 42.4, 14.0),
            "bigbench": (38.2, 45.4, 7.2),
        },
        "dpo/d_pm": {
            "logiqa": (30.2, 41.8, 11.6),
            "math": (14.4, 15.2, 0.8),
            "mbpp": (28.4, 48.8, 20.4),
            "bigbench": (38.2, 63.0, 24.8),
        },
        "dpo/d_pref": {
            "logiqa": (30.2, 39.2, 9.0),
            "math": (14.4, 14.8, 0.4),
            "mbpp": (28.4, 47.4, 19.0),
            "bigbench": (38.2, 59.6, 21.4),
        },
    },
    "mistralai/Mistral-7B-Instruct-v0.2": {
        "retry": {
            "logiqa": (28.8, 31.2, 2.4),
            "math": (9.2, 10.6, 1.4),
            "mbpp": (20.4, 23.0, 2.6),
            "bigbench": (36.6, 43.8, 7.2),
        },
        "base": {
            "logiqa": (28.8, 34.2, 5.4),
            "math": (9.2, 10.2, 1.0),
            "mbpp": (20.4, 23.6, 3.2),
            "bigbench": (36.6, 44.4, 7.8),
        },
        "sft/qa_pairs": {
            "logiqa": (28.8, None, None),
            "math": (7.6, None, None),
            "mbpp": (17.0, None, None),
            "bigbench": (37.8, None, None),
        },
        "sft/one_stage": {
            "logiqa": (28.8, 38.4, 9.6),
            "math": _NOT_REPORTED,
            "mbpp": (20.4, 24.0, 3.6),
            "bigbench": (36.6, 51.6, 15.0),
        },
        "sft/two_stage": {
            "logiqa": (28.8, 48.8, 20.0),
            "math": _NOT_REPORTED,
            "mbpp": (20.4, 20.8, 0.4),
            "bigbench": (36.6, 71.1, 34.5),
        },
        "dpo/d_pm": {
            "logiqa": (28.8, 39.2, 10.4),
            "math": _NOT_REPORTED,
            "mbpp": (20.4, 23.2, 2.8),
            "bigbench": (36.6, 50.2, 13.6),
        },
        "dpo/d_pref": {
            "logiqa": (28.8, 38.0, 9.2),
            "math": _NOT_REPORTED,
            "mbpp": (20.4, 22.6, 2.2),
            "bigbench": (36.6, 48.4, 11.8),
        },
    },
}
# Accepted last path components per paper model (compared case-insensitively): the Hub name itself
# and Unsloth's copies of the same weights (plain and 4-bit).
MODEL_ALIASES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": (
        "meta-llama-3-8b-instruct",
        "llama-3-8b-instruct",
        "llama-3-8b-instruct-bnb-4bit",
    ),
    "mistralai/Mistral-7B-Instruct-v0.2": ("mistral-7b-instruct-v0.2", "mistral-7b-instruct-v0.2-bnb-4bit"),
}


def format_cell(t1: float | None, t2: float | None, delta: float | None) -> str:
    """The paper's "Acc@t1 / Acc@t2 / Δ" cell from percentages: "30.2 / 38.8 / +8.6", "46.6 / — / —",
    and "—" when nothing was reported."""

    def number(value: float | None, signed: bool = False) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return DASH
        value = round(float(value), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
        return f"{value:+.1f}" if signed else f"{value:.1f}"

    parts = [number(t1), number(t2), number(delta, signed=True)]
    return DASH if all(part == DASH for part in parts) else " / ".join(parts)


def format_shares(t1: float | None, t2: float | None, delta: float | None) -> str:
    """:func:`format_cell` from shares (0.302, as summary.csv holds them); None and NaN are not reported."""
    return format_cell(*(None if share is None else 100 * share for share in (t1, t2, delta)))  # NaN stays NaN


def _setting_order(variants: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(variants))
    return [name for name in SETTINGS if name in present] + [name for name in present if name not in SETTINGS]


def paper_table(
    summary: Any, *, protocol: str = "oracle", grader: str = "official", tasks: Sequence[str] | None = None
) -> Any:
    """A :func:`summarize` result in the paper's layout: one row per setting (SETTINGS order and
    labels; unknown variants after them under their own name), one column per task (``tasks`` in the
    order given, else as they appear, then "overall" when the summary has it), cells from
    :func:`format_cell` in percent ("—" where a variant has no row for a task)."""
    import pandas as pd

    rows = summary[(summary["protocol"] == protocol) & (summary["grader"] == grader)]
    if not len(rows):
        raise ValueError(
            f"paper_table: no summary rows for protocol {protocol!r} and grader {grader!r} "
            f"(protocols: {', '.join(map(str, dict.fromkeys(summary['protocol'])))}; "
            f"graders: {', '.join(map(str, dict.fromkeys(summary['grader'])))})"
        )
    if rows.duplicated(["variant", "task"]).any():
        raise ValueError("paper_table: several summary rows per variant and task; summarize with the default `by`")
    columns = list(tasks) if tasks is not None else [task for task in dict.fromkeys(rows["task"]) if task != OVERALL]
    if OVERALL in set(rows["task"]) and OVERALL not in columns:
        columns.append(OVERALL)
    cells = {
        (row.variant, row.task): format_shares(row.acc_t1, row.acc_t2, row.delta)
        for row in rows.itertuples(index=False)
    }
    variants = _setting_order(rows["variant"])
    return pd.DataFrame(
        [[cells.get((variant, task), DASH) for task in columns] for variant in variants],
        index=pd.Index([SETTINGS.get(variant, variant) for variant in variants], name="setting"),
        columns=columns,
    )


def paper_model(model_name: str) -> str | None:
    """The key of :data:`PAPER_RESULTS` naming the same base model as ``model_name``, else None. Only
    the last path component counts ("meta-llama/Meta-Llama-3-8B-Instruct", "unsloth/llama-3-8b-Instruct"
    or a local folder of that name), compared case-insensitively with :data:`MODEL_ALIASES`."""
    last = str(model_name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].casefold()
    return next((key for key, aliases in MODEL_ALIASES.items() if last in aliases), None)


def paper_reference(model_name: str) -> Any:
    """The paper's main table for the base model ``model_name`` names (same layout and cells as
    :func:`paper_table`, columns = the four tasks), or None when the paper did not report that model."""
    import pandas as pd

    key = paper_model(model_name)
    if key is None:
        return None
    results = PAPER_RESULTS[key]
    return pd.DataFrame(
        [[format_cell(*results[variant][task]) for task in PAPER_TASKS] for variant in SETTINGS],
        index=pd.Index(list(SETTINGS.values()), name="setting"),
        columns=list(PAPER_TASKS),
    )
