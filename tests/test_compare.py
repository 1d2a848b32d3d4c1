"""`reflectevo compare` and compare_runs on two real smoke runs whose eval params differ."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from reflectevo.analysis.compare import RunsDifferError, compare_runs, item_key
from reflectevo.core.jsonl import read_jsonl
from reflectevo.errors import DataError
from reflectevo.evaluation.metrics import format_cell

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def reflectevo(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "reflectevo"), *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=900
    )


def copy_run(source: Path, target: Path, name: str) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock*"))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["run"] = name
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture(scope="module")
def two_runs(smoke_papermill_run, tmp_path_factory):
    """outputs/smoke (the smoke run) and outputs/smoke-oracle: the same stages 01-04, stage 05 rerun with the
    oracle protocol only and 200 bootstrap samples instead of 100 (its generations come from the copied
    store, so the rerun takes seconds and its answers are the smoke run's)."""
    cwd = tmp_path_factory.mktemp("compare")
    smoke = copy_run(smoke_papermill_run / "outputs" / "smoke", cwd / "outputs" / "smoke", "smoke")
    copy_run(smoke, cwd / "outputs" / "smoke-oracle", "smoke-oracle")
    recipe = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    recipe["run"]["name"] = "smoke-oracle"
    recipe["eval"].update(protocols=["oracle"], bootstrap_samples=200)
    params = cwd / "smoke-oracle.yaml"
    params.write_text(yaml.safe_dump(recipe))
    done = reflectevo("run", str(params), "--stages", "05", "--notebooks", str(REPO / "notebooks"), cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "05_eval: done" in done.stdout, done.stdout
    return cwd


def test_params_that_differ_and_headline_side_by_side(two_runs):
    outputs = two_runs / "outputs"
    comparison = compare_runs([outputs / "smoke", outputs / "smoke-oracle"])
    assert not comparison.items_differ and comparison.shared_items == comparison.items["smoke"] > 0
    differ = comparison.params.set_index("key")
    assert set(differ.index) == {"run.name", "eval.protocols", "eval.bootstrap_samples"}
    assert differ.loc["eval.bootstrap_samples"].tolist() == ["100", "200"]
    assert json.loads(differ.loc["eval.protocols", "smoke-oracle"]) == ["oracle"]

    # every cell is the run's own summary.csv, overall row; what a run did not evaluate shows "—"
    headline = comparison.headline.set_index(["variant", "protocol", "grader"])
    for name in ("smoke", "smoke-oracle"):
        summary = pd.read_csv(outputs / name / "eval" / "summary.csv")
        overall = summary[summary["task"] == "overall"]
        for row in overall.itertuples(index=False):
            percent = [None if pd.isna(v) else 100 * v for v in (row.acc_t1, row.acc_t2, row.delta)]
            assert headline.loc[(row.variant, row.protocol, row.grader), name] == format_cell(*percent)
    free = headline.xs("oracle_free", level="protocol")
    assert (free["smoke-oracle"] == "—").all() and (free["smoke"] != "—").all()

    # paired tests: only what both evaluated (the oracle), on every shared item
    paired = comparison.paired
    assert len(paired) and set(paired["protocol"]) == {"oracle"}
    assert set(paired["run_a"]) == {"smoke-oracle"} and set(paired["run_b"]) == {"smoke"}
    assert (paired["n"] == comparison.shared_items).all()
    # the same stored generations give the same answers: no item differs, so no run beats the other
    assert (paired["a_only"] + paired["b_only"] == 0).all() and (paired["difference"] == 0).all()
    assert paired["verdict"].str.startswith("no difference shown between smoke-oracle and smoke").all()
    assert set(paired["metric"]) <= {"t1", "t2"} and "t2" in set(paired["metric"])


def test_cli_prints_and_writes_the_comparison(two_runs):
    done = reflectevo("compare", "outputs/smoke", "outputs/smoke-oracle", "--tasks", "--out", "cmp", cwd=two_runs)
    assert done.returncode == 0, done.stderr
    assert "## Params that differ" in done.stdout and "eval.bootstrap_samples" in done.stdout
    assert "## Acc@t1 / Acc@t2 / Δ (%), math" in done.stdout
    assert "Every run answered the same" in done.stdout
    written = two_runs / "cmp"
    assert (written / "compare.md").read_text() == done.stdout.split("written: ")[0].rstrip("\n") + "\n"
    paired = pd.read_csv(written / "paired.csv")
    assert len(paired) and set(paired["protocol"]) == {"oracle"}


def test_runs_on_different_items_are_refused_unless_allowed(two_runs, tmp_path):
    """A copy whose one item has other text under the same id stands for a run on other data."""
    outputs = two_runs / "outputs"
    other = copy_run(outputs / "smoke-oracle", tmp_path / "smoke-other", "smoke-other")
    path = other / "eval" / "predictions.jsonl"
    rows = [row for _, row in read_jsonl(path)]
    changed = (rows[0]["task"], rows[0]["id"])
    for row in rows:
        if (row["task"], row["id"]) == changed:
            row["question"] += " (reworded)"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    with pytest.raises(RunsDifferError, match="different test items .*allow-different-items"):
        compare_runs([outputs / "smoke", other])
    done = reflectevo("compare", str(outputs / "smoke"), str(other), cwd=two_runs)
    assert done.returncode == 2 and "different test items" in done.stderr

    comparison = compare_runs([outputs / "smoke", other], allow_different_items=True)
    total = comparison.items["smoke"]
    assert comparison.items_differ and comparison.shared_items == total - 1
    assert (comparison.paired["n"] == total - 1).all()
    text = comparison.to_markdown()
    assert "evaluated on different test items" in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings and all(line.endswith("(test items differ)") for line in headings)
    assert item_key(rows[0]) not in comparison.runs[0].items


def test_bad_input_says_what_to_fix(two_runs, tmp_path):
    outputs = two_runs / "outputs"
    with pytest.raises(DataError, match="two or more"):
        compare_runs([outputs / "smoke"])
    with pytest.raises(DataError, match="no such run folder"):
        compare_runs([outputs / "smoke", tmp_path / "missing"])
    unevaluated = copy_run(outputs / "smoke", tmp_path / "no-eval", "no-eval")
    shutil.rmtree(unevaluated / "eval")
    with pytest.raises(DataError, match=r"no evaluation results.*--stages 05"):
        compare_runs([outputs / "smoke", unevaluated])
    with pytest.raises(DataError, match="one per run"):
        compare_runs([outputs / "smoke", outputs / "smoke-oracle"], labels=["a"])
    with pytest.raises(DataError, match="label.* a are given to several runs"):
        compare_runs([outputs / "smoke", outputs / "smoke-oracle"], labels=["a", "a"])
    with pytest.raises(DataError, match="given twice"):
        compare_runs([outputs / "smoke", outputs / "smoke"])
