"""``reflectevo run``: stage plan, skipping by identity, --from/--stages/--force, failure reporting,
--dry-run. Papermill really executes small notebooks that follow the package's conventions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from reflectevo.cli.run import run_pipeline
from reflectevo.errors import ReflectEvoError, StageError
from reflectevo.runs.plan import read_manifest

PARAMETERS = "params_file = None\nrun = {}\ndata = {}\nreflect = {}\neval = {}"
BODY = """
from reflectevo.notebook import configure, setup
setup()
params = configure(params_file, select_model_backend=False, run=run, data=data, reflect=reflect, eval=eval)
from reflectevo.core.files import atomic_write_text
from reflectevo.runs.rundir import open_run
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
    if "fewshots" in body.get("reflect", {}):  # the tests signal with it; the evaluation must ask alike
        body["eval"] = {**body.get("eval", {}), "fewshots": body["reflect"]["fewshots"]}
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
    assert (run_dir / "notebooks" / "01_data.ipynb").is_file() and (
        run_dir / "notebooks" / "02_reflect.ipynb"
    ).is_file()
    stages = read_manifest(run_dir)["stages"]
    assert stages["01_data"]["status"] == stages["02_reflect"]["status"] == "done"

    status, lines = run(recipe(project))
    assert status == 0 and sum(line.startswith("[") and ": skipped" in line for line in lines) == 2, lines

    # an eval setting is read by neither stage: nothing reruns
    status, lines = run(recipe(project, eval={"max_new_tokens": 5}))
    assert sum(line.startswith("[") and ": skipped" in line for line in lines) == 2, lines

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
        "import sys\nfrom reflectevo.cli.run import run_pipeline\n"
        f"status = run_pipeline({str(path)!r}, dry_run=True, notebooks={str(project / 'notebooks')!r})\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy)\nsys.exit(status)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=project, timeout=120
    )
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
    result = subprocess.run(
        [sys.executable, "-m", "reflectevo", "run", str(bad), "--notebooks", str(project / "notebooks")],
        capture_output=True,
        text=True,
        check=False,
        cwd=project,
        timeout=120,
    )
    assert result.returncode == 2
    assert "data.taks: unknown key (did you mean 'tasks'?)" in result.stderr
    assert not (project / "outputs").exists()


def test_executed_notebook_records_the_injected_params_file(project):
    path = recipe(project)
    assert run(path)[0] == 0
    executed = json.loads((project / "outputs" / "r" / "notebooks" / "01_data.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and str(path) in "".join(injected[0]["source"])


# ---- a dead kernel, a held lock, a stale lock, Ctrl-C ---------------------------------------------
WAIT_FOR_RELEASE = """
import time
from pathlib import Path
if params.reflect.fewshots == 2:  # the test's signal: hold the stage until the file "release" appears
    Path("holding").write_text("yes")
    deadline = time.monotonic() + 120
    while not Path("release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


def start_run(project: Path, path: Path) -> subprocess.Popen:
    """``reflectevo run`` in its own process group, as a terminal would start it."""
    return subprocess.Popen(
        [sys.executable, "-m", "reflectevo", "run", str(path), "--notebooks", str(project / "notebooks")],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 120) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n" + process.communicate()[0][-3000:])
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.05)


@pytest.fixture
def holding_project(tmp_path, monkeypatch):
    """Like ``project``, but stage 01 can be held (fewshots 2) and stage 02 kills its own kernel (fewshots 1)."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_notebook(notebooks, "01_data", extra=WAIT_FOR_RELEASE)
    write_notebook(
        notebooks,
        "02_reflect",
        extra=(
            "import os, signal\nif params.reflect.fewshots == 1:  # as the out-of-memory killer would\n"
            "    os.kill(os.getpid(), signal.SIGKILL)"
        ),
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_dead_kernel_is_reported_with_stage_and_cell(holding_project):
    status, lines = run(recipe(holding_project, reflect={"fewshots": 1}))
    assert status == 1
    failure = next(line for line in lines if "FAILED" in line)
    assert "02_reflect" in failure and "cell 4 of the executed notebook (starting 'import os, signal')" in failure
    assert "the kernel died" in failure and "out-of-memory killer" in failure
    run_dir = holding_project / "outputs" / "r"
    assert "executed notebook kept at" in failure and (run_dir / "notebooks" / "02_reflect.failed.ipynb").is_file()
    entry = read_manifest(run_dir)["stages"]["02_reflect"]
    assert entry["status"] == "failed" and "kernel died" in entry["reason"]
    assert not (run_dir / ".lock").exists()
    status, lines = run(recipe(holding_project))  # the memory was found: the same command goes on
    assert status == 0 and "01_data: skipped" in lines[1] and "previous attempt failed" in lines[2]


def test_a_second_run_is_refused_while_the_first_holds_the_lock_and_a_stale_lock_is_taken_over(holding_project):
    import os
    import signal

    path = recipe(holding_project, reflect={"fewshots": 2})
    first = start_run(holding_project, path)
    try:
        wait_for(lambda: (holding_project / "holding").exists(), first, "stage 01 to start")
        second = subprocess.run(
            [sys.executable, "-m", "reflectevo", "run", str(path), "--notebooks", str(holding_project / "notebooks")],
            cwd=holding_project,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert second.returncode == 2
        assert f"is being written by pid {first.pid}" in second.stderr and "reflectevo run" in second.stderr
        # the machine loses the first run at once (kill -9 of the runner and its kernel): its lock stays behind
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    run_dir = holding_project / "outputs" / "r"
    assert json.loads((run_dir / ".lock").read_text())["pid"] == first.pid
    (holding_project / "release").write_text("")
    status, lines = run(path)
    assert status == 0, lines
    assert "previous attempt running" in lines[1]
    events = read_manifest(run_dir)["events"]
    assert any(e["kind"] == "lock" and f"pid {first.pid}" in e["note"] and "is gone" in e["note"] for e in events)


def test_ctrl_c_leaves_a_resumable_run(holding_project):
    import os
    import signal

    path = recipe(holding_project, reflect={"fewshots": 2})
    process = start_run(holding_project, path)
    try:
        wait_for(lambda: (holding_project / "holding").exists(), process, "stage 01 to start")
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the runner and its kernel
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)  # reaped: no zombie left for later tests' process checks
    assert process.returncode == 130, out + err
    assert "01_data: INTERRUPTED (Ctrl-C)" in out and "rerun the same command to resume" in out
    run_dir = holding_project / "outputs" / "r"
    assert read_manifest(run_dir)["stages"]["01_data"]["status"] == "interrupted"
    assert not (run_dir / ".lock").exists() and (run_dir / "notebooks" / "01_data.interrupted.ipynb").is_file()
    (holding_project / "release").write_text("")
    status, lines = run(path)
    assert status == 0 and "previous attempt interrupted" in lines[1]
    assert not (run_dir / "notebooks" / "01_data.interrupted.ipynb").exists()
