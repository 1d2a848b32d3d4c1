"""Run directories: where a run's outputs live, its manifest, atomic writes and the writer lock.

    outputs/<run>/
      manifest.json      resolved params and hashes, versions, git commit, device, seeds,
                         input-data hashes, task and prompt versions, per-stage status and times
      notebooks/         executed copies of the numbered notebooks
      figures/           every plot a stage saves
      data/ reflect/ sft/ dpo/ eval/    one folder per stage
      .lock              who is writing this run (pid, host, start time)

With several rounds of self-evolution (``evolve.rounds: N``, N >= 2), stage 01 runs once into
``outputs/<run>/data/``, stages 02-05 run once per round into ``outputs/<run>/round_<k>/`` (each round
folder has the layout above, its own ``manifest.json``, ``notebooks/`` and ``figures/``; its stage 01
is the run's), and stage 06 runs once at the top over every round. One ``.lock`` at the top guards
the whole run. A stage of a round is addressed ``round_<k>:<stage>`` (``round_2:03_sft``).

Every file is written whole through a temporary file and a rename (:func:`atomic_write_bytes`), so a
reader or a resumed run never sees half a file. A second writer is refused with a message that says
who holds the lock; a lock left behind by a process that no longer exists is taken over.

The numbered stages (:data:`STAGES`) each read some params sections and depend on earlier stages.
A stage's *identity* is the hash of the sections it reads plus the identities of the stages it
depends on: ``reflectevo run`` skips a stage whose recorded identity matches, so changing an eval
setting never reruns generation.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Self

from reflectevo.config import (
    Params,
    canonical_hash,
    derive_seed,
    round_folder,
    validate_params,
)
from reflectevo.errors import ReflectEvoError

# The environment variable through which ``reflectevo run`` lets the notebooks it starts write
# into the run it has locked (they join its lock instead of being refused by it).
LOCK_TOKEN_ENV = "REFLECTEVO_RUN_TOKEN"
MANIFEST = "manifest.json"
SUBDIRS = ("notebooks", "figures")
PACKAGES = (
    "reflectevo", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
    "unsloth", "vllm", "bitsandbytes", "papermill", "pydantic", "math-verify",
)


class RunLockedError(ReflectEvoError):
    """Another live process is writing this run."""


class OutputWriteError(ReflectEvoError, OSError):
    """An output could not be written (disk full, quota, read-only or unwritable folder); nothing
    half-written was left behind."""


def is_write_failure(exc: BaseException) -> bool:
    """An OS error that means the output could not be written (not, say, a missing input file)."""
    import errno

    return (isinstance(exc, OSError) and not isinstance(exc, ReflectEvoError)
            and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM))


def write_failure(path: Path, exc: OSError) -> OutputWriteError:
    """The clear error for an OS error while writing ``path``: what happened, what was kept, what to do."""
    import errno

    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = (f"free space (or raise the quota) on the file system holding {path.parent}, or set run.output_dir "
                  "to another disk")
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = f"make {path.parent} writable, or set run.output_dir to a folder you can write"
    else:
        advice = f"check {path.parent}"
    return OutputWriteError(
        f"could not write {path}: {reason} [{errno.errorcode.get(exc.errno or 0, exc.errno)}]. Nothing half-written was "
        f"left: the temporary copy was removed and any earlier {path.name} is unchanged. To go on, {advice}, then rerun "
        "the same command: finished stages and committed generation batches are kept.")


class StageError(ReflectEvoError):
    """A stage cannot start (a stage it depends on has not finished) or did not finish properly."""


@dataclass(frozen=True)
class Stage:
    key: str  # "01_data": notebook file stem and manifest key
    number: str  # "01"
    folder: str  # the stage's folder in the run directory
    reads: tuple[str, ...]  # params sections or dotted keys whose change reruns the stage
    depends: tuple[str, ...]  # numbers of the stages it reads outputs of

    @property
    def notebook(self) -> str:
        return f"{self.key}.ipynb"


STAGES: tuple[Stage, ...] = (
    Stage("01_data", "01", "data", ("run.seed", "data"), ()),
    Stage("02_reflect", "02", "reflect", ("run.seed", "model", "generation", "reflect"), ("01",)),
    Stage("03_sft", "03", "sft", ("run.seed", "model", "sft"), ("02",)),
    Stage("04_dpo", "04", "dpo", ("run.seed", "model", "dpo"), ("02",)),
    Stage("05_eval", "05", "eval", ("run.seed", "model", "generation", "eval"), ("01", "03", "04")),
    Stage("06_analysis", "06", "figures", ("analysis",), ("02", "05")),
)


def depends_on(stage: Stage, params: Params) -> tuple[str, ...]:
    """The stages ``stage`` reads outputs of with these params: DPO that starts from an SFT variant
    (``dpo.start_from``) also depends on 03_sft, so retraining that variant reruns DPO."""
    if stage.key == "04_dpo" and params.dpo.start_from != "base":
        return (*stage.depends, "03")
    return stage.depends


def identity_of(params: Params, stage: Stage, upstream: dict[str, str | None]) -> str:
    """A stage's identity: the hash of the params it reads, of the task, grader and prompt versions
    (:func:`versions_of_tasks_and_prompts`) and of its upstream stages' identities. The versions are
    in it so that a run made before a grading or prompt change is recomputed, not skipped with its
    old verdicts."""
    return canonical_hash({"params": params.section_hash(stage.reads), "upstream": upstream,
                           "versions": versions_of_tasks_and_prompts(params.data.tasks)})


def get_stage(name: str) -> Stage:
    """A stage by number ("01") or key ("01_data")."""
    for stage in STAGES:
        if name in (stage.number, stage.key):
            return stage
    raise StageError(f"unknown stage {name!r}; the stages are {', '.join(s.key for s in STAGES)}")


# ---- rounds of self-evolution ------------------------------------------------------------------
ROUND_STAGES = ("02", "03", "04", "05")  # run once per round; 01 and 06 once per run
GENERATOR_FOLDER = "generator"  # round_<k>/generator/: the model round k starts from (k >= 2)


def is_round_stage(stage: Stage) -> bool:
    return stage.number in ROUND_STAGES


def evolving(params: Params) -> bool:
    """Whether the run has several rounds (the round layout); one round is the plain layout."""
    return params.evolve.rounds >= 2


def round_seed(seed: int, round_number: int) -> int:
    """Round k's ``run.seed``: the run's seed in round 1 (round 1 is exactly the plain run), else one
    derived from it and k, so later rounds draw other instructions and samples."""
    return seed if round_number == 1 else derive_seed(seed, "evolve-round", round_number) % 2**31


def generator_dir(params: Params, round_number: int) -> Path:
    """Where round ``round_number`` (>= 2) keeps the merged model it generates with and trains further."""
    return params.top_run_dir / round_folder(round_number) / GENERATOR_FOLDER


def for_round(params: Params, round_number: int | None = None) -> Params:
    """One round's params: its folder (``run_dir``), its seed (:func:`round_seed`) and, from round 2 on,
    its model: the merged generator folder that stage 02 of the round writes. ``round_number`` defaults
    to ``evolve.round`` (which ``reflectevo run`` injects into the per-round notebooks). Params without a
    round (the plain layout, stages 01 and 06) come back unchanged; so do params already resolved for
    that round. Every stage notebook calls this right after validating its params."""
    number = params.evolve.round if round_number is None else round_number
    if not params.round_resolved and params.evolve.round is not None:
        params = params.model_copy(update={"evolve": params.evolve.model_copy(update={"round": None})})  # as injected
    if number is None or not evolving(params):
        if number not in (None, 1):
            raise StageError(f"round {number} asked for, but evolve.rounds is {params.evolve.rounds}")
        return params
    if not 1 <= number <= params.evolve.rounds:
        raise StageError(f"round {number} is outside 1..{params.evolve.rounds} (evolve.rounds)")
    if params.round_resolved:
        return params if params.evolve.round == number else for_round(params.run_params, number)
    raw = params.to_dict()
    raw["evolve"]["round"] = number
    if number >= 2:
        raw["run"]["seed"] = round_seed(params.run.seed, number)
        raw["model"].update(name=str(generator_dir(params, number)), adapter=None, revision=None)
    resolved = validate_params(raw, f"round {number} of run {params.run.name}")
    resolved._run_params = params
    return resolved


@dataclass(frozen=True)
class Address:
    """A stage of a run: ``01_data``, ``06_analysis``, or a per-round stage ``round_<k>:03_sft``."""

    stage: Stage
    round: int | None = None

    @property
    def key(self) -> str:
        return f"{round_folder(self.round)}:{self.stage.key}" if self.round else self.stage.key


def run_order(params: Params, stages: Sequence[Stage] = STAGES) -> list[Address]:
    """Every stage of the run in execution order: 01, then 02-05 of round 1, of round 2, ..., then 06."""
    if not evolving(params):
        return [Address(stage) for stage in stages]
    order = [Address(stage) for stage in stages if stage.number < ROUND_STAGES[0]]
    for number in range(1, params.evolve.rounds + 1):
        order += [Address(stage, number) for stage in stages if is_round_stage(stage)]
    return order + [Address(stage) for stage in stages if stage.number > ROUND_STAGES[-1]]


ROUND_ADDRESS = re.compile(r"round_(\d+):(.+)")


def parse_address(name: str, params: Params) -> list[Address]:
    """The stages a ``--stages``/``--from`` name means: ``03`` (or ``03_sft``) is that stage, in every
    round of a run of several rounds; ``round_2:03`` is stage 03 of round 2. Mistakes are errors."""
    name = name.strip()
    found = ROUND_ADDRESS.fullmatch(name)
    if found is None:
        if name.startswith("round"):
            raise StageError(f"malformed stage address {name!r}: write round_<k>:<stage>, e.g. round_2:03")
        stage = get_stage(name)
        if evolving(params) and is_round_stage(stage):
            return [Address(stage, number) for number in range(1, params.evolve.rounds + 1)]
        return [Address(stage)]
    number, stage = int(found.group(1)), get_stage(found.group(2))
    if not evolving(params):
        raise StageError(f"{name!r} names a round, but this run has one round (evolve.rounds: 1, the plain layout); "
                         f"address the stage as {stage.number}")
    if not 1 <= number <= params.evolve.rounds:
        raise StageError(f"{name!r}: round {number} is outside 1..{params.evolve.rounds} (evolve.rounds)")
    if not is_round_stage(stage):
        raise StageError(f"{name!r}: stage {stage.key} runs once per run, not per round; address it as {stage.number}")
    return [Address(stage, number)]


def upstream_of(address: Address, params: Params, last_round: int | None = None) -> dict[str, Address]:
    """The stages ``address`` reads outputs of, by the names its identity records them under. In the
    plain layout these are :func:`depends_on`. With rounds, a round's stages depend on the run's 01 and
    on the stages of their own round as in the plain layout; stage 02 of round k >= 2 also on round
    k-1's 03, 04 and 05 (its generator is chosen from their results); stage 06 on 02 and 05 of every
    round up to ``last_round`` (the last round run: evolve.rounds, or the round the stopping rule
    stopped after)."""
    stage = address.stage
    if not evolving(params):
        return {get_stage(n).key: Address(get_stage(n)) for n in depends_on(stage, params)}
    if address.round is None:
        if not is_round_stage(stage) and stage.number > ROUND_STAGES[-1]:
            last = params.evolve.rounds if last_round is None else last_round
            return {Address(get_stage(n), k).key: Address(get_stage(n), k)
                    for k in range(1, last + 1) for n in ("02", "05")}
        return {get_stage(n).key: Address(get_stage(n)) for n in depends_on(stage, params)}
    upstream = {}
    for number in depends_on(stage, params):
        dep = get_stage(number)
        upstream[dep.key] = Address(dep, address.round if is_round_stage(dep) else None)
    if stage.number == "02" and address.round >= 2:
        for number in ("03", "04", "05"):
            previous = Address(get_stage(number), address.round - 1)
            upstream[previous.key] = previous
    return upstream


def evolve_marker(params: Params, address: Address, last_round: int | None = None) -> dict[str, Any] | None:
    """What a stage of a run of several rounds depends on beyond its params sections and upstream, in
    its identity. None where the stage does exactly what it does in the plain layout (stage 01, and 02-04
    of round 1), so those identities equal the plain run's."""
    if not evolving(params):
        return None
    evolve = params.evolve
    if address.round is None:
        if address.stage.number > ROUND_STAGES[-1]:
            last = evolve.rounds if last_round is None else last_round
            return {"rounds": list(range(1, last + 1)), "protocol": evolve.protocol}
        return None
    marker: dict[str, Any] = {}
    if address.round >= 2:
        marker.update(round=address.round, generator=evolve.generator, data=evolve.data)
    if address.stage.number == "05":  # it also scores the trained variants on the validation split
        marker["validation_protocol"] = evolve.protocol
    return marker or None


