"""Packaging: dependency lists agree, the import stays light, the CPU stack is one that trains."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict))
    listed = [line for line in pip_section if not line.startswith("-")]
    assert sorted(listed) == sorted(wanted)  # same names and the same version ranges
    assert "-e ." in pip_section


def test_extras_exist():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) == {"gpu", "vllm", "dev"}
    assert {_name(r) for r in extras["gpu"]} >= {"unsloth", "bitsandbytes"}


def test_import_is_light():
    code = "import reflectevo, reflectevo.tasks, sys; print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl', 'peft', 'sympy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_cpu_stack_has_a_trl_that_trains_without_triton():
    torch = pytest.importorskip("torch")
    trl = pytest.importorskip("trl")
    if torch.cuda.is_available():
        pytest.skip("a GPU machine may use trl 1.15 (the version unsloth accepts)")
    major, minor = (int(part) for part in trl.__version__.split(".")[:2])
    assert (major, minor) >= (1, 16), "trl 1.15's trainers crash on CPU (no triton): install trl>=1.16"


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]"' in readme and 'pip install -e ".[dev]"' in ci
    assert "pytest" in readme and re.search(r"^pytest\b", ci, re.MULTILINE)
    assert "pip install torch==2.13.0" in ci


def test_samples_ship_with_the_package():
    from reflectevo.tasks import TASKS

    for task in TASKS.values():
        assert len(task.load_samples()) == 20
