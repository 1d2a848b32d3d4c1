"""``reflectevo run PARAMS``: execute the numbered notebooks in order with papermill.

For each stage the runner computes its identity (the params sections it reads plus the identities
of the stages it depends on, see :mod:`reflectevo.runs`) and skips it when the run directory
already holds that stage, finished, with the same identity and its output files present. A stage
runs in a fresh kernel, started in the current working directory with ``params_file`` injected;
its executed copy goes to ``outputs/<run>/notebooks/`` (``<stage>.failed.ipynb`` when a cell
failed). The first failing stage stops the run, naming the notebook and the cell.

With several rounds of self-evolution (``evolve.rounds >= 2``) the order is 01, then 02-05 of round 1,
of round 2, ..., then 06; a round's stages get the ``evolve`` section injected with ``round: k`` and
keep their executed copies in ``outputs/<run>/round_<k>/notebooks/``. After each round's stage 05 the
runner records the round in the run's manifest (``evolve.rounds``) and applies the stopping rule
(``evolve.stop_margin``): when it stops, it says why, records ``evolve.stopped`` and skips the later
rounds, and stage 06 covers the rounds that ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo.cli.live import live_stage, summary_lines
from reflectevo.config import Params, load_params, round_folder
from reflectevo.errors import ReflectEvoError, StageError
from reflectevo.runs.lock import LOCK_TOKEN_ENV, now
from reflectevo.runs.plan import (
    Address,
    address_identity,
    parse_address,
    read_manifest,
    recorded_entry,
    round_manifest_path,
    run_order,
    upstream_of,
)
from reflectevo.runs.rundir import RunDir, open_run
from reflectevo.runs.stages import STAGES, Stage, evolving, for_round, get_stage

if TYPE_CHECKING:
    from reflectevo.evolve import StopDecision
from reflectevo.evolve import stop_rule
from reflectevo.prompts import attempt_prompt
from reflectevo.tasks import get_task

Printer = Callable[[str], None]


@dataclass
class PlannedStage:
    stage: Stage
    notebook: Path
    identity: str
    action: str  # "run" | "skip"
    reason: str
    round: int | None = None  # the round of a per-round stage in a run of several rounds

    @property
    def address(self) -> Address:
        return Address(self.stage, self.round)

    @property
    def key(self) -> str:
        """``03_sft``, or ``round_2:03_sft`` for a stage of a round."""
        return self.address.key


def child_processes() -> list[int]:
    """Process ids of this process's children (Linux: /proc/self/task/<tid>/children)."""
    children: list[int] = []
    for task in Path("/proc/self/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


@contextlib.contextmanager
def ctrl_c_noted(presses: list[float]) -> Iterator[None]:
    """While a stage's notebook runs, the first Ctrl-C is noted in ``presses`` and passed on to the kernel.

    The kernel runs in its own session, so a terminal's Ctrl-C does not reach it; forwarded (as a
    Jupyter front end does), it stops the running cell, and papermill returns with that cell's error
    and shuts its kernel down as after any failure. Raising KeyboardInterrupt in this process instead
    lands at an arbitrary point of papermill's event loop, whose cleanup can then wait forever. A
    second Ctrl-C raises as usual.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def note(signum: int, frame: Any) -> None:
        if presses:
            raise KeyboardInterrupt
        presses.append(time.monotonic())
        for child in child_processes():  # the kernel is this process's child
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def notebooks_dir(explicit: str | Path | None = None) -> Path:
    """The folder of the numbered notebooks: given, else ``./notebooks``, else the source tree's."""
    candidates = (
        [Path(explicit)] if explicit else [Path.cwd() / "notebooks", Path(__file__).resolve().parents[2] / "notebooks"]
    )
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("[0-9][0-9]_*.ipynb")):
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ReflectEvoError(f"no numbered notebooks found (looked in {tried}); pass --notebooks DIR")


def expected_identities(params: Params, available: set[str], last: int | None = None) -> dict[str, str]:
    """Each stage's identity (by address key) if every stage upstream of it is (re)run with these params;
    ``last`` is the last round stage 06 covers (default evolve.rounds)."""
    identities: dict[str, str] = {}
    for address in run_order(params):
        upstream = {
            key: identities.get(dep.key) if dep.stage.key in available else None
            for key, dep in upstream_of(address, params, last).items()
        }
        identities[address.key] = address_identity(params, address, upstream, last)
    return identities


