"""Run directories: the manifest, stage records, open_run."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from reflectevo.config import Params
from reflectevo.core.files import atomic_write_json, file_sha256, remove_temporaries
from reflectevo.errors import ReflectEvoError, StageError
from reflectevo.runs.lock import RunLock, _pid_alive, now
from reflectevo.runs.plan import (
    MANIFEST,
    Address,
    address_identity,
    last_round,
    read_manifest,
    recorded_entry,
    upstream_of,
)
from reflectevo.runs.provenance import device_info, git_commit, package_versions, versions_of_tasks_and_prompts
from reflectevo.runs.stages import Stage, evolving, get_stage, is_round_stage

SUBDIRS = ("notebooks", "figures")


# ---- the run directory -------------------------------------------------------------------------
class RunDir:
    """One run's folder. Open it with :func:`open_run`; use it as a context manager or call close()."""

    def __init__(self, params: Params, root: Path):
        self.params = params
        self.path = root
        self.round = params.evolve.round if evolving(params) else None
        self.top = root.parent if self.round else root  # the run's folder; a round's is inside it
        self.lock = RunLock(self.top)  # one writer for the whole run, every round included
        self.closed = False

    def check_writable(self) -> None:
        """Refuse to write once close() ran (the lock is released, so another process may be writing), or
        once this process opened the run again (the newer RunDir holds the lock).

        In Jupyter these are a cell executed again after the stage's last cell (which closes the run),
        and a cell of the former opening executed after the opening cell ran again."""
        if self.closed:
            raise StageError(
                f"the run {self.path} was closed (rundir.close() ran at the end of the stage) and no longer "
                "holds the run's lock, so nothing was written; to run the stage again, re-execute the "
                "notebook from the cell that opens the run (rundir = open_run(...))"
            )
        if self.lock.superseded:
            raise StageError(
                f"the run {self.path} was opened again in this process (a later open_run, such as the opening "
                "cell executed again), which holds its lock now; write through the run that call returned"
            )

    # -- paths
    def stage_dir(self, stage: str) -> Path:
        spec = get_stage(stage)
        # every round reads the run's one stage 01
        path = (self.top if self.round and not is_round_stage(spec) else self.path) / spec.folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def figures(self) -> Path:
        """Where the stages save their figures; only while the run is open (it is written to)."""
        self.check_writable()
        return self.path / "figures"

    @property
    def notebooks(self) -> Path:
        return self.path / "notebooks"

    # -- manifest
    def manifest(self) -> dict[str, Any]:
        """This folder's manifest; a round's shows the run's stage 01 among its stages (it reads its data)."""
        manifest = read_manifest(self.path)
        if self.round:
            shared = read_manifest(self.top).get("stages", {}).get("01_data")
            if shared is not None:
                manifest.setdefault("stages", {})["01_data"] = shared
        return manifest

    def update_manifest(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, change and rewrite the manifest atomically, serialised between processes."""
        self.check_writable()
        with open(self.path / ".manifest.guard", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                # manifest temporaries are only made under this guard: any there now is a killed writer's
                remove_temporaries(self.path, prefix=f".{MANIFEST}.", recursive=False)
                manifest = read_manifest(self.path)
                change(manifest)
                atomic_write_json(self.path / MANIFEST, manifest)
                return manifest
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def record(self, key: str, value: Any) -> None:
        """Store a top-level manifest entry (e.g. the model actually loaded)."""
        self.update_manifest(lambda m: m.__setitem__(key, value))

    def add_event(self, event: dict[str, Any]) -> None:
        """Append an event (an out-of-memory back-off, a lock take-over) to the manifest."""
        self.update_manifest(lambda m: m.setdefault("events", []).append({"time": now(), **event}))

    def record_engine(self, stage: str, engine: Any) -> None:
        """Store how a stage generated: the engine's description (batch size and how it was chosen,
        shards) and its per-stage statistics; each of its events (an automatic batch size, an
        out-of-memory back-off, which changes batch composition) also goes to the manifest's events."""
        described = engine.describe()
        events = described.pop("events", [])
        stats = getattr(engine, "stats", {})

        def change(manifest: dict[str, Any]) -> None:
            manifest.setdefault("generation", {})[stage] = {**described, "stats": stats}
            recorded = manifest.setdefault("events", [])
            for event in events:
                entry = {"kind": "generation", "stage": stage, **event}
                if entry not in [{k: v for k, v in e.items() if k != "time"} for e in recorded]:
                    recorded.append({"time": now(), **entry})

        self.update_manifest(change)

    # -- stages
    def address(self, stage: str) -> Address:
        """The stage as a stage of this run; a per-round stage of a run of several rounds needs its round."""
        spec = get_stage(stage)
        if evolving(self.params):
            if is_round_stage(spec) and self.round is None:
                raise StageError(
                    f"run {self.top} has {self.params.evolve.rounds} rounds (evolve.rounds): stage {spec.key} runs "
                    "once per round; give its round as evolve.round (reflectevo run does), then "
                    "params = reflectevo.runs.for_round(params)"
                )
            if not is_round_stage(spec) and self.round is not None:
                raise StageError(
                    f"stage {spec.key} runs once per run, not in round {self.round}; leave evolve.round null"
                )
        return Address(spec, self.round if is_round_stage(spec) else None)

    def upstream_entries(self, stage: str) -> dict[str, tuple[Address, dict[str, Any]]]:
        """The manifest entry of every stage ``stage`` depends on, by the name its identity uses."""
        address = self.address(stage)
        top = read_manifest(self.top)
        cache: dict[Path, dict[str, Any]] = {self.top: top}
        return {
            key: (dep, recorded_entry(self.top, dep, cache))
            for key, dep in upstream_of(address, self.params, last_round(self.params, top)).items()
        }

    def stage_identity(self, stage: str) -> str:
        """The stage's identity from the identities its upstream stages recorded when they finished."""
        address = self.address(stage)
        upstream = {
            key: entry.get("identity") if entry.get("status") == "done" else None
            for key, (_, entry) in self.upstream_entries(stage).items()
        }
        return address_identity(self.params, address, upstream, last_round(self.params, read_manifest(self.top)))

    def mark_stage_failed(self, stage: str, reason: str, status: str = "failed") -> None:
        def failed(manifest: dict[str, Any]) -> None:
            entry = manifest.setdefault("stages", {}).setdefault(get_stage(stage).key, {})
            entry.update(status=status, finished=now(), reason=reason)

        self.update_manifest(failed)

    def begin_stage(self, stage: str, *, require_upstream: bool = True) -> StageRun:
        self.check_writable()  # before the clean-up below deletes anything
        spec = get_stage(stage)
        if self.round and not self.params.round_resolved:
            raise StageError(
                f"these params name round {self.round} but are not resolved for it: call "
                "params = reflectevo.runs.for_round(params) first (it sets the round's seed and model)"
            )
        stages = self.manifest().get("stages", {})
        if require_upstream:
            missing = [dep.key for dep, entry in self.upstream_entries(stage).values() if entry.get("status") != "done"]
            # 05_eval can evaluate the base model without 03/04; only 01 is indispensable there.
            if spec.key == "05_eval":
                missing = [key for key in missing if key == "01_data"]
            if missing:
                raise StageError(
                    f"stage {self.address(stage).key} needs {', '.join(missing)} to have finished in {self.top} first"
                )
        identity = self.stage_identity(stage)
        folder = self.stage_dir(stage)
        previous = stages.get(spec.key, {}).get("pid")
        if previous in (None, os.getpid()) or not _pid_alive(int(previous)):
            # no other process is in this stage: what a killed attempt was writing can go
            removed = remove_temporaries(folder) if spec.folder != "figures" else []
            removed += [
                f"figures/{name}"
                for name in remove_temporaries(self.figures, prefix=f".{spec.number}_", recursive=False)
            ]
            if removed:
                self.add_event(
                    {
                        "kind": "cleanup",
                        "stage": spec.key,
                        "removed": removed,
                        "note": "temporary files of an attempt that did not finish",
                    }
                )

        def start(manifest: dict[str, Any]) -> None:
            manifest.setdefault("stages", {})[spec.key] = {
                "status": "running",
                "identity": identity,
                "params_hash": self.params.section_hash(spec.reads),
                "started": now(),
                "pid": os.getpid(),
            }

        self.update_manifest(start)
        return StageRun(self, spec, identity, time.monotonic())

    def close(self) -> None:
        self.lock.release()
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class StageRun:
    """A stage in progress: ``finish`` records its outputs (with hashes) and marks it done."""

    run: RunDir
    spec: Stage
    identity: str
    started: float

    @property
    def dir(self) -> Path:
        """The stage's folder, to write into; only while the run is open (read back via stage_dir)."""
        self.run.check_writable()
        return self.run.path / self.spec.folder

    def finish(self, outputs: list[str | Path] = (), **extra: Any) -> dict[str, Any]:
        files = {}
        for output in outputs:
            path = Path(output)
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file() and not file.name.startswith("."):
                    files[str(file.relative_to(self.run.path))] = {
                        "sha256": file_sha256(file),
                        "bytes": file.stat().st_size,
                    }
        seconds = round(time.monotonic() - self.started, 2)

        def done(manifest: dict[str, Any]) -> None:
            entry = manifest.setdefault("stages", {}).setdefault(self.spec.key, {})
            entry.update(status="done", identity=self.identity, finished=now(), seconds=seconds, outputs=files, **extra)

        return self.run.update_manifest(done)["stages"][self.spec.key]

    def fail(self, reason: str) -> None:
        self.run.mark_stage_failed(self.spec.key, reason)


