"""The sandbox against hostile programs: each is contained, reported as failed, and the host unharmed.

The containment tests need an isolation layer (namespaces, or root for a separate uid); without
one they skip with the reason the sandbox gives, a failure under REFLECTEVO_REQUIRE_FULL_TESTS=1.
"""

from __future__ import annotations

import os
import secrets
import sys
import textwrap
from pathlib import Path

import pytest
from hostile_corpus import (
    LoopbackServer,
    all_pids,
    hostile_corpus,
    sandbox_processes,
    system_paths,
)

from reflectevo.errors import CodeExecutionNotAllowed, SandboxError
from reflectevo.sandbox.host import MODES, CodeJob, Sandbox, isolation_report
from reflectevo.tasks import get_task

TESTS = ["assert solution(2) == 4"]  # no hostile program defines a working solution()


def job(source: str, tests=TESTS) -> CodeJob:
    return CodeJob(program=textwrap.dedent(source), tests=tests)


@pytest.fixture(scope="module")
def hostile(isolated_sandbox):
    """A sandbox like the session one with a 2 s budget, so time-out cases stay cheap. Its CPU limit
    leaves room above the wall clock (by default it is 1 s above it): on a machine busy with other work
    (the other worker of `pytest -n 2`) the host may notice the deadline late, and a program that ran out
    of time must be reported as such, not as killed by the CPU limit."""
    return Sandbox(allow_code_execution=True, timeout_s=2.0, cpu_s=6, workers=isolated_sandbox.workers)


@pytest.fixture(scope="module")
def hostile_runs(hostile, tmp_path_factory):
    """Run the whole hostile corpus once, in parallel, and look at the host afterwards."""
    host_dir = tmp_path_factory.mktemp("host")
    canary = host_dir / "canary.txt"
    canary.write_text("keep me")
    secret = "s3cr3t-" + secrets.token_hex(8)
    os.environ["REFLECTEVO_TEST_SECRET"] = secret  # the host's environment holds a secret
    server = LoopbackServer()
    corpus = hostile_corpus(canary, host_dir, server.port)
    before = all_pids()
    results = hostile.run_many([job(source) for source in corpus.values()])
    server.close()
    yield {
        "results": dict(zip(corpus, results)),
        "canary": canary,
        "host_dir": host_dir,
        "secret": secret,
        "connections": server.connections,
        "strays": sandbox_processes(before),
    }
    del os.environ["REFLECTEVO_TEST_SECRET"]


def test_every_hostile_program_is_reported_failed(hostile_runs):
    for name, result in hostile_runs["results"].items():
        assert not result.passed and result.status != "passed", name
        assert result.isolation in ("userns", "rootns", "uid"), name


@pytest.mark.parametrize("name", ["infinite loop", "SIGTERM ignored"])
def test_endless_programs_time_out(hostile_runs, name):
    result = hostile_runs["results"][name]
    assert result.status == "timeout" and result.error == "Execution timed out after 2 seconds."
    assert result.official_error == result.error


def test_fork_bomb_is_contained(hostile_runs):
    assert hostile_runs["results"]["fork bomb"].status in ("timeout", "crashed", "error")


def test_memory_hog_hits_the_address_space_limit(hostile_runs):
    result = hostile_runs["results"]["memory hog"]
    assert result.status == "error" and "MemoryError" in result.error


def test_files_outside_the_sandbox_are_untouched(hostile_runs):
    assert hostile_runs["canary"].read_text() == "keep me"
    assert sorted(p.name for p in hostile_runs["host_dir"].iterdir()) == ["canary.txt"]
    for path in system_paths():
        assert not os.path.exists(path), path
    for name in ("delete outside", "rmtree outside"):
        assert hostile_runs["results"][name].status == "error"  # the host paths do not exist in there


def test_no_network(hostile_runs):
    assert hostile_runs["connections"] == 0
    result = hostile_runs["results"]["open a socket"]
    assert result.status == "error" and (
        "unreachable" in result.error or "refused" in result.error or "OSError" in result.error
    )


def test_faked_passes_are_failures(hostile_runs):
    results = hostile_runs["results"]
    assert results["os._exit(0)"].status == "crashed" and results["os._exit(0)"].returncode == 0
    assert "before the tests finished" in results["os._exit(0)"].error
    assert results["sys.exit(0)"].status == "failed" and "SystemExit" in results["sys.exit(0)"].error
    assert results["forge a pass"].status == "crashed"  # a report without this run's nonce is ignored


