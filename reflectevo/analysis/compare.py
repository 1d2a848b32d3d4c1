"""Several runs side by side: their headline tables, the params that differ, paired tests on shared items.

    comparison = compare_runs(["outputs/quickstart", "outputs/quickstart-3shot"])
    comparison.headline          # Acc@t1 / Acc@t2 / Δ (%) overall, one column per run
    comparison.params            # every params key whose value differs between the runs
    comparison.paired            # each later run against the first, per variant x protocol x grader
    print(comparison.to_markdown())

A paired test needs the same questions on both sides. An item is its task, id, question and gold
answer (a digest of the four), so two runs whose `id`s coincide on different data are not paired by
accident. Runs evaluated on different items are refused unless ``allow_different_items`` is set; then
the paired tests use the items both runs answered, and every table says the items differ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflectevo.core.files import atomic_write_text
from reflectevo.core.markdown import markdown_table
from reflectevo.core.seeds import canonical_hash
from reflectevo.errors import DataError, EvaluationError
from reflectevo.evaluation.metrics import (
    COMPARISON_FIELDS,
    DASH,
    OVERALL,
    format_shares,
    paired_comparison,
    prediction_frame,
    read_predictions,
)
from reflectevo.runs.plan import read_manifest

SUMMARY = Path("eval") / "summary.csv"
PREDICTIONS = Path("eval") / "predictions.jsonl"
MISSING = DASH  # a params key one run does not have, or a headline row one run did not evaluate
PAIRED_COLUMNS = ["variant", "protocol", "grader", "metric", "run_a", "run_b", *COMPARISON_FIELDS]


class RunsDifferError(EvaluationError):
    """The runs were evaluated on different test items and the caller did not allow it."""


@dataclass
class RunResults:
    """What a comparison reads of one run folder (or one round's folder of a self-evolution run)."""

    label: str
    path: Path
    params: dict[str, Any]
    summary: Any  # stage 05's summary.csv
    predictions: list[dict[str, Any]]

    @property
    def items(self) -> set[str]:
        return {item_key(row) for row in self.predictions}


def item_key(row: dict[str, Any]) -> str:
    """One test item: its task, id, question and gold answer (a digest, so equal ids on other data differ)."""
    return canonical_hash([row.get("task"), row.get("id"), row.get("question"), row.get("gold")])


def read_run_results(run_dir: str | Path, label: str | None = None) -> RunResults:
    """A run's params (from its manifest) and stage 05's summary and predictions; the error says what is
    missing and which command produces it."""
    import pandas as pd

    path = Path(run_dir)
    if not path.is_dir():
        raise DataError(f"{path}: no such run folder (give the folder a run wrote, e.g. outputs/quickstart)")
    manifest = read_manifest(path)
    if not manifest:
        raise DataError(f"{path}: no manifest.json, so this is not a run folder (e.g. outputs/quickstart)")
    missing = [str(path / name) for name in (SUMMARY, PREDICTIONS) if not (path / name).is_file()]
    if missing:
        rounds = sorted(p.name for p in path.glob("round_*") if (p / SUMMARY).is_file())
        hint = (
            f"; this run has rounds, compare one of them: {', '.join(str(path / r) for r in rounds)}"
            if rounds
            else "; run its stage 05 first (reflectevo run PARAMS --stages 05)"
        )
        raise DataError(f"{path}: no evaluation results ({', '.join(missing)} missing){hint}")
    predictions = read_predictions(path / PREDICTIONS)
    if not predictions:
        raise DataError(f"{path / PREDICTIONS}: no predictions; rerun its stage 05")
    return RunResults(
        label=label or str(manifest.get("run") or path.name),
        path=path,
        params=manifest.get("params") or {},
        summary=pd.read_csv(path / SUMMARY),
        predictions=predictions,
    )


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"eval": {"graders": [...]}}`` -> ``{"eval.graders": [...]}`` (lists stay whole: they are one setting)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def params_differences(runs: Sequence[RunResults]) -> Any:
    """One row per params key whose value differs between the runs (``run.name`` included), one column per
    run; a key one run lacks shows as "—"."""
    import pandas as pd

    flat = [flatten(run.params) for run in runs]
    keys = sorted(set().union(*flat))
    rows = []
    for key in keys:
        values = [_shown(f[key]) if key in f else MISSING for f in flat]
        if len(set(values)) > 1:
            rows.append({"key": key, **{run.label: value for run, value in zip(runs, values)}})
    return pd.DataFrame(rows, columns=["key", *(run.label for run in runs)])


