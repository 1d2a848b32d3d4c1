"""``reflectevo run``: stage plan, skipping by identity, --from/--stages/--force, failure reporting,
--dry-run. Papermill really executes small notebooks that follow the package's conventions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from reflectevo.errors import ReflectEvoError
from reflectevo.runner import run_pipeline
from reflectevo.runs import StageError, read_manifest

PARAMETERS = "params_file = None\nrun = {}\ndata = {}\nreflect = {}\neval = {}"
BODY = """
from reflectevo.notebook import configure, setup
setup()
params = configure(params_file, select_model_backend=False, run=run, data=data, reflect=reflect, eval=eval)
from reflectevo.runs import atomic_write_text, open_run
rundir = open_run(params, params_file=params_file)
stage = rundir.begin_stage("{key}")
"""
FINISH = """
out = stage.dir / "{key}.txt"
atomic_write_text(out, "{key} " + str(params.reflect.fewshots))
stage.finish(outputs=[out])
rundir.close()
"""


def write_notebook(folder: Path, key: str, extra: str = "") -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    parameters = nbformat.v4.new_code_cell(PARAMETERS)
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [parameters, nbformat.v4.new_code_cell(BODY.format(key=key))]
    if extra:
        notebook.cells.append(nbformat.v4.new_code_cell(extra))
    notebook.cells.append(nbformat.v4.new_code_cell(FINISH.format(key=key)))
    nbformat.write(notebook, folder / f"{key}.ipynb")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with two stages: 02 fails when reflect.grader is 'robust'."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks, "01_data")
    write_notebook(notebooks, "02_reflect", extra='assert params.reflect.grader != "robust", "deliberate failure"')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def recipe(folder: Path, **sections) -> Path:
    import yaml

    body = {"run": {"name": "r"}, "data": {"tasks": ["logiqa"]}, **sections}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def run(path: Path, **options) -> tuple[int, list[str]]:
    lines: list[str] = []
    status = run_pipeline(path, notebooks=path.parent / "notebooks", out=lines.append, **options)
    return status, lines


def test_runs_in_order_then_skips_by_identity(project):
    status, lines = run(recipe(project))
    assert status == 0, lines
    assert [line.split(":")[0] for line in lines if ": running" in line] == ["[1/2] 01_data", "[2/2] 02_reflect"]
    run_dir = project / "outputs" / "r"
    assert (run_dir / "notebooks" / "01_data.ipynb").is_file() and (run_dir / "notebooks" / "02_reflect.ipynb").is_file()
    stages = read_manifest(run_dir)["stages"]
    assert stages["01_data"]["status"] == stages["02_reflect"]["status"] == "done"

    status, lines = run(recipe(project))
    assert status == 0 and sum("skipped" in line for line in lines) == 2, lines

    # an eval setting is read by neither stage: nothing reruns
    status, lines = run(recipe(project, eval={"max_new_tokens": 5}))
    assert sum("skipped" in line for line in lines) == 2, lines

    # a reflect setting reruns 02 only; a data setting reruns both
    status, lines = run(recipe(project, reflect={"fewshots": 1}))
    assert "[1/2] 01_data: skipped" in lines[1] and "02_reflect: running" in lines[2], lines
    assert (run_dir / "reflect" / "02_reflect.txt").read_text() == "02_reflect 1"
    status, lines = run(recipe(project, reflect={"fewshots": 1}, data={"tasks": ["math"]}))
    assert sum(": running" in line for line in lines) == 2, lines


def test_force_from_and_stages(project):
    path = recipe(project)
    assert run(path)[0] == 0
    _, lines = run(path, force=True)
    assert sum(": running (--force)" in line for line in lines) == 2
    _, lines = run(path, start="02", force=True)
    assert [line for line in lines if ": running" in line] == ["[1/1] 02_reflect: running (--force)"]
    _, lines = run(path, stages=["01"])
    assert "skipped" in lines[1]
    with pytest.raises(ReflectEvoError, match="no notebook for stage"):
        run(path, stages=["03"])
    with pytest.raises(ReflectEvoError, match="either --stages or --from"):
        run(path, stages=["01"], start="02")


def test_a_stale_upstream_must_be_included(project):
    assert run(recipe(project))[0] == 0
    with pytest.raises(StageError, match="01_data, which is out of date"):
        run(recipe(project, data={"tasks": ["math"]}), stages=["02"])


def test_a_failing_stage_stops_the_run_and_says_where(project):
    status, lines = run(recipe(project, reflect={"grader": "robust"}))
    assert status == 1
    failure = next(line for line in lines if "FAILED" in line)
    assert "02_reflect.ipynb" in failure and "cell 4 of the executed notebook" in failure
    assert "AssertionError: deliberate failure" in failure
    run_dir = project / "outputs" / "r"
    kept = run_dir / "notebooks" / "02_reflect.failed.ipynb"
    assert kept.is_file() and "deliberate failure" in kept.read_text()
    assert read_manifest(run_dir)["stages"]["02_reflect"]["status"] == "failed"
    assert not (run_dir / ".lock").exists()  # the runner released its lock
    assert not list((run_dir / "notebooks").glob(".*running*"))
    # fixing the params reruns only the failed stage, and clears the failed copy
    status, lines = run(recipe(project))
    assert status == 0 and "01_data: skipped" in lines[1] and "02_reflect: running" in lines[2]
    assert not kept.exists()


def test_dry_run_loads_no_model(project):
    path = recipe(project, data={"tasks": ["logiqa", "math"]})
    code = (
        "import sys\nfrom reflectevo.runner import run_pipeline\n"
        f"status = run_pipeline({str(path)!r}, dry_run=True, notebooks={str(project / 'notebooks')!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy)\nsys.exit(status)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=project, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# resolved params" in out and "max_new_tokens: 512" in out  # schema defaults shown
    assert "01_data" in out and "run   not run yet" in out
    assert "--- logiqa" in out and "--- math" in out and "Question:" in out and "Finish<<<" in out
    assert "HEAVY []" in out
    assert not (project / "outputs").exists()  # a dry run writes nothing


def test_cli_reports_bad_params_before_anything_runs(project):
    bad = project / "bad.yaml"
    bad.write_text("data:\n  taks: [logiqa]\n")
    result = subprocess.run([sys.executable, "-m", "reflectevo", "run", str(bad), "--notebooks", str(project / "notebooks")],
                            capture_output=True, text=True, check=False, cwd=project, timeout=120)
    assert result.returncode == 2
    assert "data.taks: unknown key (did you mean 'tasks'?)" in result.stderr
    assert not (project / "outputs").exists()


def test_executed_notebook_records_the_injected_params_file(project):
    path = recipe(project)
    assert run(path)[0] == 0
    executed = json.loads((project / "outputs" / "r" / "notebooks" / "01_data.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and str(path) in "".join(injected[0]["source"])
