"""Run a program and its tests inside the sandbox, and report on a private pipe.

Executed by the sandboxed interpreter (standard library only). The job file is read and deleted
before any untrusted code runs; results go to an inherited file descriptor as JSON lines that
carry a per-run nonce, so a program that prints or exits early cannot pass itself off as passed.
(Code that deliberately inspects this runner's memory could forge a report: the sandbox protects
the host, not the grade against such an attack.)
"""

import json
import os
import sys
import traceback

MAX_ERROR_CHARS = 2000


def _short_traceback():
    # the frames of the untrusted code only, not of this runner
    kind, value, tb = sys.exc_info()
    frames = [frame for frame in traceback.extract_tb(tb) if frame.filename.startswith("<")]
    text = "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(kind, value))
    return text[-MAX_ERROR_CHARS:]


def main():
    job_path = sys.argv[1]
    with open(job_path, encoding="utf-8") as handle:
        job = json.load(handle)
    os.unlink(job_path)
    result_fd, nonce = job["result_fd"], job["nonce"]

    def report(**record):
        os.write(result_fd, (json.dumps({"nonce": nonce, **record}) + "\n").encode())

    def finish(**record):
        report(event="done", **record)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip atexit handlers and finalisers the program may have registered

    # The official harness runs ``exec(code, ns, ns)`` with an empty dict; the robust grader gives
    # the program a module name so ``if __name__ == ...`` blocks do not raise NameError.
    namespace = {} if job["bare_namespace"] else {"__name__": "__solution__"}
    steps = [("program", job["program"], "<solution>")]
    if job["setup_code"]:
        steps.append(("setup", job["setup_code"], "<test_setup>"))
    for phase, source, filename in steps:
        try:
            exec(compile(source, filename, "exec"), namespace, namespace)  # noqa: S102  (running the program is the point)
        except Exception:  # noqa: BLE001
            finish(
                status="error",
                phase=phase,
                error=_short_traceback(),
                official_error="Code execution error: " + traceback.format_exc(),
            )
        except BaseException as exc:  # noqa: BLE001  SystemExit, KeyboardInterrupt
            finish(
                status="failed",
                phase=phase,
                error=f"the {phase} code raised {type(exc).__name__}({exc}) before the tests ran",
                official_error="Unknown error occurred during execution.",
            )
    tests = job["tests"]
    for index, test in enumerate(tests):
        try:
            exec(compile(test, f"<test {index}>", "exec"), namespace, namespace)  # noqa: S102
        except Exception as exc:  # noqa: BLE001
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            finish(
                status="failed",
                phase="tests",
                failed_test=index,
                tests_passed=index,
                error=f"Test failed: {test.strip()}\n{message}"[-MAX_ERROR_CHARS:],
                official_error=f"Test failed: {exc}",
            )
        except BaseException as exc:  # noqa: BLE001
            finish(
                status="failed",
                phase="tests",
                failed_test=index,
                tests_passed=index,
                error=f"Test {test.strip()} raised {type(exc).__name__}({exc})",
                official_error="Unknown error occurred during execution.",
            )
    finish(status="passed", phase="tests", tests_passed=len(tests), error="", official_error="")


if __name__ == "__main__":
    main()