def headline_table(runs: Sequence[RunResults], task: str = OVERALL) -> Any:
    """Acc@t1 / Acc@t2 / Δ (%) of ``task`` ("overall": all tasks pooled), one row per variant x protocol x
    grader found in any run, one column per run ("—" where a run did not evaluate that row)."""
    import pandas as pd

    cells: dict[tuple[str, str, str], dict[str, str]] = {}
    for run in runs:
        rows = run.summary[run.summary["task"] == task]
        for row in rows.itertuples(index=False):
            key = (row.variant, row.protocol, row.grader)
            cells.setdefault(key, {})[run.label] = format_shares(row.acc_t1, row.acc_t2, row.delta)
    rows = [
        {
            "variant": v,
            "protocol": p,
            "grader": g,
            **{run.label: cells[(v, p, g)].get(run.label, MISSING) for run in runs},
        }
        for (v, p, g) in cells
    ]
    return pd.DataFrame(rows, columns=["variant", "protocol", "grader", *(run.label for run in runs)])


def paired_tests(
    runs: Sequence[RunResults],
    shared: set[str],
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: Any = 0,
) -> Any:
    """Each later run (a) against the first (b), per variant x protocol x grader both evaluated, on the
    ``shared`` items: Acc@t2 when both have a second turn, else Acc@t1 (``metric`` says which)."""
    import pandas as pd

    def frame_of(run: RunResults) -> Any:
        rows = [row for row in run.predictions if item_key(row) in shared]
        return prediction_frame(rows)

    reference = runs[0]
    reference_frame = frame_of(reference)
    results = []
    for other in runs[1:]:
        other_frame = frame_of(other)
        groups = sorted(
            set(map(tuple, reference_frame[["variant", "protocol", "grader"]].drop_duplicates().to_numpy()))
            & set(map(tuple, other_frame[["variant", "protocol", "grader"]].drop_duplicates().to_numpy()))
        )
        for variant, protocol, grader in groups:
            sides = []
            for run, frame in ((other, other_frame), (reference, reference_frame)):
                side = frame[
                    (frame["variant"] == variant) & (frame["protocol"] == protocol) & (frame["grader"] == grader)
                ]
                sides.append(side.assign(variant=run.label))
            both_t2 = all(side["t2"].notna().any() for side in sides)
            metric = "t2" if both_t2 else "t1"
            test = paired_comparison(
                pd.concat(sides, ignore_index=True),
                other.label,
                reference.label,
                protocol=protocol,
                grader=grader,
                metric=metric,
                bootstrap_samples=bootstrap_samples,
                confidence=confidence,
                seed=[seed, variant],
            )
            results.append(
                {
                    "variant": variant,
                    "protocol": protocol,
                    "grader": grader,
                    "metric": metric,
                    "run_a": other.label,
                    "run_b": reference.label,
                    **test,
                }
            )
    return pd.DataFrame(results, columns=PAIRED_COLUMNS)