def outputs_present(run_dir: Path, entry: dict) -> bool:
    outputs = entry.get("outputs") or {}
    return all(
        (run_dir / rel).is_file() and (run_dir / rel).stat().st_size == meta.get("bytes")
        for rel, meta in outputs.items()
    )


def select_stages(available: list[Stage], stages: list[str] | None, start: str | None, params: Params) -> list[Address]:
    """The stages ``--stages`` or ``--from`` name, in run order. In a run of several rounds a plain stage
    name means that stage in every round (``--stages 03``: 03 of each round; ``--from 03``: round 1's 03 and
    everything after it); ``round_<k>:<stage>`` names one round's."""
    if stages and start:
        raise ReflectEvoError("give either --stages or --from, not both")
    order = run_order(params, available)
    keys = [stage.key for stage in available]

    def addresses(name: str) -> list[Address]:
        found = parse_address(name, params)
        missing = [address.stage.key for address in found if address.stage.key not in keys]
        if missing:
            raise ReflectEvoError(
                f"no notebook for stage(s) {', '.join(dict.fromkeys(missing))}; available: {', '.join(keys)}"
            )
        return found

    if stages:
        wanted = {address for name in stages for address in addresses(name)}
        return [address for address in order if address in wanted]
    if start:
        return order[order.index(addresses(start)[0]) :]
    return order


def make_plan(
    params: Params, folder: Path, stages: list[str] | None = None, start: str | None = None, force: bool = False
) -> list[PlannedStage]:
    available = [stage for stage in STAGES if (folder / stage.notebook).is_file()]
    chosen = select_stages(available, stages, start, params)
    available_keys = {stage.key for stage in available}
    cache: dict[Path, dict] = {}
    recorded = {address.key: recorded_entry(params.top_run_dir, address, cache) for address in run_order(params)}
    plan = plan_for(params, folder, chosen, available_keys, recorded, force, params.evolve.rounds)
    if evolving(params):
        # rounds whose results are on disk and current may already say the run stops early
        stop = find_stop(params, recorded, current_rounds(params, plan, recorded, available_keys, params.evolve.rounds))
        if stop.after_round is not None and stop.after_round < params.evolve.rounds:
            plan = plan_for(params, folder, chosen, available_keys, recorded, force, stop.after_round)
    check_upstream(params, plan, folder, recorded, available_keys)
    return plan


def plan_for(
    params: Params,
    folder: Path,
    chosen: list[Address],
    available: set[str],
    recorded: dict[str, dict],
    force: bool,
    last: int,
) -> list[PlannedStage]:
    """Run or skip, and why, for every chosen stage, with stage 06 covering rounds 1..``last``."""
    identities = expected_identities(params, available, last)
    top = params.top_run_dir
    plan: list[PlannedStage] = []
    running: set[str] = set()
    for address in chosen:
        identity = identities[address.key]
        entry = recorded.get(address.key, {})
        # a stage whose upstream reruns must rerun too (its identity changes with the upstream's)
        upstream_reruns = any(dep.key in running for dep in upstream_of(address, params, last).values())
        if address.round is not None and address.round > last:
            action, reason = "skip", f"the run stops after round {last} (evolve.stop_margin)"
        elif force:
            action, reason = "run", "--force"
        elif entry.get("status") == "done" and entry.get("identity") == identity and not upstream_reruns:
            if outputs_present(round_manifest_path(top, address.round), entry):
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
            running.add(address.key)
        plan.append(
            PlannedStage(address.stage, folder / address.stage.notebook, identity, action, reason, address.round)
        )
    return plan


def check_upstream(
    params: Params, plan: list[PlannedStage], folder: Path, recorded: dict[str, dict], available: set[str]
) -> None:
    """Every stage that will run must find its upstream finished and current, or run it first."""
    identities = expected_identities(params, available, stage_06_last(params, plan))
    running = {planned.key for planned in plan if planned.action == "run"}
    for planned in plan:
        if planned.action != "run":
            continue
        for dep in upstream_of(planned.address, params, stage_06_last(params, plan)).values():
            if dep.key in running or dep.stage.key not in available:
                continue
            entry = recorded.get(dep.key, {})
            if entry.get("status") != "done":
                raise StageError(
                    f"stage {planned.key} needs {dep.key}, which has not finished in {params.top_run_dir}; "
                    f"include it (--from {short(dep)})"
                )
            if entry.get("identity") != identities[dep.key]:
                raise StageError(
                    f"stage {planned.key} needs {dep.key}, which is out of date for these params; "
                    f"include it (--from {short(dep)})"
                )


def short(address: Address) -> str:
    """How to name a stage on the command line: ``02``, or ``round_2:02``."""
    return f"round_{address.round}:{address.stage.number}" if address.round else address.stage.number


