"""``reflectevo run PARAMS``: execute the numbered notebooks in order with papermill.

For each stage the runner computes its identity (the params sections it reads plus the identities
of the stages it depends on, see :mod:`reflectevo.runs`) and skips it when the run directory
already holds that stage, finished, with the same identity and its output files present. A stage
runs in a fresh kernel, started in the current working directory with ``params_file`` injected;
its executed copy goes to ``outputs/<run>/notebooks/`` (``<stage>.failed.ipynb`` when a cell
failed). The first failing stage stops the run, naming the notebook and the cell.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reflectevo.config import Params, load_params
from reflectevo.errors import ReflectEvoError
from reflectevo.runs import (
    LOCK_TOKEN_ENV,
    STAGES,
    Stage,
    StageError,
    depends_on,
    get_stage,
    identity_of,
    open_run,
    read_manifest,
)

Printer = Callable[[str], None]


@dataclass
class PlannedStage:
    stage: Stage
    notebook: Path
    identity: str
    action: str  # "run" | "skip"
    reason: str


def notebooks_dir(explicit: str | Path | None = None) -> Path:
    """The folder of the numbered notebooks: given, else ``./notebooks``, else the source tree's."""
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "notebooks", Path(__file__).resolve().parents[1] / "notebooks"]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("[0-9][0-9]_*.ipynb")):
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ReflectEvoError(f"no numbered notebooks found (looked in {tried}); pass --notebooks DIR")


def expected_identities(params: Params, available: set[str]) -> dict[str, str]:
    """Each stage's identity if every stage upstream of it is (re)run with these params."""
    identities: dict[str, str] = {}
    for stage in STAGES:
        upstream = {}
        for number in depends_on(stage, params):
            dep = get_stage(number)
            upstream[dep.key] = identities.get(dep.key) if dep.key in available else None
        identities[stage.key] = identity_of(params, stage, upstream)
    return identities


def outputs_present(run_dir: Path, entry: dict) -> bool:
    outputs = entry.get("outputs") or {}
    return all((run_dir / rel).is_file() and (run_dir / rel).stat().st_size == meta.get("bytes") for rel, meta in outputs.items())


def select_stages(available: list[Stage], stages: list[str] | None, start: str | None) -> list[Stage]:
    if stages and start:
        raise ReflectEvoError("give either --stages or --from, not both")
    keys = [stage.key for stage in available]
    if stages:
        wanted = [get_stage(name) for name in stages]
        missing = [stage.key for stage in wanted if stage.key not in keys]
        if missing:
            raise ReflectEvoError(f"no notebook for stage(s) {', '.join(missing)}; available: {', '.join(keys)}")
        return [stage for stage in available if stage in wanted]
    if start:
        first = get_stage(start)
        if first.key not in keys:
            raise ReflectEvoError(f"no notebook for stage {first.key}; available: {', '.join(keys)}")
        return [stage for stage in available if stage.number >= first.number]
    return available


def make_plan(params: Params, folder: Path, stages: list[str] | None = None, start: str | None = None,
              force: bool = False) -> list[PlannedStage]:
    available = [stage for stage in STAGES if (folder / stage.notebook).is_file()]
    chosen = select_stages(available, stages, start)
    identities = expected_identities(params, {stage.key for stage in available})
    recorded = read_manifest(params.run_dir).get("stages", {})
    plan: list[PlannedStage] = []
    running: set[str] = set()
    for stage in chosen:
        identity = identities[stage.key]
        entry = recorded.get(stage.key, {})
        # a stage whose upstream reruns must rerun too (its identity changes with the upstream's)
        upstream_reruns = any(get_stage(n).key in running for n in depends_on(stage, params))
        if force:
            action, reason = "run", "--force"
        elif entry.get("status") == "done" and entry.get("identity") == identity and not upstream_reruns:
            if outputs_present(params.run_dir, entry):
                action, reason = "skip", "finished with the same params and upstream (identity matches)"
            else:
                action, reason = "run", "finished before, but output files are missing or changed"
        elif entry.get("status") == "done":
            action, reason = "run", "params or upstream changed since it finished"
        elif entry.get("status") in ("running", "failed", "interrupted"):
            action, reason = "run", f"previous attempt {entry['status']}"
        else:
            action, reason = "run", "not run yet"
        if action == "run":
            running.add(stage.key)
        plan.append(PlannedStage(stage, folder / stage.notebook, identity, action, reason))
    # Every stage that will run must find its upstream finished and current, or run it first.
    for planned in plan:
        if planned.action != "run":
            continue
        for number in depends_on(planned.stage, params):
            dep = get_stage(number)
            if dep.key in running or dep.key not in identities or not (folder / dep.notebook).is_file():
                continue
            entry = recorded.get(dep.key, {})
            if entry.get("status") != "done":
                raise StageError(f"stage {planned.stage.key} needs {dep.key}, which has not finished in {params.run_dir}; "
                                 f"include it (--from {dep.number})")
            if entry.get("identity") != identities[dep.key]:
                raise StageError(f"stage {planned.stage.key} needs {dep.key}, which is out of date for these params; "
                                 f"include it (--from {dep.number})")
    return plan


