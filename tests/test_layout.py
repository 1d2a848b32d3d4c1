"""The package's shape: no import circles, no import that runs back up a floor, no oversized module.

The floors, lowest first; a module may import its own floor or any floor below it. Every internal import
counts, at the top of a file or inside a function, so the shape cannot decay behind a lazy import."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reflectevo"
FLOORS = [
    ["reflectevo.errors"],
    ["reflectevo.core"],
    ["reflectevo.sandbox", "reflectevo.plots"],
    ["reflectevo.tasks"],
    ["reflectevo.prompts"],
    ["reflectevo.config"],
    ["reflectevo.runs"],
    ["reflectevo.models"],
    ["reflectevo.generation"],
    ["reflectevo.notebook"],
    ["reflectevo.data"],  # stage 01
    ["reflectevo.reflection"],  # stage 02
    ["reflectevo.training"],  # stages 03-04
    ["reflectevo.evaluation"],  # stage 05
    ["reflectevo.analysis"],  # stage 06
    ["reflectevo.evolve"],
    ["reflectevo.cli"],
    ["reflectevo", "reflectevo.__main__"],
]
MAX_LINES = 700
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "unsloth", "vllm", "accelerate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int:
    best, found = -1, None
    for index, floor in enumerate(FLOORS):
        for prefix in floor:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is on no floor of tests/test_layout.py: add it"
    return found


def resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def internal_imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at the top of the file?) for every import of the package in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # a submodule, else the module; the root's __version__ is a constant, not a dependency
            names = [f"{node.module}.{alias.name}" for alias in node.names if alias.name != "__version__"]
        for name in names:
            target = resolve(name) if name.split(".")[0] == "reflectevo" else None
            if target and target != module and not (path.name == "__init__.py" and target.startswith(module + ".")):
                found.append((target, node.lineno, id(node) in top))
    return found


def test_no_import_runs_back_up_a_floor():
    upward = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {target}"
        for m in MODULES
        for target, line, _ in internal_imports(m)
        if floor_of(target) > floor_of(m)
    ]
    assert not upward, "imports that run back up a floor:\n" + "\n".join(upward)


def test_no_import_circles():
    edges = {m: {target for target, _, _ in internal_imports(m)} for m in MODULES}
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append(
                    " -> ".join(path[path.index(target) :] + [module, target])
                    if target in path
                    else f"{module} -> {target}"
                )
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_module_is_oversized():
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in MODULES.values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by what they serve): {long}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_heavy_library_at_the_top(module):
    """``import reflectevo.<anything>`` stays cheap and works without a GPU stack: torch, transformers, trl,
    peft and datasets are imported inside the functions that use them (and Unsloth, where it is used, first)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    heavy = []
    for node in tree.body:
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        )
        heavy += [n for n in names if n.split(".")[0] in HEAVY]
    assert not heavy, f"{module} imports {heavy} at module level"


def test_importing_every_module_loads_no_heavy_library():
    """The same, at run time: importing every module of the package (``__main__`` aside) in a fresh process
    leaves torch, transformers, trl, peft and datasets unloaded."""
    names = sorted(m for m in MODULES if not m.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