def stage_06_last(params: Params, plan: list[PlannedStage]) -> int:
    """The last round the plan's stage 06 covers (the rounds after it are skipped as stopped)."""
    stopped = [p.round for p in plan if p.round is not None and p.reason.startswith("the run stops after")]
    return min(stopped) - 1 if stopped else params.evolve.rounds


def current_rounds(
    params: Params, plan: list[PlannedStage], recorded: dict[str, dict], available: set[str], last: int
) -> set[int]:
    """The rounds whose stage 05 finished with the identity these params give it and will not rerun:
    their validation scores can decide the stopping rule before anything runs."""
    identities = expected_identities(params, available, last)
    running = {planned.key for planned in plan if planned.action == "run"}
    current = set()
    for number in range(1, params.evolve.rounds + 1):
        key = Address(get_stage("05"), number).key
        entry = recorded.get(key, {})
        if key not in running and entry.get("status") == "done" and entry.get("identity") == identities.get(key):
            current.add(number)
    return current


def find_stop(params: Params, recorded: dict[str, dict], current: set[int]) -> StopDecision:
    """The stopping rule over the rounds in ``current`` (from round 2 on, in order, until a round is not current)."""

    scores = {
        number: (recorded.get(Address(get_stage("05"), number).key, {}).get("validation") or {}).get("score")
        for number in sorted(current)
    }
    return stop_rule(params.evolve, scores)


def render_dry_run(params: Params, plan: list[PlannedStage], out: Printer) -> None:
    import yaml

    out("# resolved params (schema defaults filled in)")
    out(yaml.safe_dump(params.to_dict(), sort_keys=False).rstrip())
    out("\n# stage plan")
    width = max([12, *(len(planned.key) for planned in plan)])
    for planned in plan:
        out(f"  {planned.key:{width}s} {planned.action:4s}  {planned.reason}  [identity {planned.identity[:12]}]")
    out("\n# one rendered prompt per task (the user message; the model's chat template wraps it)")
    for name in params.data.tasks:
        task = get_task(name)
        item, where = sample_item(params, name)
        out(f"\n--- {name} ({where}, fewshots={params.reflect.fewshots}) ---")
        out(attempt_prompt(task, item, fewshots=params.reflect.fewshots))


def sample_item(params: Params, task_name: str):
    """An item to show a prompt with, read from the configured source when it is local."""

    task = get_task(task_name)
    if params.data.source == "official" and params.data.official_dir:
        path = Path(params.data.official_dir) / task.official_file
        if path.is_file():
            return task.load_official(path)[0], f"first item of {path}"
    note = "a built-in sample item" + (" (hub data is not loaded in a dry run)" if params.data.source == "hub" else "")
    return task.load_samples("train")[0], note


