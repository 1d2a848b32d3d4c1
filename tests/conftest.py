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
    from reflectevo.sandbox import Sandbox

    return Sandbox(allow_code_execution=True, workers=max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def isolated_sandbox(sandbox):
    """The sandbox, but only where it really isolates; containment tests depend on it."""
    if not sandbox.isolation.isolated:
        skip_or_fail("no sandbox isolation layer on this machine (no namespaces and not root):\n" + sandbox.isolation.describe())
    return sandbox


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The folder of builtin:tiny, the default build, made once per pytest run.

    With a cold cache (CI) this trains it, about 5 minutes on 2 cores; afterwards it comes from
    the user cache (``reflectevo.models.cache_dir()``) and costs nothing.
    """
    from reflectevo.standin import tiny_model_dir as build_or_find

    return build_or_find()