def test_output_flood_is_cut_and_truncated(hostile_runs, hostile):
    result = hostile_runs["results"]["print 100 MB"]
    assert result.status == "output_limit" and result.output_truncated
    assert len(result.stdout) <= hostile.capture_bytes


def test_host_secrets_do_not_leak(hostile_runs):
    result = hostile_runs["results"]["read secrets"]
    assert "HOME" in result.stdout  # the program did print its environment
    assert hostile_runs["secret"] not in result.stdout + result.stderr


def test_nothing_survives_a_run(hostile_runs):
    assert hostile_runs["results"]["setsid daemon"].status == "failed"
    assert hostile_runs["strays"] == []


def test_kill_minus_one_cannot_reach_the_host(hostile_runs):
    assert hostile_runs["results"]["kill everything"].status in ("crashed", "failed", "error")
    assert sandbox_processes(all_pids()) == []  # and we are still here to check


# ---- ordinary programs ----------------------------------------------------------------------------


def test_passing_program(sandbox):
    result = sandbox.run(job("def solution(x):\n    return x * x\n"))
    assert result.passed and result.tests_passed == 1 and result.tests_total == 1 and result.error == ""


def test_first_failing_assert_is_reported(sandbox):
    result = sandbox.run(
        job("def solution(x):\n    return x + 1\n", tests=["assert solution(1) == 2", "assert solution(2) == 4"])
    )
    assert result.status == "failed" and result.tests_passed == 1
    assert result.error == "Test failed: assert solution(2) == 4\nAssertionError"
    assert result.official_error == "Test failed: "  # the paper's harness prints str(exception)


def test_traceback_is_reported_for_a_broken_program(sandbox):
    result = sandbox.run(job("def solution(x):\n    return x\nraise ValueError('boom')\n"))
    assert result.status == "error"
    assert "ValueError: boom" in result.error and 'File "<solution>", line 3' in result.error
    assert result.official_error.startswith("Code execution error: Traceback")


def test_setup_code_runs_after_the_program(sandbox):
    program, tests = "def solution(x):\n    return x * factor\n", ["assert solution(2) == 4"]
    assert not sandbox.run(CodeJob(program, tests)).passed  # official: no set-up code
    assert sandbox.run(CodeJob(program, tests, setup_code="factor = 2", bare_namespace=False)).passed


def test_work_directory_is_private_and_writable(sandbox):
    program = "open('scratch.txt', 'w').write('ok')\ndef solution(x):\n    return len(open('scratch.txt').read()) * 2\n"
    assert sandbox.run(job(program)).passed


def test_run_many_keeps_job_order(sandbox):
    jobs = [job(f"def solution(x):\n    return {value}\n") for value in (4, 5, 4, 0)]
    assert [r.passed for r in sandbox.run_many(jobs)] == [True, False, True, False]


def test_mbpp_grading_maps_outcomes(hostile):
    task = get_task("mbpp")
    item = task.load_samples("train")[0]  # square(n)
    outputs = [
        "Action: [BEGIN]\ndef square(n):\n    return n * n\n[END]",
        "Action: [BEGIN]\nwhile True: pass\n[END]",
        "Action: [BEGIN]\ndef square(n):\n    return n\n[END]",
        "Action: no code",
    ]
    outcomes = [v.outcome for v in task.grade_many([item] * 4, outputs, "official", hostile)]
    assert outcomes == ["correct", "timeout", "wrong", "parse_failure"]
    verdict = task.grade(item, outputs[2], "robust", hostile)
    assert verdict.feedback == "Test failed: assert square(3) == 9\nAssertionError\nAnswer is INCORRECT"


# ---- set-up, opt-in and the weaker modes ------------------------------------------------------------


def test_running_code_needs_the_opt_in():
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_execution=True"):
        Sandbox()


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown isolation mode"):
        Sandbox(allow_code_execution=True, isolation="docker")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        Sandbox(allow_code_execution=True, timeout_s=0)


def test_isolation_report_names_the_active_layers(isolated_sandbox):
    report = isolation_report()
    assert report.mode == isolated_sandbox.isolation.mode
    if report.mode in ("userns", "rootns"):
        layers = report.layers
        assert layers["mount_namespace"] and layers["pid_namespace"] and layers["network_namespace"]
        assert layers["read_only_root"] is True
        assert layers["user_namespace"] is (report.mode == "userns")
    assert "sandbox mode: " + report.mode in report.describe()


