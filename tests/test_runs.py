"""Run directories: atomic files, the writer lock (refusal, stale take-over, joining), the manifest
and stage bookkeeping. Processes are real: a second writer is another Python process."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import LOCK_HOLDER, start_lock_holder

from reflectevo.config import load_params
from reflectevo.core.files import atomic_directory, atomic_write_json, atomic_write_text
from reflectevo.errors import OutputWriteError, ReflectEvoError, RunLockedError, StageError
from reflectevo.runs.lock import LOCK_TOKEN_ENV
from reflectevo.runs.plan import read_manifest
from reflectevo.runs.rundir import open_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path):
    return load_params(None, {"run": {"name": "t", "output_dir": str(tmp_path / "outputs")}})


def test_atomic_write_leaves_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary file left behind


def test_atomic_directory_replaces_only_on_success(tmp_path):
    folder = tmp_path / "ds"
    with atomic_directory(folder) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(folder) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed halfway")
    assert (folder / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_a_second_writer_is_refused_with_who_holds_the_lock(params, tmp_path):
    holder = start_lock_holder(tmp_path / "outputs" / "t", 30)
    try:
        with pytest.raises(RunLockedError) as info:
            open_run(params)
        message = str(info.value)
        assert f"pid {holder.pid}" in message and "holder" in message and "Wait for it" in message
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_recorded(params, tmp_path):
    holder = start_lock_holder(tmp_path / "outputs" / "t", 30)
    holder.kill()  # dies holding the lock, as a killed kernel does
    holder.wait()
    run = open_run(params)
    try:
        events = run.manifest()["events"]
        assert events[-1]["kind"] == "lock" and f"pid {holder.pid}" in events[-1]["note"]
        assert json.loads((run.path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        run.close()
    assert not (run.path / ".lock").exists()


def test_a_process_started_by_the_holder_joins_its_lock(params, monkeypatch):
    run = open_run(params)
    try:
        monkeypatch.setenv(LOCK_TOKEN_ENV, run.lock.token)
        joined = open_run(params)
        assert not joined.lock.owned
        joined.close()  # a joiner never releases the holder's lock
        assert (run.path / ".lock").exists()
        monkeypatch.delenv(LOCK_TOKEN_ENV)
        other = subprocess.run(  # a process the holder did not start is refused
            [sys.executable, "-c", LOCK_HOLDER, str(run.path.parent), run.path.name, "0"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert other.returncode != 0 and "is being written" in other.stderr
    finally:
        run.close()


def test_the_same_process_opening_the_run_again_takes_the_lock_afresh(params):
    # A notebook's opening cell executed twice in one kernel: the second open takes the lock over
    # (a new token); the first one's close then leaves the new holder's lock alone.
    first = open_run(params)
    second = open_run(params)
    assert second.lock.owned and not first.lock.owned
    with pytest.raises(StageError, match="opened again in this process"):
        first.add_event({"kind": "test"})  # the former opening no longer writes
    first.close()
    assert json.loads((second.path / ".lock").read_text())["token"] == second.lock.token
    second.close()
    assert not (second.path / ".lock").exists()


def test_a_closed_run_refuses_every_write_and_says_how_to_reopen(params):
    run = open_run(params)
    stage = run.begin_stage("01_data")
    stage.finish()
    run.close()
    before = (run.path / "manifest.json").read_bytes()
    attempts = (
        lambda: stage.finish(),
        lambda: stage.dir,
        lambda: run.figures,
        lambda: run.begin_stage("01_data"),
        lambda: run.add_event({"kind": "test"}),
    )
    for attempt in attempts:
        with pytest.raises(StageError, match=r"was closed .*re-execute the notebook from the cell that opens the run"):
            attempt()
    assert (run.path / "manifest.json").read_bytes() == before
    reopened = open_run(params)  # what the message says to do
    reopened.begin_stage("01_data").finish()
    reopened.close()
    assert json.loads((run.path / "manifest.json").read_text())["stages"]["01_data"]["status"] == "done"


def test_manifest_records_the_facts_a_number_needs(params, tmp_path):
    params_file = tmp_path / "p.yaml"
    params_file.write_text("run: {name: t}\n")
    with open_run(params, params_file=params_file) as run:
        manifest = run.manifest()
    for key in ("params", "params_hash", "params_file", "packages", "git", "device", "seeds", "versions", "created"):
        assert key in manifest, key
    assert manifest["params"]["data"]["tasks"] == params.data.tasks
    assert manifest["params_hash"] == params.hash()
    assert len(manifest["params_file"]["sha256"]) == 64
    assert manifest["packages"]["pydantic"] and manifest["packages"]["python"]
    assert manifest["versions"]["tasks"]["logiqa"] and manifest["versions"]["prompts"]
    assert manifest["seeds"]["run"] == params.run.seed
    assert {"notebooks", "figures"} <= {p.name for p in run.path.iterdir()}


def test_stage_bookkeeping(params):
    with open_run(params) as run:
        with pytest.raises(StageError, match="needs 01_data"):
            run.begin_stage("02_reflect")
        stage = run.begin_stage("01")
        assert run.manifest()["stages"]["01_data"]["status"] == "running"
        out = stage.dir / "items.jsonl"
        atomic_write_text(out, '{"a": 1}\n')
        entry = stage.finish(outputs=[out], counts={"x": 1})
        assert entry["status"] == "done" and entry["counts"] == {"x": 1}
        assert entry["outputs"] == {
            "data/items.jsonl": {"sha256": entry["outputs"]["data/items.jsonl"]["sha256"], "bytes": 9}
        }
        assert entry["identity"] == run.stage_identity("01_data")
        reflect = run.begin_stage("02_reflect")  # its upstream has finished now
        reflect.fail("deliberate")
        assert read_manifest(run.path)["stages"]["02_reflect"]["status"] == "failed"


def test_identity_follows_the_params_a_stage_reads(params, tmp_path):
    with open_run(params) as run:
        run.begin_stage("01_data").finish()
        identity_01, identity_02 = run.stage_identity("01_data"), run.stage_identity("02_reflect")
    other_eval = load_params(None, {"run": params.run.model_dump(), "eval": {"max_new_tokens": 3}})
    other_data = load_params(None, {"run": params.run.model_dump(), "data": {"tasks": ["math"]}})
    with open_run(other_eval) as run:
        assert run.stage_identity("01_data") == identity_01
        assert run.stage_identity("02_reflect") == identity_02  # an eval setting never reruns generation
    with open_run(other_data) as run:
        assert run.stage_identity("01_data") != identity_01


def test_identity_follows_the_grader_and_prompt_versions(params, monkeypatch):
    """A run made before a grading or prompt change is recomputed, not skipped with its old verdicts."""
    from reflectevo import prompts
    from reflectevo.runs.plan import identity_of
    from reflectevo.runs.stages import STAGES
    from reflectevo.tasks import get_task

    before = {stage.key: identity_of(params, stage, {}) for stage in STAGES}
    monkeypatch.setattr(type(get_task("logiqa")), "version", "graded-differently")
    assert all(identity_of(params, stage, {}) != before[stage.key] for stage in STAGES)
    monkeypatch.undo()
    monkeypatch.setattr(prompts, "REVIEW_VERSION", "review-99")
    assert all(identity_of(params, stage, {}) != before[stage.key] for stage in STAGES)
    monkeypatch.undo()
    assert {stage.key: identity_of(params, stage, {}) for stage in STAGES} == before


CONCURRENT = textwrap.dedent(
    """
    import sys
    from reflectevo.config import load_params
    from reflectevo.runs.rundir import RunDir
    params = load_params(None, {"run": {"name": "t", "output_dir": sys.argv[1]}})
    run = RunDir(params, params.run_dir)
    for i in range(40):
        run.add_event({"kind": "test", "writer": sys.argv[2], "i": i})
    """
)


def test_concurrent_manifest_updates_lose_nothing(params, tmp_path):
    params.run_dir.mkdir(parents=True)
    writers = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT, str(tmp_path / "outputs"), str(w)]) for w in range(2)
    ]
    deadline = time.monotonic() + 120
    for writer in writers:
        assert writer.wait(timeout=max(1, deadline - time.monotonic())) == 0
    events = read_manifest(params.run_dir)["events"]
    assert sorted((e["writer"], e["i"]) for e in events) == [(str(w), i) for w in range(2) for i in range(40)]


def test_generation_events_reach_the_manifest(params):
    from reflectevo.generation.engines import ReplayEngine
    from reflectevo.generation.requests import GenerationRequest, GenerationSettings

    engine = ReplayEngine([{"key": "a", "text": "Thought: x\nAction: Finish[A]"}])
    engine.generate(
        [GenerationRequest("a", [{"role": "user", "content": "q"}])], GenerationSettings(), stage="first_trial"
    )
    engine.events.append({"event": "oom_backoff", "batch": 3, "from": 8, "to": 4})
    with open_run(params) as run:
        run.record_engine("02_reflect/first_trial", engine)
        run.record_engine("02_reflect/first_trial", engine)  # recording again does not duplicate events
        manifest = run.manifest()
    assert manifest["generation"]["02_reflect/first_trial"]["engine"] == "replay"
    backoffs = [e for e in manifest["events"] if e.get("event") == "oom_backoff"]
    assert len(backoffs) == 1 and backoffs[0]["from"] == 8 and backoffs[0]["stage"] == "02_reflect/first_trial"


def test_atomic_writes_leave_files_readable_as_a_plain_write_would(tmp_path):
    import os

    from reflectevo.core.files import atomic_directory, atomic_write_text
    from reflectevo.core.jsonl import write_jsonl_atomic

    previous = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "a.txt", "x")
        rows = write_jsonl_atomic(tmp_path / "b.jsonl", [{"a": 1}])
        with atomic_directory(tmp_path / "folder") as folder:
            (folder / "inside.txt").write_text("y")
    finally:
        os.umask(previous)
    assert oct(text.stat().st_mode & 0o777) == oct(rows.stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "folder").stat().st_mode & 0o777) == oct(0o755)


# ---- a full disk, an unwritable folder --------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["json", "jsonl", "directory", "figure"])
def test_a_full_disk_gives_a_clear_error_and_keeps_the_earlier_file(tmp_path, monkeypatch, writer):
    """ENOSPC injected where the bytes reach the disk: a clear error, the earlier version intact, no temporary left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reflectevo.core.jsonl import write_jsonl_atomic
    from reflectevo.plots import save_figure

    target = tmp_path / {"json": "a.json", "jsonl": "a.jsonl", "directory": "adapter", "figure": "a.png"}[writer]
    if writer == "directory":
        target.mkdir()
        (target / "weights").write_text("earlier")
    else:
        target.write_text("earlier")
    before = sorted(p.name for p in tmp_path.iterdir())

    def write() -> None:
        if writer == "json":
            atomic_write_json(target, {"a": 1})
        elif writer == "jsonl":
            write_jsonl_atomic(target, [{"a": 1}, {"b": 2}])
        elif writer == "directory":
            with atomic_directory(target) as folder:
                (folder / "weights").write_text("half")
                no_space()  # as a library's save would fail on a full disk
        else:
            figure = plt.figure()
            monkeypatch.setattr(type(figure), "savefig", lambda self, out, **kw: (out.write(b"half"), no_space()))
            save_figure(figure, target)

    if writer in ("json", "jsonl"):
        monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputWriteError) as caught:
        write()
    message = str(caught.value)
    assert f"could not write {target}" in message and "No space left on device [ENOSPC]" in message
    assert "free space" in message and "run.output_dir" in message and "rerun the same command" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary file or folder left
    assert (target / "weights" if writer == "directory" else target).read_text() == "earlier"