def render_dry_run(params: Params, plan: list[PlannedStage], out: Printer) -> None:
    import yaml

    from reflectevo.prompts import attempt_prompt
    from reflectevo.tasks import get_task

    out("# resolved params (schema defaults filled in)")
    out(yaml.safe_dump(params.to_dict(), sort_keys=False).rstrip())
    out("\n# stage plan")
    for planned in plan:
        out(f"  {planned.stage.key:12s} {planned.action:4s}  {planned.reason}  [identity {planned.identity[:12]}]")
    out("\n# one rendered prompt per task (the user message; the model's chat template wraps it)")
    for name in params.data.tasks:
        task = get_task(name)
        item, where = sample_item(params, name)
        out(f"\n--- {name} ({where}, fewshots={params.reflect.fewshots}) ---")
        out(attempt_prompt(task, item, fewshots=params.reflect.fewshots))


def sample_item(params: Params, task_name: str):
    """An item to show a prompt with, read from the configured source when it is local."""
    from reflectevo.tasks import get_task

    task = get_task(task_name)
    if params.data.source == "official" and params.data.official_dir:
        path = Path(params.data.official_dir) / task.official_file
        if path.is_file():
            return task.load_official(path)[0], f"first item of {path}"
    note = "a built-in sample item" + (" (hub data is not loaded in a dry run)" if params.data.source == "hub" else "")
    return task.load_samples("train")[0], note


