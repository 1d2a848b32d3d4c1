"""Stage 05: tables and result files of every variant; what notebook 05 and `reflectevo eval` call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflectevo import prompts
from reflectevo.config import (
    BASELINES,
    Params,
    training_test_mismatches,
)
from reflectevo.core.files import atomic_write_json, atomic_write_text
from reflectevo.core.jsonl import write_jsonl_atomic
from reflectevo.core.markdown import markdown_table
from reflectevo.data.prepare import check_eval_splits, prepare_data
from reflectevo.errors import EvaluationError
from reflectevo.evaluation import metrics
from reflectevo.evaluation.evaluator import PREDICTIONS_FILE, Evaluator, make_evaluator, oracle_graders
from reflectevo.evaluation.variants import BASE, Variant, make_variant
from reflectevo.models.loading import adapter_folder
from reflectevo.tasks import Item, get_task


def pick_example(predictions: Sequence[dict[str, Any]], variant: str = BASE) -> list[dict[str, Any]]:
    """One question under every protocol for ``variant``: preferably one whose first answer was wrong and
    whose final answer differs between protocols (it shows the most), else any that was reflected on."""
    by_item: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in predictions:
        if row["variant"] == variant:
            by_item.setdefault((row["task"], row["id"]), []).append(row)

    def score(rows: list[dict[str, Any]]) -> int:
        finals = {str(row["final"]) for row in rows}
        return 2 * (len(finals) > 1) + any(row["reflected"] for row in rows)

    return max(by_item.values(), key=score) if by_item else []


def format_example(rows: Sequence[dict[str, Any]], grader: str = "official", max_chars: int = 500) -> str:
    """A question, its first answer, then per protocol: the gate, the reflection and the second answer."""

    def clip(text: str | None) -> str:
        text = (text or "").strip()
        return text if len(text) <= max_chars else text[:max_chars] + " ..."

    if not rows:
        return "(no predictions)"
    first = rows[0]
    lines = [
        f"[{first['task']} / {first['id']}]  gold: {clip(first['gold'])}",
        f"QUESTION\n{clip(first['question'])}",
        f"FIRST ANSWER ({first['t1'][grader]['outcome']})\n{clip(first['t1']['text'])}",
    ]
    for row in rows:
        gate = row["gate"]
        protocol = row["protocol"] + (f" gated by {row['gate_grader']}" if row.get("gate_grader") else "")
        lines.append(
            f"--- protocol {protocol}: reflected: {row['reflected']} (gate: {gate['by']}"
            + (f", self-verdict {gate['self_verdict']}" if gate["by"] == "self_verify" else "")
            + ")"
        )
        if row["reflection"] is not None:
            lines.append(f"REFLECTION\n{clip(row['reflection'])}")
        if row["t2"] is not None:
            lines.append(f"SECOND ANSWER ({row['t2'][grader]['outcome']})\n{clip(row['t2']['text'])}")
    return "\n\n".join(lines)


# ---- the tables and files of stage 05 -------------------------------------------------------------
@dataclass
class EvalTables:
    """Every table stage 05 reports, computed from the predictions by :mod:`reflectevo.metrics`."""

    frame: Any  # one row per prediction and grader
    summary: Any  # per variant x protocol x grader x task (+ overall): accuracies, flips, parse failures, CIs
    comparisons: Any  # every variant against ``base`` on the same items: difference, CI, McNemar, verdict
    paper: dict[tuple[str, str], Any]  # (protocol, grader) -> the paper's layout
    breakdowns: dict[str, Any]  # "answer_type" (BIG-bench), "level" and "subject" (MATH)
    transitions: Any  # long: variant, protocol, grader, t1 outcome, final outcome, items
    excluded_tasks: list[str] = field(default_factory=list)  # tasks of data.tasks left out (data.allow_empty_eval)

    def paper_view(self, protocol: str, grader: str) -> Any:
        return self.paper[(protocol, grader)]


def compute_tables(
    predictions: Sequence[dict[str, Any]], params: Params, *, excluded_tasks: Sequence[str] = ()
) -> EvalTables:
    """Every table of stage 05. ``excluded_tasks`` (tasks of ``data.tasks`` with no eval items, left out
    where ``data.allow_empty_eval`` allows it) are named on every ``overall`` row of the summary, whose
    pool they are not in, and under every paper-layout table."""
    import pandas as pd

    ev = params.eval
    frame = metrics.prediction_frame(predictions, graders=ev.graders)
    options = {"bootstrap_samples": ev.bootstrap_samples, "confidence": ev.confidence, "seed": params.run.seed}
    summary = metrics.summarize(frame, **options)
    if excluded_tasks:
        summary["tasks_left_out"] = [
            ", ".join(excluded_tasks) if task == metrics.OVERALL else "" for task in summary["task"]
        ]
    comparisons = (
        metrics.compare_variants(frame, reference=BASE, **options)
        if BASE in set(frame["variant"])
        else pd.DataFrame(columns=["variant", "reference", "protocol", "grader", "task", *metrics.COMPARISON_FIELDS])
    )
    paper = {
        (protocol, grader): metrics.paper_table(summary, protocol=protocol, grader=grader)
        for protocol in dict.fromkeys(frame["protocol"])
        for grader in dict.fromkeys(frame["grader"])
    }
    breakdowns = {
        column: metrics.breakdown(frame, column, **options)
        for column in metrics.BREAKDOWN_KEYS
        if frame[column].notna().any()
    }
    rows = []
    for (variant, protocol, grader), part in frame.groupby(["variant", "protocol", "grader"], sort=False):
        if part["t2"].isna().all():
            continue
        matrix = metrics.transition_matrix(part)
        rows += [
            {"variant": variant, "protocol": protocol, "grader": grader, "t1": t1, "final": t2, "items": int(count)}
            for t1, counts in matrix.iterrows()
            for t2, count in counts.items()
        ]
    transitions = pd.DataFrame(rows, columns=["variant", "protocol", "grader", "t1", "final", "items"])
    return EvalTables(frame, summary, comparisons, paper, breakdowns, transitions, list(excluded_tasks))


def eval_record(
    params: Params,
    variants: Sequence[Variant],
    items_by_task: dict[str, list[Item]],
    evaluator: Evaluator | None = None,
    *,
    excluded_tasks: Sequence[str] = (),
) -> dict[str, Any]:
    """What produced the numbers: protocols, graders, roles, prompt versions and texts, seed, bootstrap."""

    ev = params.eval
    return {
        "split": ev.split,
        "items": {task: len(rows) for task, rows in items_by_task.items()},
        "excluded_tasks": list(excluded_tasks),  # in data.tasks, no eval items, left out (data.allow_empty_eval)
        "protocols": ev.protocols,
        "graders": ev.graders,
        # the oracle ran once per grader, gated by it; its tables score each run by its own grader only
        "oracle_graders": oracle_graders(params),
        "attempt_calls": ev.attempt_calls,
        "attempt_prefill": ev.attempt_prefill,
        # settings where training and test inputs differ because the recipe says so (eval.allow_mismatch)
        "allowed_mismatches": training_test_mismatches(params, allowed=True),
        "roles": {variant.name: variant.roles() for variant in variants},
        "adapters": {
            variant.name: str(ref.adapter)
            for variant in variants
            for ref in (variant.reflector, variant.first_turn)
            if ref is not None and ref.adapter is not None
        },
        "second_trial": ev.second_trial,
        "fewshots": ev.fewshots,
        "seed": params.run.seed,
        "generation": {
            "temperature": params.generation.temperature,
            "top_p": params.generation.top_p,
            "max_new_tokens": ev.max_new_tokens,
            "reflection_max_new_tokens": ev.reflection_max_new_tokens,
        },
        "bootstrap_samples": ev.bootstrap_samples,
        "confidence": ev.confidence,
        "versions": {
            "tasks": {task: get_task(task).version for task in items_by_task},
            "prompts": prompts.PROMPT_VERSION,
            "reflection": prompts.REFLECTION_VERSION,
            "review": prompts.REVIEW_VERSION,
        },
        "oracle_free_wording": {
            "review": prompts.REVIEW_INTRO,
            "review_header": prompts.REVIEW_HEADER,
            "previous_attempt": prompts.PREVIOUS_ATTEMPT,
            "self_verify": prompts.SELF_VERIFY_INTRO,
        },
        "models": evaluator.pool.describe() if evaluator is not None else None,
    }  # no wall-clock times: results.json is byte-identical across reruns (the times go to the manifest)


def write_results(
    out_dir: Path, predictions: Sequence[dict[str, Any]], tables: EvalTables, record: dict[str, Any]
) -> list[Path]:
    """Write the predictions and every table (CSV, the paper's layout also as Markdown) into ``out_dir``,
    each file whole (written to a temporary name, then renamed)."""

    out_dir = Path(out_dir)
    written = [write_jsonl_atomic(out_dir / PREDICTIONS_FILE, predictions)]
    for name, table in (
        ("summary", tables.summary),
        ("comparisons", tables.comparisons),
        ("transitions", tables.transitions),
        *((f"breakdown_{column}", table) for column, table in tables.breakdowns.items()),
    ):
        written.append(atomic_write_text(out_dir / f"{name}.csv", table.to_csv(index=False)))
    for (protocol, grader), table in tables.paper.items():
        stem = out_dir / f"paper_table_{protocol}_{grader}"
        written.append(atomic_write_text(stem.with_suffix(".csv"), table.to_csv()))
        note = (
            f"\nLeft out, with no {record['split']} items (data.allow_empty_eval): {', '.join(tables.excluded_tasks)}.\n"
            if tables.excluded_tasks
            else ""
        )
        written.append(atomic_write_text(stem.with_suffix(".md"), markdown_table(table) + "\n" + note))
    written.append(
        atomic_write_json(out_dir / "results.json", {**record, "summary": tables.summary.to_dict(orient="records")})
    )
    return written


# ---- `reflectevo eval`: any model or adapter, without the rest of the pipeline ----------------------
def slug(text: str) -> str:
    """A folder name for a model id or path: its last two components, other characters as '-'."""
    import re

    parts = [part for part in str(text).replace("\\", "/").split("/") if part and part != "adapter"][-2:]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-") or "model"


def evaluate_model(
    params: Params,
    *,
    adapter: str | None = None,
    adapter_as: str = "sft/two_stage",
    variants: Sequence[str] | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
) -> tuple[Path, EvalTables]:
    """Evaluate ``params.model`` (and an adapter, playing the roles of the variant ``adapter_as``) on the
    ``eval.split`` items of ``data.tasks``, split exactly as stage 01 would split them, and write the
    results to ``out_dir`` (default ``outputs/<run>/eval-standalone/<model>[-<adapter>]``)."""

    if adapter is not None:
        adapter_path = adapter_folder(adapter)  # checked before anything loads
        if adapter_as not in (*(f"sft/{m}" for m in ("one_stage", "two_stage", "qa_pairs")), "dpo/d_pm", "dpo/d_pref"):
            raise EvaluationError(
                f"--adapter-as must be a trained variant kind (sft/one_stage, sft/two_stage, sft/qa_pairs, "
                f"dpo/d_pm, dpo/d_pref), got {adapter_as!r}"
            )
    names = list(variants) if variants else [*BASELINES, *([adapter_as] if adapter else [])]
    plan = []
    for name in names:
        if name in BASELINES:
            plan.append(make_variant(params, name))
        elif adapter is not None and name == adapter_as:
            plan.append(make_variant(params, name, adapter_path))
        else:
            raise EvaluationError(
                f"variant {name!r} is neither a baseline ({', '.join(BASELINES)}) nor the adapter's "
                f"role ({adapter_as if adapter else 'no --adapter given'})"
            )
    data = prepare_data(params.data, params.run.seed)
    excluded = check_eval_splits(data, params)  # a task without eval items stops here, unless allowed
    items = {task: task_data.splits[params.eval.split] for task, task_data in data.items() if task not in excluded}
    if out_dir is None:
        out_dir = (
            params.run_dir / "eval-standalone" / (slug(params.model.name) + (f"-{slug(adapter)}" if adapter else ""))
        )
    out_dir = Path(out_dir)
    evaluator = make_evaluator(params, out_dir / "generations", progress=progress)
    predictions = evaluator.run(plan, items)
    tables = compute_tables(predictions, params, excluded_tasks=excluded)
    write_results(out_dir, predictions, tables, eval_record(params, plan, items, evaluator, excluded_tasks=excluded))
    return out_dir, tables