def run_pipeline(
    params_file: str | Path,
    *,
    stages: list[str] | None = None,
    start: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    notebooks: str | Path | None = None,
    out: Printer = print,
    quiet: bool = False,
) -> int:
    """Run the planned stages; returns the process exit status (0 ok, 1 a stage failed). Unless ``quiet``,
    each stage's sections and progress are printed as it runs, and a summary at the end (:mod:`.live`)."""
    params = load_params(params_file)  # errors name the file as the user wrote it
    if params.evolve.round is not None:
        raise ReflectEvoError(
            f"{params_file}: evolve.round is set ({params.evolve.round}); the runner sets it for each "
            "round's stages: remove it and choose rounds with --stages/--from round_<k>:<stage>"
        )
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
    rounds: dict[int, RunDir] = {}  # each round's folder, opened (it joins the run's lock) when first needed
    seconds: dict[str, float] = {}  # stage -> seconds, for the summary
    skipped: list[str] = []
    try:
        out(f"run {params.run.name!r} -> {run.path}  ({len(plan)} stage(s), notebooks from {folder})")
        if evolving(params):
            out(
                f"self-evolution: {params.evolve.rounds} rounds, generator {params.evolve.generator}, data "
                f"{params.evolve.data}, stop margin {params.evolve.stop_margin}"
            )
            record_policy(run, params)
            settle_stop(run, params, plan, folder, out)
        for position, planned in enumerate(plan, start=1):
            prefix = f"[{position}/{len(plan)}] {planned.key}"
            if planned.action == "skip":
                out(f"{prefix}: skipped, {planned.reason}")
                skipped.append(planned.key)
                if (
                    planned.round is not None
                    and planned.stage.number == "05"
                    and planned.round <= stage_06_last(params, plan)
                ):
                    after_round(run, params, plan, position, folder, out)
                continue
            if planned.round is not None and planned.round not in rounds:
                rounds[planned.round] = open_run(
                    for_round(params, planned.round), params_file=params_path, command=f"reflectevo run {params_file}"
                )
            where = rounds[planned.round] if planned.round is not None else run
            out(f"{prefix}: running ({planned.reason})")
            running = where.notebooks / f".{planned.stage.key}.running.ipynb"
            injected: dict[str, Any] = {"params_file": str(params_path)}
            if planned.round is not None:  # the round travels in the evolve section, which replaces the file's whole
                injected["evolve"] = {**params.evolve.model_dump(mode="json"), "round": planned.round}
            started = time.monotonic()
            interrupted, ctrl_c = False, []
            try:
                with ctrl_c_noted(ctrl_c), live_stage(out, enabled=not quiet) as engine:
                    pm.execute_notebook(
                        str(planned.notebook),
                        str(running),
                        parameters=injected,
                        kernel_name="python3",
                        cwd=os.getcwd(),
                        progress_bar=False,
                        log_output=False,
                        **engine,
                    )
                interrupted = bool(ctrl_c)  # the kernel finished the stage anyway: stop before the next one
            except KeyboardInterrupt:
                interrupted = True
            except Exception as exc:  # noqa: BLE001  (a failing cell, a dead kernel: report any of them)
                interrupted = bool(ctrl_c)  # the kernel's cell stopped on the same Ctrl-C
                if not interrupted:
                    reason = describe_failure(exc, running)
                    kept = keep_executed(running, where.notebooks / f"{planned.stage.key}.failed.ipynb")
                    where.mark_stage_failed(planned.stage.key, reason)
                    out(f"{prefix}: FAILED in {planned.stage.notebook}, {reason}{kept}")
                    return 1
            if interrupted:
                # Ctrl-C: the kernel got the same signal; what the stage committed (generation batches,
                # checkpoints, finished adapters) stays, so the same command resumes.
                kept = keep_executed(running, where.notebooks / f"{planned.stage.key}.interrupted.ipynb")
                where.mark_stage_failed(planned.stage.key, "interrupted (Ctrl-C)", status="interrupted")
                out(
                    f"{prefix}: INTERRUPTED (Ctrl-C); finished stages, committed generation batches and checkpoints "
                    f"are kept: rerun the same command to resume.{kept}"
                )
                return 130
            os.replace(running, where.notebooks / planned.stage.notebook)
            for leftover in ("failed", "interrupted"):
                (where.notebooks / f"{planned.stage.key}.{leftover}.ipynb").unlink(missing_ok=True)
            entry = read_manifest(where.path).get("stages", {}).get(planned.stage.key, {})
            if entry.get("status") != "done" or entry.get("identity") != planned.identity:
                out(
                    f"{prefix}: FAILED, the notebook ran to the end but did not record the stage as done with "
                    f"identity {planned.identity[:12]} (recorded: {entry.get('status')}, {str(entry.get('identity'))[:12]})"
                )
                return 1
            seconds[planned.key] = time.monotonic() - started
            out(f"{prefix}: done in {seconds[planned.key]:.1f} s")
            if planned.round is not None and planned.stage.number == "05":
                after_round(run, params, plan, position, folder, out)
        out(f"run {params.run.name!r} complete: {run.path / 'manifest.json'}")
        if not quiet:
            for line in summary_lines(run.path, seconds, skipped):
                out(line)
        return 0
    finally:
        if previous_token is None:
            os.environ.pop(LOCK_TOKEN_ENV, None)
        else:
            os.environ[LOCK_TOKEN_ENV] = previous_token
        for opened in rounds.values():
            opened.close()
        run.close()


# ---- rounds: the run's record of them, and the stopping rule --------------------------------------
def record_policy(run: RunDir, params: Params) -> None:
    def change(manifest: dict[str, Any]) -> None:
        evolve = manifest.setdefault("evolve", {})
        evolve["policy"] = {
            key: value for key, value in params.evolve.model_dump(mode="json").items() if key != "round"
        }
        evolve.setdefault("rounds", {})

    run.update_manifest(change)