def run_pipeline(params_file: str | Path, *, stages: list[str] | None = None, start: str | None = None,
                 force: bool = False, dry_run: bool = False, notebooks: str | Path | None = None,
                 out: Printer = print) -> int:
    """Run the planned stages; returns the process exit status (0 ok, 1 a stage failed)."""
    params = load_params(params_file)  # errors name the file as the user wrote it
    params_path = Path(params_file).resolve()
    folder = notebooks_dir(notebooks)
    plan = make_plan(params, folder, stages, start, force)
    if dry_run:
        render_dry_run(params, plan, out)
        return 0
    import papermill as pm

    run = open_run(params, params_file=params_path, command=f"reflectevo run {params_file}")
    previous_token = os.environ.get(LOCK_TOKEN_ENV)
    os.environ[LOCK_TOKEN_ENV] = run.lock.token or ""  # the notebooks' kernels join this lock
    try:
        out(f"run {params.run.name!r} -> {run.path}  ({len(plan)} stage(s), notebooks from {folder})")
        for position, planned in enumerate(plan, start=1):
            prefix = f"[{position}/{len(plan)}] {planned.stage.key}"
            if planned.action == "skip":
                out(f"{prefix}: skipped, {planned.reason}")
                continue
            out(f"{prefix}: running ({planned.reason})")
            running = run.notebooks / f".{planned.stage.key}.running.ipynb"
            started = time.monotonic()
            try:
                pm.execute_notebook(str(planned.notebook), str(running), parameters={"params_file": str(params_path)},
                                    kernel_name="python3", cwd=os.getcwd(), progress_bar=False, log_output=False)
            except KeyboardInterrupt:
                # Ctrl-C: the kernel got the same signal; what the stage committed (generation batches,
                # checkpoints, finished adapters) stays, so the same command resumes.
                kept = keep_executed(running, run.notebooks / f"{planned.stage.key}.interrupted.ipynb")
                run.mark_stage_failed(planned.stage.key, "interrupted (Ctrl-C)", status="interrupted")
                out(f"{prefix}: INTERRUPTED (Ctrl-C); finished stages, committed generation batches and checkpoints "
                    f"are kept: rerun the same command to resume.{kept}")
                return 130
            except Exception as exc:  # noqa: BLE001  (a failing cell, a dead kernel: report any of them)
                where = describe_failure(exc, running)
                kept = keep_executed(running, run.notebooks / f"{planned.stage.key}.failed.ipynb")
                run.mark_stage_failed(planned.stage.key, where)
                out(f"{prefix}: FAILED in {planned.stage.notebook}, {where}{kept}")
                return 1
            os.replace(running, run.notebooks / planned.stage.notebook)
            for leftover in ("failed", "interrupted"):
                (run.notebooks / f"{planned.stage.key}.{leftover}.ipynb").unlink(missing_ok=True)
            entry = read_manifest(run.path).get("stages", {}).get(planned.stage.key, {})
            if entry.get("status") != "done" or entry.get("identity") != planned.identity:
                out(f"{prefix}: FAILED, the notebook ran to the end but did not record the stage as done with "
                    f"identity {planned.identity[:12]} (recorded: {entry.get('status')}, {str(entry.get('identity'))[:12]})")
                return 1
            out(f"{prefix}: done in {time.monotonic() - started:.1f} s")
        out(f"run {params.run.name!r} complete: {run.path / 'manifest.json'}")
        return 0
    finally:
        if previous_token is None:
            os.environ.pop(LOCK_TOKEN_ENV, None)
        else:
            os.environ[LOCK_TOKEN_ENV] = previous_token
        run.close()


def keep_executed(running: Path, kept: Path) -> str:
    """Keep the executed copy of a stage that did not finish; returns the line that says where."""
    if not running.exists():
        return ""
    os.replace(running, kept)
    return f"\n  executed notebook kept at {kept}"


def describe_failure(exc: Exception, executed: Path | None = None) -> str:
    """Where and why a stage failed: the cell and its error, or, when the kernel died, the cell that
    was running (papermill saves the executed copy as each cell starts)."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        first_line = next((line for line in (exc.source or "").splitlines() if line.strip()), "")
        return (f"cell {exc.cell_index + 1} of the executed notebook (In [{exec_count(exc)}], starting "
                f"{first_line[:60]!r}): {exc.ename}: {exc.evalue}")
    if type(exc).__name__ == "DeadKernelError":
        cell = running_cell(executed)
        where = f"cell {cell[0] + 1} of the executed notebook (starting {cell[1][:60]!r})" if cell else "an unknown cell"
        return (f"{where}: the kernel died ({exc}). A kernel killed without a Python error is most often the "
                "operating system's out-of-memory killer: lower generation.batch_size or sft/dpo per_device_batch_size "
                "and max_length, or free memory, then rerun; finished work is kept")
    return f"{type(exc).__name__}: {exc}"


def running_cell(executed: Path | None) -> tuple[int, str] | None:
    """The cell that was executing when the kernel died, with its first line: the one papermill marked
    "running", else (papermill's last save marks it completed) the last cell that has a start time."""
    if executed is None or not executed.is_file():
        return None
    try:
        cells = json.loads(executed.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError):
        return None
    marks = [cell.get("metadata", {}).get("papermill", {}) for cell in cells]
    started = [index for index, mark in enumerate(marks) if mark.get("start_time")]
    running = [index for index, mark in enumerate(marks) if mark.get("status") == "running"]
    if not (running or started):
        return None
    index = (running or started)[-1]
    source = "".join(cells[index].get("source", []))
    return index, next((line for line in source.splitlines() if line.strip()), "")


def exec_count(exc) -> str:
    return str(exc.exec_count) if exc.exec_count is not None else " "