def open_run(params: Params, *, params_file: str | Path | None = None, command: str = "") -> RunDir:
    """Create or reopen ``outputs/<run.name>/``, take (or join) its lock and refresh the manifest."""
    root = params.run_dir
    if params.evolve.round and not params.round_resolved:
        raise StageError(
            f"these params name round {params.evolve.round} but are not resolved for it: call "
            "params = reflectevo.runs.for_round(params) first (it sets the round's seed and model)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        for sub in SUBDIRS:
            (root / sub).mkdir(exist_ok=True)
    except OSError as exc:  # before any work: a folder that cannot be made or written is a params problem
        raise ReflectEvoError(
            f"cannot create the run folder {root}: {exc.strerror or exc}; set run.output_dir "
            f"(now {params.run.output_dir}) to a folder you can write"
        ) from None
    run = RunDir(params, root)
    note = run.lock.acquire(command or " ".join(sys.argv[:3]))
    try:
        facts = {
            "run": params.run.name,
            "params": params.to_dict(),
            "params_hash": params.hash(),
            "params_file": None
            if params_file is None
            else {"path": str(params_file), "sha256": file_sha256(params_file)},
            "seeds": {"run": params.run.seed, **({"round": run.round} if run.round else {})},
            "packages": package_versions(),
            "git": git_commit(),
            "device": device_info(),
            "versions": versions_of_tasks_and_prompts(params.data.tasks),
            "updated": now(),
        }

        def refresh(manifest: dict[str, Any]) -> None:
            manifest.setdefault("created", now())
            manifest.update(facts)

        run.update_manifest(refresh)
        if note.startswith("took over"):
            run.add_event({"kind": "lock", "note": note})
    except BaseException:
        run.close()
        raise
    return run
