"""Run model-written code (MBPP solutions and their tests) without trusting it.

Resource limits alone do not contain hostile code: root ignores the process-count limit, a
grandchild that calls setsid() escapes a process-group kill, and no rlimit stops writes outside
the working directory. So each run is built in layers, the strongest the operating system grants:

1. isolation (``launcher.py``): new user, mount, pid and network namespaces; a fresh root file
   system made of read-only bind mounts of what Python needs (the host's home directories, the
   project and /tmp are simply not there); a private size-limited tmpfs as the only writable
   place; a private ``/proc``; no network at all; the program runs as uid 1000 inside, and as an
   unprivileged host uid of its own (61000 + worker slot) when the caller is root. Without user namespaces but
   as root: the same without the user namespace. Without namespaces but as root: a separate
   unprivileged uid per worker slot and a private temporary directory. Otherwise: only the limits
   below, and the sandbox says so (:attr:`Sandbox.isolation`).
2. limits: wall-clock timeout (default 5 s, as the paper), CPU seconds, address space, file
   size, process count, open files; captured output is truncated and a flood of output ends the run.
3. clean-up: pid 1 of the namespace exiting takes every process of the run with it; without a
   pid namespace the launcher, a child subreaper, kills every orphan the program left behind
   (and, as root, every process of the run's uid); the temporary directory is removed.

Running model-written code is opt-in: ``Sandbox(allow_code_execution=True)``; anything else
raises :class:`~reflectevo.errors.CodeExecutionNotAllowed` before any work starts. Python audit
hooks or restricted builtins are not used as a boundary: they are not one.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reflectevo.errors import CodeExecutionNotAllowed, SandboxError
from reflectevo.sandbox.launcher import SANDBOX_UID

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "launcher.py"
RUNNER = HERE / "runner.py"
MODES = ("userns", "rootns", "uid", "none")  # strongest first
UID_BASE = 61000  # as root, worker slot k runs programs as host uid 61000 + k (no other process uses these)
OPT_IN_HINT = (
    "Running model-written code needs an explicit opt-in: create the sandbox with "
    "Sandbox(allow_code_execution=True), or pass --allow-code-execution on the command line."
)


@dataclass
class CodeJob:
    """A program and the tests to run after it."""

    program: str
    tests: Sequence[str]
    setup_code: str = ""  # run after the program, before the tests (the robust MBPP grader)
    bare_namespace: bool = True  # exec in an empty dict, as the official harness does


@dataclass
class ExecutionResult:
    """What happened to one program.

    ``status``: passed | failed (a test failed, or the program exited early) | error (the program
    or set-up code raised) | timeout | output_limit | crashed (killed by a signal or a limit,
    or no report at all). Only ``passed`` counts as passing.
    """

    status: str
    tests_passed: int
    tests_total: int
    error: str  # the first failing assert or traceback, as the model will be shown it
    official_error: str  # the same event worded as the paper's harness words it
    stdout: str
    stderr: str
    output_truncated: bool
    returncode: int | None
    duration_s: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IsolationReport:
    mode: str
    layers: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    tried: dict[str, str] = field(default_factory=dict)  # mode -> why it was not used

    @property
    def isolated(self) -> bool:
        return self.mode != "none"

    def describe(self) -> str:
        lines = [f"sandbox mode: {self.mode}"]
        lines += [f"  {name}: {value}" for name, value in self.layers.items()]
        lines += [f"  limit {name}: {value}" for name, value in self.limits.items()]
        lines += [f"  not used: {mode} ({reason})" for mode, reason in self.tried.items()]
        return "\n".join(lines)


def _python_binds() -> list[dict[str, str]]:
    """What the interpreter needs inside the sandbox, as bind mounts and symlinks.

    Parents come before children and a path under an already bound directory is skipped;
    symlinked system directories (``/bin -> usr/bin`` on merged-/usr systems) stay symlinks.
    """
    wanted: list[str] = []
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime"):
        if os.path.lexists(path):
            wanted.append(path)
    for path in (
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(sys.executable),
        os.path.dirname(os.path.realpath(sys.executable)),
    ):
        wanted.append(os.path.abspath(path))
        wanted.append(os.path.realpath(path))
    binds: list[dict[str, str]] = []
    covered: list[str] = []

    def under(path: str) -> bool:
        return any(path == c or path.startswith(c.rstrip("/") + "/") for c in covered)

    for path in sorted(dict.fromkeys(wanted), key=lambda p: (p.count("/"), p)):
        if under(path):
            continue
        if os.path.islink(path):
            binds.append({"path": path, "kind": "symlink", "target": os.readlink(path)})
        elif os.path.isdir(path):
            binds.append({"path": path, "kind": "dir"})
        elif os.path.isfile(path):
            binds.append({"path": path, "kind": "file"})
        else:
            continue
        covered.append(path)
    return binds


class Sandbox:
    """Runs :class:`CodeJob` objects under the strongest isolation available.

    ``isolation="auto"`` probes the modes once, strongest first; name a mode to insist on it.
    With ``require_isolation=True`` a machine that grants no isolation layer is an error.
    """

    def __init__(
        self,
        allow_code_execution: bool = False,
        *,
        timeout_s: float = 5.0,
        cpu_s: int | None = None,
        memory_mb: int = 1024,
        file_size_mb: int = 16,
        max_processes: int = 64,
        open_files: int = 256,
        workdir_mb: int = 64,
        capture_bytes: int = 64 * 1024,
        max_output_bytes: int = 16 * 1024 * 1024,
        workers: int = 1,
        isolation: str = "auto",
        require_isolation: bool = False,
    ) -> None:
        if not allow_code_execution:
            raise CodeExecutionNotAllowed(OPT_IN_HINT)
        if isolation != "auto" and isolation not in MODES:
            raise ValueError(f"unknown isolation mode {isolation!r}; choose auto or one of {MODES}")
        if timeout_s <= 0 or workers < 1 or memory_mb < 64:
            raise ValueError("timeout_s must be > 0, workers >= 1 and memory_mb >= 64")
        self.timeout_s = timeout_s
        self.workers = workers
        self.capture_bytes = capture_bytes
        self.max_output_bytes = max_output_bytes
        self.workdir_mb = workdir_mb
        self.limits = {
            "cpu_s": int(cpu_s if cpu_s is not None else max(1, int(timeout_s) + 1)),
            "address_space_bytes": memory_mb * 1024 * 1024,
            "file_size_bytes": file_size_mb * 1024 * 1024,
            "processes": max_processes,
            "open_files": open_files,
        }
        self._binds = _python_binds()
        self._runner_source = RUNNER.read_text(encoding="utf-8")
        self._free_slots: queue.Queue[int] = queue.Queue()
        for number in range(workers):
            self._free_slots.put(number)
        self.isolation = self._choose_mode(isolation)
        if require_isolation and not self.isolation.isolated:
            raise SandboxError(
                "no isolation layer is available on this machine (no namespaces, not root):\n"
                + self.isolation.describe()
            )

    # ---- public API ----------------------------------------------------------------------
    def run(self, job: CodeJob) -> ExecutionResult:
        """Run one job; raises :class:`SandboxError` only when the sandbox itself broke."""
        with self._slot() as slot:
            result, failure, _ = self._execute(job, self.isolation.mode, slot)
        if failure:
            raise SandboxError(f"the sandbox ({self.isolation.mode} mode) could not start: {failure}")
        return result

    def run_many(self, jobs: Sequence[CodeJob]) -> list[ExecutionResult]:
        """Run jobs on ``workers`` parallel workers; results come back in job order."""
        if self.workers == 1 or len(jobs) <= 1:
            return [self.run(job) for job in jobs]
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(self.run, jobs))

    # ---- mode selection --------------------------------------------------------------------
    def _choose_mode(self, requested: str) -> IsolationReport:
        candidates = MODES if requested == "auto" else (requested,)
        tried: dict[str, str] = {}
        probe = CodeJob(program="value = 6 * 7", tests=["assert value == 42"])
        for mode in candidates:
            if mode in ("rootns", "uid") and os.geteuid() != 0:
                tried[mode] = "needs root"
                continue
            result, failure, layers = self._execute(probe, mode, slot=0)
            if failure is None and result.passed:
                return IsolationReport(mode=mode, layers=layers, limits=dict(self.limits), tried=tried)
            tried[mode] = (
                failure or f"probe program {result.status}: {result.error} {result.stderr.strip()[-300:]}".strip()
            )
        raise SandboxError("no sandbox mode could run a trivial program:\n" + json.dumps(tried, indent=2))

    @contextlib.contextmanager
    def _slot(self) -> Iterator[int]:
        """A worker slot number; as root, slot k runs its programs as host uid UID_BASE + k."""
        number = self._free_slots.get()  # waits while all slots are busy: at most `workers` runs at once
        try:
            yield number
        finally:
            self._free_slots.put(number)

    # ---- one run -----------------------------------------------------------------------------
    def _execute(self, job: CodeJob, mode: str, slot: int) -> tuple[ExecutionResult, str | None, dict[str, Any]]:
        """Run one job in ``mode``: (result, why the sandbox itself failed or None, active layers)."""
        nonce = secrets.token_hex(16)
        status_r, status_w = os.pipe()
        result_r, result_w = os.pipe()
        # As root every worker slot gets its own unprivileged host uid, so that per-uid limits
        # (the process count) of one run cannot starve a parallel one. An ordinary user can only
        # run programs as itself (inside a user namespace they appear as uid 1000).
        root = os.geteuid() == 0
        host_uid = UID_BASE + slot if root else os.geteuid()
        host_gid = UID_BASE + slot if root else os.getegid()
        job_record = {
            "nonce": nonce,
            "result_fd": result_w,
            "program": job.program,
            "tests": list(job.tests),
            "setup_code": job.setup_code,
            "bare_namespace": job.bare_namespace,
        }
        host_workdir = None
        if mode in ("uid", "none"):
            host_workdir = tempfile.mkdtemp(prefix="reflectevo-sandbox-")
            (Path(host_workdir) / "runner.py").write_text(self._runner_source, encoding="utf-8")
            (Path(host_workdir) / ".job.json").write_text(json.dumps(job_record), encoding="utf-8")
            if mode == "uid":
                for path in (host_workdir, f"{host_workdir}/.job.json"):
                    os.chown(path, host_uid, host_gid)
        config = {
            "mode": mode,
            "python": sys.executable,
            "binds": self._binds,
            "runner_source": self._runner_source,
            "job": job_record,
            "limits": self.limits,
            "workdir_mb": self.workdir_mb,
            "status_fd": status_w,
            # inside a user namespace the program has a uid of its own; otherwise it is the host uid itself
            "program_uid": SANDBOX_UID if mode == "userns" else host_uid,
            "program_gid": SANDBOX_UID if mode == "userns" else host_gid,
            "host_program_uid": host_uid,
            "host_program_gid": host_gid,
            "host_workdir": host_workdir,
        }
        started = time.monotonic()
        outcome: dict[str, Any] = {}
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LAUNCHER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w, result_w),
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
        finally:
            os.close(status_w)
            os.close(result_w)
        try:
            try:
                assert process.stdin is not None
                process.stdin.write(json.dumps(config).encode())
                process.stdin.close()
            except BrokenPipeError:
                pass
            outcome = self._collect(process, status_r, result_r, started)
        finally:
            self._clean_up(process, mode, host_uid, host_workdir, outcome.get("program_pid"))
            os.close(status_r)
            os.close(result_r)
        outcome["returncode"] = process.returncode
        result, failure = self._result(outcome, nonce, job, mode, time.monotonic() - started)
        return result, failure, outcome.get("layers", {})

    def _collect(self, process: subprocess.Popen, status_r: int, result_r: int, started: float) -> dict[str, Any]:
        """Read output, status and results until the run ends, the deadline passes or output floods."""
        assert process.stdout is not None and process.stderr is not None
        buffers = {"stdout": bytearray(), "stderr": bytearray(), "status": bytearray(), "result": bytearray()}
        sources = {
            process.stdout.fileno(): "stdout",
            process.stderr.fileno(): "stderr",
            status_r: "status",
            result_r: "result",
        }
        selector = selectors.DefaultSelector()
        for fd in sources:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        outcome: dict[str, Any] = {"timed_out": False, "output_limit": False, "output_bytes": 0}
        setup_deadline = started + 30.0  # building the sandbox itself should take milliseconds
        deadline = None
        open_fds = set(sources)
        while open_fds:
            now = time.monotonic()
            if deadline is None and b"\n" in buffers["status"]:
                deadline = now + self.timeout_s  # the program's clock starts when the sandbox is ready
            if process.poll() is not None:
                # The launcher only exits after the program did. Without a pid namespace an escaped
                # grandchild may still hold the pipes open: read what is already there, then stop.
                deadline = now + 0.2 if deadline is None else min(deadline, now + 0.2)
            limit = deadline if deadline is not None else setup_deadline
            if now >= limit:
                outcome["timed_out"] = process.poll() is None and deadline is not None
                outcome["setup_timed_out"] = deadline is None
                break
            for key, _ in selector.select(timeout=min(0.1, limit - now)):
                fd = key.fd
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(fd)
                    open_fds.discard(fd)
                    continue
                name = sources[fd]
                if name in ("stdout", "stderr"):
                    outcome["output_bytes"] += len(chunk)
                    room = self.capture_bytes - len(buffers[name])
                    if room > 0:
                        buffers[name] += chunk[:room]
                    if outcome["output_bytes"] > self.max_output_bytes:
                        outcome["output_limit"] = True
                        open_fds.clear()
                        break
                elif len(buffers[name]) < 1024 * 1024:  # a sane bound on the report channels
                    buffers[name] += chunk
        selector.close()
        if outcome["timed_out"] or outcome["output_limit"] or outcome.get("setup_timed_out"):
            self._stop(process)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._stop(process)
        for line in buffers["status"].decode(errors="replace").splitlines():
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if message.get("event") == "ready":
                outcome["layers"] = message.get("layers", {})
                outcome["program_pid"] = message.get("program_pid")
            elif message.get("event") == "setup_failed":
                outcome["setup_failed"] = message.get("error", "unknown error")
        outcome["stdout"] = bytes(buffers["stdout"])
        outcome["stderr"] = bytes(buffers["stderr"])
        outcome["result"] = bytes(buffers["result"])
        outcome["truncated"] = outcome["output_bytes"] > len(buffers["stdout"]) + len(buffers["stderr"])
        return outcome

    @staticmethod
    def _stop(process: subprocess.Popen) -> None:
        """Ask the launcher to stop the run child-first; kill its whole session if it does not."""
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # launcher, set-up and pid 1 share this group
            except ProcessLookupError:
                pass
            process.wait()

    def _clean_up(
        self, process: subprocess.Popen, mode: str, uid: int, workdir: str | None, outcome_pid: int | None
    ) -> None:
        if process.poll() is None:
            self._stop(process)
        if mode in ("uid", "none") and outcome_pid:
            try:
                os.killpg(outcome_pid, signal.SIGKILL)  # the program's own session
            except (ProcessLookupError, PermissionError):
                pass
        if mode == "uid":
            # kill everything the run's uid still owns, wherever it moved: only that uid can do it
            subprocess.run(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    f"import os,signal\nos.setgid({uid})\nos.setuid({uid})\ntry: os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError: pass",
                ],
                env={},
                check=False,
            )
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    def _result(
        self, outcome: dict[str, Any], nonce: str, job: CodeJob, mode: str, duration: float
    ) -> tuple[ExecutionResult, str | None]:
        report: dict[str, Any] = {}
        for line in outcome["result"].decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("nonce") == nonce and record.get("event") == "done":
                report = record
                break
        stdout = outcome["stdout"].decode(errors="replace")
        stderr = outcome["stderr"].decode(errors="replace")
        returncode = outcome["returncode"]
        failure = outcome.get("setup_failed")
        if failure is None and "layers" not in outcome and not outcome["timed_out"] and not outcome["output_limit"]:
            failure = (
                f"the launcher exited with code {returncode} before the sandbox was ready: {stderr.strip()[-500:]}"
            )
        if outcome.get("setup_timed_out"):
            failure = "building the sandbox took more than 30 s"
        total = len(job.tests)
        status, error, official = "crashed", "", "Unknown error occurred during execution."
        if outcome["timed_out"]:
            status = "timeout"
            error = official = f"Execution timed out after {self.timeout_s:g} seconds."
        elif outcome["output_limit"]:
            status = "output_limit"
            error = f"the program wrote more than {self.max_output_bytes} bytes of output and was stopped"
        elif report:
            status = report.get("status", "crashed")
            error, official = report.get("error", ""), report.get("official_error", official)
            if status == "passed" and returncode != 0:
                status, error = "crashed", f"tests reported passing but the program exited with code {returncode}"
        else:
            error = _describe_exit(returncode)
        result = ExecutionResult(
            status=status,
            tests_passed=int(report.get("tests_passed", 0)) if report else 0,
            tests_total=total,
            error=error,
            official_error=official,
            stdout=stdout,
            stderr=stderr,
            output_truncated=outcome["truncated"],
            returncode=returncode,
            duration_s=round(duration, 4),
            isolation=mode,
        )
        return result, failure


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "the program did not finish"
    if returncode > 128:
        number = returncode - 128
        name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
        why = {
            "SIGXCPU": " (CPU time limit)",
            "SIGKILL": " (killed: a hard limit or the sandbox)",
            "SIGXFSZ": " (file size limit)",
            "SIGSEGV": " (memory fault)",
        }.get(name, "")
        return f"the program was killed by {name}{why} before the tests finished"
    return f"the program exited with code {returncode} before the tests finished"


_PROBE_CACHE: dict[tuple[Any, ...], IsolationReport] = {}


def isolation_report(isolation: str = "auto") -> IsolationReport:
    """Which isolation layers this machine grants (probes by running a trivial program once)."""
    key = (isolation, os.geteuid())
    if key not in _PROBE_CACHE:
        _PROBE_CACHE[key] = Sandbox(allow_code_execution=True, isolation=isolation).isolation
    return _PROBE_CACHE[key]


__all__ = ["MODES", "CodeJob", "ExecutionResult", "IsolationReport", "Sandbox", "isolation_report"]