def test_no_isolation_can_be_required():
    with pytest.raises(SandboxError, match="no isolation layer"):
        Sandbox(allow_code_execution=True, isolation="none", require_isolation=True)


def test_limits_only_mode_still_times_out_and_detects_early_exits():
    weak = Sandbox(allow_code_execution=True, isolation="none", timeout_s=1.0, cpu_s=5)  # CPU headroom: see `hostile`
    assert not weak.isolation.isolated
    assert weak.run(job("def solution(x):\n    return 4\n")).passed
    assert weak.run(job("while True:\n    pass\n")).status == "timeout"
    assert weak.run(job("import os\nos._exit(0)\n")).status == "crashed"


@pytest.mark.parametrize("mode", [m for m in MODES if m not in ("none",)])
def test_each_isolating_mode_contains_writes(mode, tmp_path):
    try:
        box = Sandbox(allow_code_execution=True, isolation=mode, timeout_s=2.0)
    except SandboxError as exc:
        pytest.skip(f"{mode} mode is not available here: {exc}")
    canary = tmp_path / "canary.txt"
    canary.write_text("keep")
    before = all_pids()
    result = box.run(
        job(
            f"open({str(canary)!r}, 'w').write('owned')\nimport os\nif os.fork() == 0:\n    os.setsid()\n    import time; time.sleep(30)\n"
        )
    )
    assert not result.passed
    assert canary.read_text() == "keep"
    assert sandbox_processes(before) == []


def test_interpreter_under_tmp(tmp_path, isolated_sandbox):
    """The new root is mounted over a directory in a private namespace: it must not hide Python."""
    import subprocess

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    code = (
        "from reflectevo.sandbox import Sandbox, CodeJob\n"
        "box = Sandbox(allow_code_execution=True)\n"
        "print(box.isolation.mode, box.run(CodeJob('x = 1', ['assert x == 1'])).status)"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=120,
    )
    assert done.stdout.split() == [isolated_sandbox.isolation.mode, "passed"], done.stderr


def test_separate_uid_mode_with_a_system_python(tmp_path):
    """The no-namespace fallback for root: a separate uid. It needs an interpreter that uid may
    read, so this runs the sandbox from the system Python (a venv under /root would not do)."""
    import json
    import subprocess

    system_python = Path("/usr/bin/python3")
    if os.geteuid() != 0 or not system_python.exists():
        pytest.skip("needs root and a system Python at /usr/bin/python3")
    version = subprocess.run(
        [str(system_python), "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if version != "True":
        pytest.skip("the system Python is older than 3.11")
    canary = tmp_path / "canary.txt"
    canary.write_text("keep")
    programs = {
        "write": f"open({str(canary)!r}, 'w').write('owned')",
        "daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n",
        "loop": "while True:\n    pass",
        "pass": "def solution(x):\n    return x * 2",
    }
    script = (
        "import json, sys\nfrom reflectevo.sandbox import Sandbox, CodeJob\n"
        "box = Sandbox(allow_code_execution=True, isolation='uid', timeout_s=1.0, workers=2)\n"
        "jobs = [CodeJob(p, ['assert solution(2) == 4']) for p in json.loads(sys.argv[1])]\n"
        "print(json.dumps([r.status for r in box.run_many(jobs)]))"
    )
    repo = Path(__file__).resolve().parents[1]
    before = all_pids()
    done = subprocess.run(
        [str(system_python), "-c", script, json.dumps(list(programs.values()))],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)},
        timeout=120,
    )
    if done.returncode != 0 and "no sandbox mode could run" in done.stderr:
        pytest.skip(f"uid mode cannot start here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["error", "failed", "timeout", "passed"]
    assert canary.read_text() == "keep"
    assert sandbox_processes(before) == []


def _sleepers(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_without_a_pid_namespace_living_process_chains_are_killed():
    """A child that keeps a grandchild alive: killing the child orphans the grandchild to the
    launcher, which must kill it too rather than wait for it."""
    weak = Sandbox(allow_code_execution=True, isolation="none", timeout_s=3.0)
    marker = "31.4159"  # a sleep length no other process on the machine uses
    program = f"""
        import os
        if os.fork() == 0:
            if os.fork() == 0:
                os.execv("/bin/sleep", ["sleep", "{marker}"])
            os.execv("/bin/sleep", ["sleep", "{marker}"])
        """
    result = weak.run(job(program))
    assert result.status == "failed"  # not "timeout": the launcher did not hang on the grandchild
    assert _sleepers(marker) == []