def after_round(
    run: RunDir, params: Params, plan: list[PlannedStage], position: int, folder: Path, out: Printer
) -> None:
    """Once a round's stage 05 is done (run or skipped): its summary in the run's manifest, then the
    stopping rule, which may skip the later rounds and change what stage 06 covers."""
    number = plan[position - 1].round
    top = params.top_run_dir
    manifest = read_manifest(top / round_folder(number))
    stages = manifest.get("stages", {})
    reflect, evaluation = stages.get("02_reflect", {}), stages.get("05_eval", {})
    summary = {
        "manifest": f"{round_folder(number)}/manifest.json",
        "seed": (manifest.get("seeds") or {}).get("run"),
        "generator": reflect.get("generator"),
        "training_data": reflect.get("training_data"),
        "validation": evaluation.get("validation"),
        "stages": {key: entry.get("status") for key, entry in sorted(stages.items())},
    }
    run.update_manifest(
        lambda m: m.setdefault("evolve", {}).setdefault("rounds", {}).__setitem__(round_folder(number), summary)
    )
    validation = summary["validation"] or {}
    if validation.get("generator"):
        out(
            f"  round {number}: validation Acc@t2 ({validation.get('protocol')}, {validation.get('grader')}) of "
            f"{validation['generator']}: {fmt_score(validation.get('score'))}"
        )
    settle_stop(run, params, plan, folder, out, position)


def settle_stop(
    run: RunDir, params: Params, plan: list[PlannedStage], folder: Path, out: Printer, position: int = 0
) -> None:
    """Decide the stopping rule from every round whose stage 05 is current, record the decision in the
    run's manifest (``evolve.stopped``), and, when it stops, skip the later rounds' planned stages and
    re-plan stage 06 for the rounds that ran."""
    available = {stage.key for stage in STAGES if (folder / stage.notebook).is_file()}
    cache: dict[Path, dict] = {}
    recorded = {address.key: recorded_entry(params.top_run_dir, address, cache) for address in run_order(params)}
    done = {p.key for p in plan[:position]}  # what this invocation has already run or skipped counts as current
    pending = [p for p in plan[position:] if p.action == "run"]
    current = current_rounds(params, pending, recorded, available, params.evolve.rounds)
    current |= {p.round for p in plan if p.key in done and p.stage.number == "05" and p.round is not None}
    stop = find_stop(params, recorded, current)

    def change(manifest: dict[str, Any]) -> None:
        evolve = manifest.setdefault("evolve", {})
        recorded_stop = evolve.get("stopped")
        if stop.after_round is not None:
            evolve["stopped"] = {"after_round": stop.after_round, "reason": stop.reason, "time": now()}
        elif recorded_stop and (
            params.evolve.stop_margin is None or recorded_stop.get("after_round", 0) <= stop.decided_through
        ):
            evolve.pop("stopped", None)  # the rounds it was decided on are current now and no longer stop

    run.update_manifest(change)
    if stop.after_round is None or stop.after_round >= params.evolve.rounds:
        if stop.after_round is not None:
            out(f"  round {stop.after_round}: {stop.reason} (it was the last round anyway)")
        return
    later = [p for p in plan[position:] if p.round is not None and p.round > stop.after_round and p.action == "run"]
    final = [p for p in plan[position:] if p.round is None and p.stage.number > "05"]
    if later or position == 0:  # said once: when the plan learns it, before anything runs or after that round
        out(
            f"  stopping after round {stop.after_round}: {stop.reason}; rounds {stop.after_round + 1}-"
            f"{params.evolve.rounds} are not run"
        )
    if not later and all(p.identity == expected_identities(params, available, stop.after_round)[p.key] for p in final):
        return  # already planned that way
    for planned in later:
        planned.action, planned.reason = "skip", f"the run stops after round {stop.after_round} (evolve.stop_margin)"
    replanned = plan_for(params, folder, [p.address for p in final], available, recorded, False, stop.after_round)
    for planned, again in zip(final, replanned):
        planned.identity = again.identity
        if planned.reason != "--force":
            planned.action, planned.reason = again.action, again.reason


def fmt_score(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.4f}"


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
        return (
            f"cell {exc.cell_index + 1} of the executed notebook (In [{exec_count(exc)}], starting "
            f"{first_line[:60]!r}): {exc.ename}: {exc.evalue}"
        )
    if type(exc).__name__ == "DeadKernelError":
        cell = running_cell(executed)
        where = (
            f"cell {cell[0] + 1} of the executed notebook (starting {cell[1][:60]!r})" if cell else "an unknown cell"
        )
        return (
            f"{where}: the kernel died ({exc}). A kernel killed without a Python error is most often the "
            "operating system's out-of-memory killer: lower generation.batch_size or sft/dpo per_device_batch_size "
            "and max_length, or free memory, then rerun; finished work is kept"
        )
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