def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    params = load_params(None, {"run": {"name": "r", "output_dir": str(blocker / "outputs")}})
    with pytest.raises(ReflectEvoError, match=r"cannot create the run folder .*a-file/outputs/r.*run\.output_dir"):
        open_run(params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def namespace_mount(options: str) -> list[str] | None:
    """A command prefix that runs a program with a private tmpfs (``options``) mounted on "$1", in a new
    user and mount namespace; None where the system does not allow one."""
    import shutil

    if shutil.which("unshare") is None:
        return None
    prefix = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        f'mount -t tmpfs -o {options} tmpfs "$1" && shift && exec "$@"',
        "sh",
    ]
    probe = subprocess.run([*prefix, "/tmp", "true"], capture_output=True, check=False)
    return prefix if probe.returncode == 0 else None


@pytest.mark.parametrize("options", ["size=96k", "ro"], ids=["full-disk", "read-only"])
def test_stage_01_on_a_small_or_read_only_file_system(tmp_path, options):
    """A real small tmpfs (or a read-only one): stage 01 stops with the clear error and leaves nothing half-written."""
    prefix = namespace_mount(options)
    if prefix is None:
        pytest.skip(
            "no user and mount namespaces here for a private tmpfs; the injected errors above cover the writers"
        )
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        (REPO / "params" / "smoke.yaml").read_text().replace("name: smoke", f"name: smoke\n  output_dir: {outputs}")
    )
    result = subprocess.run(
        [
            *prefix,
            str(outputs),
            sys.executable,
            str(REPO / "tests" / "faults.py"),
            "cells",
            str(REPO / "notebooks" / "01_data.ipynb"),
            str(recipe),
            "--check",
            str(outputs),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 3, result.stdout[-2000:] + result.stderr[-3000:]
    error = json.loads(result.stdout.strip().splitlines()[-1])
    print(error["message"])
    if options == "ro":
        assert error["error"] == "ReflectEvoError" and "cannot create the run folder" in error["message"]
        assert "Read-only file system" in error["message"]
    else:
        assert error["error"] == "OutputWriteError", error
        assert "No space left on device [ENOSPC]" in error["message"] and "free space" in error["message"]
    # checked inside, before the private tmpfs went away with its namespace
    assert error["half_written"] == [] and error["leftovers"] == [], error
    print("kept on the full disk:", error["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "recipe.yaml"]  # nothing written outside