@dataclass
class RunComparison:
    runs: list[RunResults]
    headline: Any
    params: Any
    paired: Any
    items: dict[str, int]  # run label -> test items it answered
    shared_items: int
    items_differ: bool
    per_task: dict[str, Any] = field(default_factory=dict)

    def items_note(self) -> str:
        counts = ", ".join(f"{label} {count}" for label, count in self.items.items())
        if self.items_differ:
            return (
                f"**The runs were evaluated on different test items** ({counts}; {self.shared_items} shared): "
                "their accuracies are not comparable item for item, and the paired tests use the shared items only."
            )
        return f"Every run answered the same {self.shared_items} test items."

    def to_markdown(self) -> str:
        labels = [run.label for run in self.runs]
        differ = " (test items differ)" if self.items_differ else ""
        parts = [
            f"# Comparing runs: {', '.join(labels)}",
            "",
            "Runs: " + "; ".join(f"`{run.label}` = {run.path}" for run in self.runs) + ".",
            "",
            self.items_note(),
            "",
            f"## Params that differ{differ}",
            "",
            markdown_table(self.params) if len(self.params) else "No params differ.",
            "",
            f"## Acc@t1 / Acc@t2 / Δ (%), all tasks{differ}",
            "",
            markdown_table(self.headline),
        ]
        for task, table in self.per_task.items():
            parts += ["", f"## Acc@t1 / Acc@t2 / Δ (%), {task}{differ}", "", markdown_table(table)]
        parts += [
            "",
            f"## Paired tests against `{labels[0]}`{differ}",
            "",
            "Each run against the first on the items both answered, per variant, protocol and grader "
            "(Acc@t2, or Acc@t1 where a variant has no second turn): a paired bootstrap interval of the "
            "difference and an exact McNemar test.",
            "",
            markdown_table(self.paired.drop(columns=["difference_low", "difference_high"])),
        ]
        return "\n".join(parts) + "\n"

    def write(self, folder: str | Path) -> Path:
        """compare.md, headline.csv, params.csv and paired.csv in ``folder`` (each written whole)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "headline.csv", self.headline.to_csv(index=False))
        atomic_write_text(folder / "params.csv", self.params.to_csv(index=False))
        atomic_write_text(folder / "paired.csv", self.paired.to_csv(index=False))
        return atomic_write_text(folder / "compare.md", self.to_markdown())


def _labels(dirs: Sequence[Path], labels: Sequence[str] | None, names: Sequence[str]) -> list[str]:
    if labels is not None:
        if len(labels) != len(dirs):
            raise DataError(f"compare_runs: {len(labels)} label(s) for {len(dirs)} run(s); give one per run")
        repeated = sorted({label for label in labels if list(labels).count(label) > 1})
        if repeated:
            raise DataError(
                f"compare_runs: the label(s) {', '.join(repeated)} are given to several runs; give each run its own"
            )
        return list(labels)
    chosen = list(names)
    parts = 1
    while len(set(chosen)) < len(chosen) and parts <= max(len(path.resolve().parts) for path in dirs):
        # two runs of the same name, e.g. in two checkouts: the shortest ends of their paths that differ
        chosen = ["/".join(path.resolve().parts[-parts:]) for path in dirs]
        parts += 1
    if len(set(chosen)) < len(chosen):
        raise DataError(f"compare_runs: the same run folder is given twice ({', '.join(chosen)})")
    return chosen


def compare_runs(
    run_dirs: Sequence[str | Path],
    *,
    labels: Sequence[str] | None = None,
    allow_different_items: bool = False,
    tasks: bool = False,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: Any = 0,
) -> RunComparison:
    """Compare two or more evaluated runs (see the module docstring). ``tasks`` adds one headline table per task."""
    import pandas as pd

    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise DataError(f"compare_runs needs two or more run folders, got {len(dirs)}")
    runs = [read_run_results(d) for d in dirs]
    for run, label in zip(runs, _labels(dirs, labels, [run.label for run in runs])):
        run.label = label
    item_sets = [run.items for run in runs]
    shared = set.intersection(*item_sets)
    differ = any(items != item_sets[0] for items in item_sets[1:])
    counts = {run.label: len(items) for run, items in zip(runs, item_sets)}
    if differ and not allow_different_items:
        raise RunsDifferError(
            "the runs were evaluated on different test items ("
            + ", ".join(f"{label}: {count}" for label, count in counts.items())
            + f"; {len(shared)} shared), so their accuracies are not comparable item for item; "
            "compare them anyway with --allow-different-items (compare_runs(..., allow_different_items=True)): "
            "every table then says so and the paired tests use the shared items"
        )
    if shared:
        paired = paired_tests(runs, shared, bootstrap_samples=bootstrap_samples, confidence=confidence, seed=seed)
    else:
        paired = pd.DataFrame(columns=PAIRED_COLUMNS)
    per_task = {}
    if tasks:
        names = sorted(set().union(*(set(run.summary["task"]) for run in runs)) - {OVERALL})
        per_task = {name: headline_table(runs, task=name) for name in names}
    return RunComparison(
        runs=runs,
        headline=headline_table(runs),
        params=params_differences(runs),
        paired=paired,
        items=counts,
        shared_items=len(shared),
        items_differ=differ,
        per_task=per_task,
    )