def address_identity(params: Params, address: Address, upstream: dict[str, str | None],
                     last_round: int | None = None) -> str:
    """The identity of a stage of the run (:func:`identity_of` with the round's params and marker)."""
    own = for_round(params, address.round) if address.round else params
    marker = evolve_marker(params, address, last_round)
    if marker is None:
        return identity_of(own, address.stage, upstream)
    return canonical_hash({"params": own.section_hash(address.stage.reads), "upstream": upstream, "evolve": marker,
                           "versions": versions_of_tasks_and_prompts(own.data.tasks)})


def round_manifest_path(top: Path, round_number: int | None) -> Path:
    return top / round_folder(round_number) if round_number else top


def recorded_entry(top: Path, address: Address, cache: dict[Path, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest entry of ``address`` in the run at ``top`` (empty when it never ran)."""
    folder = round_manifest_path(top, address.round)
    if cache is not None and folder in cache:
        manifest = cache[folder]
    else:
        manifest = read_manifest(folder)
        if cache is not None:
            cache[folder] = manifest
    return manifest.get("stages", {}).get(address.stage.key, {})


def last_round(params: Params, top_manifest: dict[str, Any]) -> int:
    """The last round of the run: evolve.rounds, or the round the stopping rule stopped after (recorded
    in the run's manifest by ``reflectevo run``)."""
    stopped = (top_manifest.get("evolve") or {}).get("stopped") or {}
    after = stopped.get("after_round")
    return min(int(after), params.evolve.rounds) if isinstance(after, int) else params.evolve.rounds


def included_rounds(params: Params, top_manifest: dict[str, Any]) -> list[int]:
    """The rounds stage 06 analyses: 1..last_round; empty in the plain layout."""
    return list(range(1, last_round(params, top_manifest) + 1)) if evolving(params) else []


# ---- atomic files ------------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if is_write_failure(exc):
            raise write_failure(path, exc) from exc
        raise
    return path


def usual_permissions(path: str | Path, directory: bool = False) -> None:
    """Give a file or folder made by ``tempfile`` (owner-only, 0600 / 0700) the permissions a plain
    ``open`` or ``mkdir`` would have given it under the process umask, so outputs stay readable by the group."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name; it replaces ``path`` only if the block succeeds."""
    import shutil

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        if is_write_failure(exc):
            raise write_failure(path, exc) from exc
        raise
    try:
        yield tmp
        usual_permissions(tmp, directory=True)
        replace_directory(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(exc):
            raise write_failure(path, exc) from exc
        raise


def replace_directory(new: Path, path: Path) -> None:
    """Rename the finished folder ``new`` to ``path``; a previous ``path`` is moved aside first and
    removed only once the new one is in place."""
    import shutil

    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# The hidden names the atomic writes above use while they work: ".<name>.<8 random chars>.tmp" (a file
# or folder being written) and ".<name>.old-<8 hex>" (a folder being replaced). A process killed
# mid-write leaves them behind; they are never results.
TEMPORARY_NAME = re.compile(r"^\..+\.(?:[a-z0-9_]{8}\.tmp|old-[0-9a-f]{8})$")


def remove_temporaries(folder: Path, *, prefix: str = ".", recursive: bool = True) -> list[str]:
    """Delete the temporary files and folders killed writers left in ``folder`` (names starting with
    ``prefix``). Only call it where no live process can be writing. Returns what was removed."""
    import shutil

    if not folder.is_dir():
        return []
    found = folder.rglob(f"{prefix}*") if recursive else folder.glob(f"{prefix}*")
    removed = []
    for path in sorted(found, key=lambda p: len(p.parts), reverse=True):
        if TEMPORARY_NAME.match(path.name) and path.exists():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(folder)))
    return sorted(removed)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | Path, exclude: Sequence[str] = ()) -> str:
    """One digest of a folder's files (relative paths and contents; hidden files and the relative paths in
    ``exclude`` left out): equal digests, equal folders. The manifest records it for each round's merged
    generator."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and str(relative) not in exclude:
            files[str(relative)] = file_sha256(path)
    return canonical_hash(files)


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ---- the writer lock ---------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, so we must not take over
    pid = int(owner.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
        return False
    started = _process_start(pid)
    return started is None or owner.get("pid_start") in (None, started)


class RunLock:
    """The ``.lock`` file of a run directory: one writer at a time, stale locks taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.owned = False
        self.token: str | None = None

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        # Serialises check-and-take between processes racing for the same lock.
        with open(self.path.with_name(".lock.guard"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self, command: str = "") -> str:
        """Take the lock, or join it when this process was started by its holder. Returns a note."""
        joining = os.environ.get(LOCK_TOKEN_ENV)
        with self._guard():
            remove_temporaries(self.path.parent, prefix=f".{self.path.name}.", recursive=False)  # made under this guard only
            owner = self.read()
            note = "lock taken"
            if owner is not None:
                if joining and owner.get("token") == joining:
                    self.token = joining
                    return "joined the lock of the process that started this one"
                if owner and _alive(owner):
                    raise RunLockedError(
                        f"run {self.path.parent} is being written by pid {owner.get('pid')} on {owner.get('host')} "
                        f"since {owner.get('since')} ({owner.get('command') or 'unknown command'}). Wait for it to "
                        f"finish, or stop it; if that process is gone on another machine, delete {self.path}."
                    )
                note = f"took over a stale lock (pid {owner.get('pid')} on {owner.get('host')} is gone)"
            self.token = uuid.uuid4().hex
            record = {
                "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()),
                "host": socket.gethostname(),
                "since": now(),
                "command": command,
                "token": self.token,
            }
            atomic_write_json(self.path, record)
            self.owned = True
            return note

    def release(self) -> None:
        if not self.owned:
            return
        with self._guard():
            owner = self.read()
            if owner and owner.get("token") == self.token:
                self.path.unlink(missing_ok=True)
        self.owned = False


# ---- environment facts for the manifest --------------------------------------------------------
def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(start: Path | None = None) -> dict[str, Any]:
    """The commit of the source tree the package was imported from (None outside a git checkout)."""
    where = start or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=False, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cuda": None}
    if "torch" in sys.modules or _installed("torch"):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda"] = {
                "device": torch.cuda.get_device_name(0),
                "count": torch.cuda.device_count(),
                "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                "cuda_version": torch.version.cuda,
            }
    return info


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def versions_of_tasks_and_prompts(task_names: list[str]) -> dict[str, Any]:
    """The versions of what turns a model's text into a number: each task's loading and grading
    (``Task.version``) and each prompt family. Recorded in the manifest and hashed into every
    stage identity."""
    from reflectevo import prompts
    from reflectevo.tasks import get_task

    return {"tasks": {name: get_task(name).version for name in task_names}, "prompts": prompts.PROMPT_VERSION,
            "reflection": prompts.REFLECTION_VERSION, "review": prompts.REVIEW_VERSION, "judge": prompts.JUDGE_VERSION}


# ---- the run directory -------------------------------------------------------------------------
class RunDir:
    """One run's folder. Open it with :func:`open_run`; use it as a context manager or call close()."""

    def __init__(self, params: Params, root: Path):
        self.params = params
        self.path = root
        self.round = params.evolve.round if evolving(params) else None
        self.top = root.parent if self.round else root  # the run's folder; a round's is inside it
        self.lock = RunLock(self.top)  # one writer for the whole run, every round included

    # -- paths
    def stage_dir(self, stage: str) -> Path:
        spec = get_stage(stage)
        # every round reads the run's one stage 01
        path = (self.top if self.round and not is_round_stage(spec) else self.path) / spec.folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def figures(self) -> Path:
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
                raise StageError(f"run {self.top} has {self.params.evolve.rounds} rounds (evolve.rounds): stage {spec.key} runs "
                                 "once per round; give its round as evolve.round (reflectevo run does), then "
                                 "params = reflectevo.runs.for_round(params)")
            if not is_round_stage(spec) and self.round is not None:
                raise StageError(f"stage {spec.key} runs once per run, not in round {self.round}; leave evolve.round null")
        return Address(spec, self.round if is_round_stage(spec) else None)

    def upstream_entries(self, stage: str) -> dict[str, tuple[Address, dict[str, Any]]]:
        """The manifest entry of every stage ``stage`` depends on, by the name its identity uses."""
        address = self.address(stage)
        top = read_manifest(self.top)
        cache: dict[Path, dict[str, Any]] = {self.top: top}
        return {key: (dep, recorded_entry(self.top, dep, cache))
                for key, dep in upstream_of(address, self.params, last_round(self.params, top)).items()}

    def stage_identity(self, stage: str) -> str:
        """The stage's identity from the identities its upstream stages recorded when they finished."""
        address = self.address(stage)
        upstream = {key: entry.get("identity") if entry.get("status") == "done" else None
                    for key, (_, entry) in self.upstream_entries(stage).items()}
        return address_identity(self.params, address, upstream, last_round(self.params, read_manifest(self.top)))

    def mark_stage_failed(self, stage: str, reason: str, status: str = "failed") -> None:
        def failed(manifest: dict[str, Any]) -> None:
            entry = manifest.setdefault("stages", {}).setdefault(get_stage(stage).key, {})
            entry.update(status=status, finished=now(), reason=reason)

        self.update_manifest(failed)

    def begin_stage(self, stage: str, *, require_upstream: bool = True) -> StageRun:
        spec = get_stage(stage)
        if self.round and not self.params.round_resolved:
            raise StageError(f"these params name round {self.round} but are not resolved for it: call "
                             "params = reflectevo.runs.for_round(params) first (it sets the round's seed and model)")
        stages = self.manifest().get("stages", {})
        if require_upstream:
            missing = [dep.key for dep, entry in self.upstream_entries(stage).values() if entry.get("status") != "done"]
            # 05_eval can evaluate the base model without 03/04; only 01 is indispensable there.
            if spec.key == "05_eval":
                missing = [key for key in missing if key == "01_data"]
            if missing:
                raise StageError(f"stage {self.address(stage).key} needs {', '.join(missing)} to have finished in "
                                 f"{self.top} first")
        identity = self.stage_identity(stage)
        folder = self.stage_dir(stage)
        previous = stages.get(spec.key, {}).get("pid")
        if previous in (None, os.getpid()) or not _pid_alive(int(previous)):
            # no other process is in this stage: what a killed attempt was writing can go
            removed = remove_temporaries(folder) if spec.folder != "figures" else []
            removed += [f"figures/{name}" for name in remove_temporaries(self.figures, prefix=f".{spec.number}_", recursive=False)]
            if removed:
                self.add_event({"kind": "cleanup", "stage": spec.key, "removed": removed,
                                "note": "temporary files of an attempt that did not finish"})

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
        return self.run.path / self.spec.folder

    def finish(self, outputs: list[str | Path] = (), **extra: Any) -> dict[str, Any]:
        files = {}
        for output in outputs:
            path = Path(output)
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file() and not file.name.startswith("."):
                    files[str(file.relative_to(self.run.path))] = {"sha256": file_sha256(file), "bytes": file.stat().st_size}
        seconds = round(time.monotonic() - self.started, 2)

        def done(manifest: dict[str, Any]) -> None:
            entry = manifest.setdefault("stages", {}).setdefault(self.spec.key, {})
            entry.update(status="done", identity=self.identity, finished=now(), seconds=seconds, outputs=files, **extra)

        return self.run.update_manifest(done)["stages"][self.spec.key]

    def fail(self, reason: str) -> None:
        self.run.mark_stage_failed(self.spec.key, reason)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ReflectEvoError(f"{path} is not valid JSON ({exc}); it is only ever replaced whole, so it was edited by hand") from None


def open_run(params: Params, *, params_file: str | Path | None = None, command: str = "") -> RunDir:
    """Create or reopen ``outputs/<run.name>/``, take (or join) its lock and refresh the manifest."""
    root = params.run_dir
    if params.evolve.round and not params.round_resolved:
        raise StageError(f"these params name round {params.evolve.round} but are not resolved for it: call "
                         "params = reflectevo.runs.for_round(params) first (it sets the round's seed and model)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        for sub in SUBDIRS:
            (root / sub).mkdir(exist_ok=True)
    except OSError as exc:  # before any work: a folder that cannot be made or written is a params problem
        raise ReflectEvoError(f"cannot create the run folder {root}: {exc.strerror or exc}; set run.output_dir "
                              f"(now {params.run.output_dir}) to a folder you can write") from None
    run = RunDir(params, root)
    note = run.lock.acquire(command or " ".join(sys.argv[:3]))
    try:
        facts = {
            "run": params.run.name,
            "params": params.to_dict(),
            "params_hash": params.hash(),
            "params_file": None if params_file is None else {"path": str(params_file), "sha256": file_sha256(params_file)},
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
