"""The notebooks as a person runs them in JupyterLab: no papermill, ``params_file`` typed into the
parameters cell, a fresh kernel started in ``notebooks/`` by nbclient, and cells executed again.

Each notebook runs on a copy of the finished smoke run, so its generation stores and trained adapters
are read back rather than made again: what is tested is the notebook's cells, the run's lock and
manifest, not the model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import REPO, SMOKE_NOTEBOOKS
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from reflectevo.core.files import file_sha256

# Cells that write into the run: open it, write files or figures, train, finish the stage.
WRITING = re.compile(
    r"open_run\(|begin_stage\(|\.finish\(|\bwrite_\w+\(|run_sft\(|run_dpo\(|rundir\.figures|stage\.dir|\bshow\(|run_report\("
)
# The outputs whose content a rerun from the stores must give again, byte for byte (figures and the
# report may differ in bytes, adapters are read back).
DATA_SUFFIXES = (".jsonl", ".csv")


@pytest.fixture(scope="module")
def jupyter_run(smoke_papermill_run, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the finished smoke run and the params file a user would point at it
    (``params/smoke.yaml`` with ``run.output_dir`` at the copy, an absolute path)."""
    work = tmp_path_factory.mktemp("jupyter")
    shutil.copytree(smoke_papermill_run / "outputs", work / "outputs", ignore=shutil.ignore_patterns(".lock*"))
    recipe = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    recipe["run"]["output_dir"] = str(work / "outputs")
    params_file = work / "smoke-jupyter.yaml"
    params_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return work / "outputs" / "smoke", params_file


def typed_in(stage: str, params_file: Path) -> nbformat.NotebookNode:
    """The notebook with ``params_file = "<file>"`` typed over the parameters cell's ``None``."""
    notebook = nbformat.read(REPO / "notebooks" / f"{stage}.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    typed = re.sub(r"^params_file = None", f"params_file = {str(params_file)!r}", cell.source, flags=re.M)
    assert typed != cell.source, "the parameters cell no longer starts a line with params_file = None"
    cell.source = typed
    return notebook


def files_of(run: Path) -> dict[str, str]:
    """Every file of the run (but executed notebooks and lock files) with its SHA-256."""
    return {
        str(path.relative_to(run)): file_sha256(path)
        for path in sorted(run.rglob("*"))
        if path.is_file() and "notebooks" not in path.relative_to(run).parts and not path.name.startswith(".lock")
    }


@pytest.mark.parametrize("stage", SMOKE_NOTEBOOKS)
def test_a_notebook_runs_in_jupyter_and_its_writing_cells_run_again_safely(jupyter_run, stage):
    run, params_file = jupyter_run
    before = json.loads((run / "manifest.json").read_text())["stages"][stage]
    notebook = typed_in(stage, params_file)
    assert "papermill" not in notebook.metadata and not any(
        "injected-parameters" in c.metadata.get("tags", []) for c in notebook.cells
    )
    code = [(index, cell) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    writing = [(index, cell) for index, cell in code if WRITING.search(cell.source)]
    opening = next(index for index, cell in code if "open_run(" in cell.source)
    assert len(writing) >= 2, f"{stage}: expected an opening cell and at least one cell that writes"
    # A kernel started where JupyterLab starts it: in the notebook's folder.
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    )
    with client.setup_kernel():
        # 1. top to bottom, as "Run All" does
        for index, cell in code:
            client.execute_cell(cell, index)
        manifest = json.loads((run / "manifest.json").read_text())
        entry = manifest["stages"][stage]
        assert entry["status"] == "done" and entry["identity"] == before["identity"], stage
        assert manifest["params_file"]["path"] == str(params_file)
        assert not (run / ".lock").exists(), "the last cell releases the run's lock"
        first = files_of(run)
        assert all(first[name] == value["sha256"] for name, value in entry["outputs"].items())

        # 2. a writing cell executed again after the last one (the run is closed): refused, nothing
        # written (a cell whose writing is conditional, as 06's rounds cell, may have nothing to write)
        refused = 0
        for index, cell in writing:
            if index == opening:
                continue
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as error:
                assert "was closed" in str(error), f"{stage}: cell {index}: {error}"
                refused += 1
            assert files_of(run) == first, f"{stage}: cell {index} changed the run after it was closed"
        assert refused >= 1, f"{stage}: no cell refused to write into the closed run"

        # 3. from the opening cell to the end again, every writing cell twice in a row (the opening
        # cell included: the kernel already holds the lock the second time)
        for index, cell in code:
            if index < opening:
                continue
            twice = WRITING.search(cell.source) and "rundir.close()" not in cell.source
            for _ in range(2 if twice else 1):
                client.execute_cell(cell, index)
    again = json.loads((run / "manifest.json").read_text())["stages"][stage]
    assert again["status"] == "done" and again["identity"] == before["identity"]
    assert again["outputs"].keys() == entry["outputs"].keys(), stage
    data = [name for name in entry["outputs"] if name.endswith(DATA_SUFFIXES)]
    for name in data:
        assert again["outputs"][name]["sha256"] == entry["outputs"][name]["sha256"], f"{stage}: {name} differs"
    assert not (run / ".lock").exists()
    assert not (REPO / "notebooks" / "outputs").exists(), "the kernel wrote under notebooks/"


def probe_wheel(folder: Path) -> Path:
    """A one-module wheel with no dependencies, installable offline: what ``install_source`` names."""
    import base64
    import zipfile

    name, version = "reflectevo_colab_probe", "0.1"
    files = {
        f"{name}/__init__.py": "INSTALLED = True\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    record = f"{name}-{version}.dist-info/RECORD"
    rows = [f"{path},{digest(text)},{len(text.encode())}" for path, text in files.items()] + [f"{record},,"]
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in {**files, record: "\n".join(rows) + "\n"}.items():
            archive.writestr(path, text)
    return wheel


def test_the_set_up_cell_installs_install_source_in_colab_only(tmp_path):
    # Every notebook shares the set-up cell; it pip-installs install_source only inside Colab. Here
    # Colab is an empty `google.colab` module and pip installs into a folder of its own (PIP_TARGET),
    # offline, so the project's environment is left as it was.
    setups = {}
    for stage in SMOKE_NOTEBOOKS:
        cells = nbformat.read(REPO / "notebooks" / f"{stage}.ipynb", as_version=4).cells
        parameters = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
        setups[stage] = next(c.source for c in cells[parameters + 1 :] if c.cell_type == "code")
    assert len(set(setups.values())) == 1 and "install_source" in setups["01_data"]
    wheel = probe_wheel(tmp_path)
    for in_colab in (False, True):
        target = tmp_path / f"site-{'colab' if in_colab else 'jupyter'}"
        fake = "import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')" if in_colab else ""
        notebook = nbformat.v4.new_notebook(
            cells=[
                nbformat.v4.new_code_cell(fake),
                nbformat.v4.new_code_cell(f"params_file = None\ninstall_source = {str(wheel)!r}"),
                nbformat.v4.new_code_cell(setups["01_data"]),
            ]
        )
        client = NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        )
        env = {**os.environ, "PIP_TARGET": str(target), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        with client.setup_kernel(env=env):
            for index, cell in enumerate(notebook.cells):
                client.execute_cell(cell, index)
        assert (target / "reflectevo_colab_probe" / "__init__.py").is_file() == in_colab
