"""Fault injection: run a stage's notebook in a child process and SIGKILL it at a chosen point.

A *fault point* is a moment where a kill is most likely to hurt: just before a file is renamed
into place (``os.replace``/``os.rename``), before its bytes are forced to disk (``os.fsync``),
before ``torch.save`` or a safetensors file is written, before a chunk of generation, and at the
end of every optimizer step. The child installs counting wrappers around those functions, then
executes the notebook's code cells in order (the real notebook code, in one process, without a
Jupyter kernel: nothing else differs from ``reflectevo run``).

A point's *signature* is ``kind|label|n``: what was called, on which file (relative to the run's
working directory, random temporary-name parts masked) and the how-many-th such call it is. An
uninterrupted reference run lists every signature in order; the harness draws kill points from
that list with a seeded generator, so a failure is replayed by giving the same seed::

    python tests/faults.py replay --stage 02 --seed 7 --kills 3        # what the test reports

Each chosen signature kills one run: run 1 is killed at the first signature; the rerun (which
resumes from what run 1 left) is killed at the second one, and so on; a last rerun finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hostile_corpus import lasting

REPO = Path(__file__).resolve().parents[1]
# mkstemp/mkdtemp names (".raw.jsonl.k2j4_x9a.tmp"), the uuid of a directory moved aside, a pid
_RANDOM_PARTS = (
    (re.compile(r"\.[A-Za-z0-9_]{8}\.tmp"), ".*.tmp"),
    (re.compile(r"\.old-[0-9a-f]{8}"), ".old-*"),
    (re.compile(r"tmp[A-Za-z0-9_]{8}"), "tmp*"),
)


# ---- the child: wrappers around the fault points, then the notebook's cells ------------------------
class FaultPoints:
    """Counting wrappers around the fault points; :meth:`arm` starts a new count for one run."""

    def __init__(self) -> None:
        self.kill_at: str | None = None
        self.root = Path.cwd()
        self.seen: dict[str, int] = {}
        self.trace: int | None = None

    def arm(self, trace_path: str | None, kill_at: str | None, root: Path) -> None:
        self.kill_at, self.root, self.seen = kill_at, root, {}
        self.trace = os.open(trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if trace_path else None

    def label(self, target: object) -> str:
        if isinstance(target, int):  # a file descriptor
            try:
                target = os.readlink(f"/proc/self/fd/{target}")
            except OSError:
                return "fd"
        if not isinstance(target, (str, os.PathLike)):
            return type(target).__name__
        path = Path(os.fspath(target))
        try:
            text = str(path.resolve().relative_to(self.root))
        except ValueError:
            text = path.name
        for pattern, mask in _RANDOM_PARTS:
            text = pattern.sub(mask, text)
        return text

    def point(self, kind: str, target: object = None) -> None:
        label = f"{kind}|{self.label(target) if target is not None else '-'}"
        self.seen[label] = self.seen.get(label, 0) + 1
        signature = f"{label}|{self.seen[label]}"
        if self.trace is not None:
            os.write(self.trace, (signature + "\n").encode())
        if signature == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        """Wrap the fault points. Call before transformers and peft are imported: they bind
        ``safetensors.torch.save_file`` under their own names when they load."""
        import safetensors.torch
        import torch

        def wrap(owner: object, name: str, kind: str, target_of) -> None:
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                self.point(kind, target_of(args, kwargs))
                return original(*args, **kwargs)

            setattr(owner, name, wrapper)

        wrap(os, "replace", "replace", lambda a, k: a[1])
        wrap(os, "rename", "rename", lambda a, k: a[1])
        wrap(os, "fsync", "fsync", lambda a, k: a[0])
        wrap(torch, "save", "torch.save", lambda a, k: a[1] if len(a) > 1 else k.get("f"))
        wrap(safetensors.torch, "save_file", "safetensors", lambda a, k: a[1] if len(a) > 1 else k.get("filename"))
        import transformers.trainer_callback

        from reflectevo.generation.engines import TransformersEngine

        wrap(TransformersEngine, "generate_chunk", "generate", lambda a, k: None)
        handler = transformers.trainer_callback.CallbackHandler
        original_step_end = handler.on_step_end

        def on_step_end(handler_self, args, state, control):
            self.point("step_end", None)
            return original_step_end(handler_self, args, state, control)

        handler.on_step_end = on_step_end


POINTS = FaultPoints()


def execute_notebook_cells(notebook: Path, params_file: str) -> None:
    """Run the code cells of ``notebook`` in one namespace, ``params_file`` set as papermill would."""
    cells = json.loads(notebook.read_text())["cells"]
    namespace: dict = {"__name__": "__main__", "display": lambda *args, **kwargs: None}
    for index, cell in enumerate(cell for cell in cells if cell["cell_type"] == "code"):
        source = "".join(cell["source"])
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            source += f"\nparams_file = {params_file!r}\n"
        exec(compile(source, f"{notebook.name}[code cell {index + 1}]", "exec"), namespace)  # noqa: S102  (the notebook is ours)


def zygote() -> None:
    """Import the heavy libraries once, then fork one child per request read from stdin.

    A request is a JSON line ``{notebook, params_file, cwd, trace, kill_at, log, timeout}``; the
    answer is ``{returncode}`` (negative: killed by that signal), as ``subprocess`` reports it.
    Forking from a process that has imported, but not yet used, torch is safe: no thread exists yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    POINTS.install()
    import datasets  # noqa: F401
    import pandas  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401

    import reflectevo.evaluation.stage
    import reflectevo.reflection.curation
    import reflectevo.reflection.pipeline
    import reflectevo.training.stage  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: never returns into the loop
            code = 1
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.chdir(request["cwd"])
                POINTS.arm(request["trace"], request["kill_at"], Path(request["cwd"]).resolve())
                execute_notebook_cells(Path(request["notebook"]), request["params_file"])
                code = 0
            except BaseException:  # noqa: BLE001  (reported through the exit code and the log)
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": returncode}), flush=True)


# ---- the parent: reference runs, chosen kills, reruns ---------------------------------------------
@dataclass
class ChildRun:
    returncode: int
    trace: list[str]
    seconds: float
    output: str = ""


@dataclass
class KillChain:
    """What one stage went through: the kill points drawn, which of them landed, and the reruns."""

    stage: str
    seed: int
    chosen: list[str]
    landed: list[str] = field(default_factory=list)
    runs: list[ChildRun] = field(default_factory=list)
    cwd: Path | None = None

    def replay(self) -> str:
        return f"python tests/faults.py replay --stage {self.stage[:2]} --seed {self.seed} --kills {len(self.chosen)}"


class Zygote:
    """The parent's handle on a zygote process (see :func:`zygote`)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert json.loads(self.process.stdout.readline()).get("ready"), "the fault-injection zygote did not start"

    def run(
        self, stage: str, params_file: Path, cwd: Path, kill_at: str | None = None, timeout: float = 600
    ) -> ChildRun:
        trace, log = cwd / f".fault-trace-{time.monotonic_ns()}", cwd / f".fault-log-{time.monotonic_ns()}"
        request = {
            "notebook": str(REPO / "notebooks" / f"{stage}.ipynb"),
            "params_file": str(params_file),
            "cwd": str(cwd),
            "trace": str(trace),
            "kill_at": kill_at,
            "log": str(log),
            "timeout": timeout,
        }
        started = time.monotonic()
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        lines = trace.read_text().splitlines() if trace.exists() else []
        output = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        trace.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        return ChildRun(answer["returncode"], lines, round(time.monotonic() - started, 2), output)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


def choose_kills(trace: list[str], count: int, seed: int) -> list[str]:
    """``count`` distinct signatures of ``trace``, in trace order, drawn by ``seed``."""
    positions = sorted(random.Random(seed).sample(range(len(trace)), min(count, len(trace))))
    return [trace[p] for p in positions]


def kill_chain(
    zygote: Zygote, stage: str, params_file: Path, cwd: Path, reference: list[str], count: int, seed: int
) -> KillChain:
    """Kill the stage at ``count`` seeded points of the reference trace, one run each, checking after
    every kill that nothing visible is half-written; then let a last rerun finish."""
    chain = KillChain(stage, seed, choose_kills(reference, count, seed))
    for signature in chain.chosen:
        run = zygote.run(stage, params_file, cwd, kill_at=signature)
        chain.runs.append(run)
        if run.returncode == 0:
            return chain  # the rerun had less left to do and finished before reaching this point
        if run.returncode != -signal.SIGKILL:
            raise AssertionError(
                f"{stage}: the run to be killed at {signature} failed instead "
                f"(exit {run.returncode}); replay: {chain.replay()}\n{run.output}"
            )
        chain.landed.append(signature)
        problems = half_written(cwd / "outputs")
        assert not problems, f"{stage}, killed at {signature}: {problems}; replay: {chain.replay()}"
    final = zygote.run(stage, params_file, cwd)
    chain.runs.append(final)
    if final.returncode != 0:
        raise AssertionError(
            f"{stage}: the rerun after kills at {chain.landed} failed (exit {final.returncode}); "
            f"replay: {chain.replay()}\n{final.output}"
        )
    return chain


# ---- what must hold after a kill, and after the rerun ----------------------------------------------
def half_written(outputs: Path) -> list[str]:
    """Visible files a reader would take for results but that are not whole: JSON/JSONL that does
    not parse, adapters without their weights or config, datasets that do not load. Hidden files
    (temporary names) are not results; :func:`leftovers` looks at those once the stage finished."""
    from datasets import load_from_disk
    from safetensors import safe_open

    problems = []
    for path in sorted(outputs.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(outputs).parts):
            continue
        try:
            if path.is_file() and path.suffix == ".jsonl":
                [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            elif path.is_file() and path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.is_dir() and path.name == "adapter":
                with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as weights:
                    assert list(weights.keys()), "no tensors"
                json.loads((path / "adapter_config.json").read_text())
            elif (
                path.is_dir()
                and path.parent.name in ("datasets", "data")
                and (path / "dataset_info.json").exists() | (path / "dataset_dict.json").exists()
            ):
                load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001  (any failure to read back is the finding)
            problems.append(f"{path.relative_to(outputs)}: {type(exc).__name__}: {exc}")
    return problems


LEFTOVER = re.compile(r"^\..*(\.tmp|\.partial|\.old-[0-9a-f]{8})$")


def leftovers(outputs: Path) -> list[str]:
    """Temporary files and folders a killed writer left behind, still there after the rerun."""
    return sorted(str(path.relative_to(outputs)) for path in outputs.rglob(".*") if LEFTOVER.match(path.name))


def sandbox_strays() -> list[str]:
    """Processes of the code sandbox still alive (none may outlive the stage that started them), once
    the runs of another test still under way (``pytest -n 2``) had the time to end."""
    return lasting(_sandbox_launchers)


def _sandbox_launchers() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "reflectevo/sandbox/" in command:
                found[int(entry.name)] = f"{entry.name}: {command[:120]}"
    return found


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) and its sha256."""
    import hashlib

    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# ---- the procedure the test and a replay share ------------------------------------------------------
STAGES = ("01_data", "02_reflect", "03_sft", "04_dpo", "05_eval")
DATA_STAGES = {"01_data": "data", "02_reflect": "reflect", "05_eval": "eval"}  # byte-identical after kills
TRAINING_STAGES = {"03_sft": "sft", "04_dpo": "dpo"}  # the same weights after kills (CPU, fp32: bit-equal)
RECIPE = REPO / "params" / "smoke.yaml"


@dataclass
class Reference:
    """An uninterrupted run, stage by stage, with a copy of its working directory before each stage."""

    root: Path
    before: dict[str, Path] = field(default_factory=dict)
    traces: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def reference_run(zygote: Zygote, workdir: Path, stages: tuple[str, ...] = STAGES) -> Reference:
    import shutil

    reference = Reference(workdir / "reference")
    reference.root.mkdir(parents=True)
    for stage in stages:
        reference.before[stage] = workdir / f"before-{stage}"
        shutil.copytree(reference.root, reference.before[stage])
        run = zygote.run(stage, RECIPE, reference.root)
        assert run.returncode == 0, f"the uninterrupted run of {stage} failed (exit {run.returncode}):\n{run.output}"
        reference.traces[stage], reference.seconds[stage] = run.trace, run.seconds
    return reference


def fault_stage(zygote: Zygote, reference: Reference, stage: str, kills: int, seed: int, workdir: Path) -> KillChain:
    """Rerun ``stage`` from the reference's state before it, killed at ``kills`` points, to the end."""
    import shutil

    cwd = workdir / f"killed-{stage}"
    shutil.copytree(reference.before[stage], cwd)
    chain = kill_chain(zygote, stage, RECIPE, cwd, reference.traces[stage], kills, seed)
    chain.cwd = cwd
    return chain


# the weights, optimizer, scheduler and RNG states: bit-equal after a resume on CPU (fp32)
TENSOR_FILES = (".safetensors", ".pt", ".pth", "adapter_config.json")


def training_facts(metrics: dict) -> list[dict]:
    """What a resume must not change in a phase's or variant's metrics.json: steps, epochs, rows and
    tokens trained, the adapter's tensor digest, and the held-out loss after training (to METRIC_RTOL)."""
    phases = metrics.get("phases") or [metrics]
    facts = []
    for phase in phases:
        m = phase["metrics"]
        facts.append(
            {
                "steps": m["steps"],
                "epochs": m["epochs"],
                "rows": m["rows"],
                "tokens": m["tokens"],
                "adapter": m["adapter_sha256_of_tensors"],
                "loss_after": {k: v["after"] for k, v in m["evaluation"].items() if k.endswith("_loss")},
            }
        )
    return facts


# Evaluations logged during training agree between two CPU processes to about 1e-5 relative, not bit
# for bit: the CPU matrix kernels' rounding depends on memory alignment, which differs with what the
# process did before (a resumed run skips the phases already done). The trained weights are bit-equal.
METRIC_RTOL = 1e-4


def same_metrics(a: object, b: object) -> bool:
    """Equal, floats within :data:`METRIC_RTOL`."""
    import math

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_metrics(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_metrics(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=METRIC_RTOL, abs_tol=1e-9)
    return a == b


def differences(reference_root: Path, other_root: Path, stage: str) -> list[str]:
    """How ``stage`` in ``other_root`` differs from the reference: every file byte for byte for a data
    stage; for a training stage the same files, the same adapter and checkpoint tensors byte for byte,
    and the same :func:`training_facts` (held-out loss to :data:`METRIC_RTOL`)."""
    run_a, run_b = reference_root / "outputs" / "smoke", other_root / "outputs" / "smoke"
    found = [f"left behind: {path}" for path in leftovers(run_b)]
    entries = [json.loads((run / "manifest.json").read_text())["stages"].get(stage, {}) for run in (run_a, run_b)]
    if entries[1].get("status") != "done" or entries[1].get("identity") != entries[0].get("identity"):
        found.append(f"manifest: {stage} is {entries[1].get('status')} with identity {entries[1].get('identity')}")
    if stage in DATA_STAGES:
        if entries[0].get("outputs") != entries[1].get("outputs"):
            found.append("manifest: the recorded output hashes differ")
        a, b = tree(run_a / DATA_STAGES[stage]), tree(run_b / DATA_STAGES[stage])
        found += [
            f"{DATA_STAGES[stage]}/{name}: " + ("missing" if name not in b else "extra" if name not in a else "differs")
            for name in sorted(set(a) | set(b))
            if a.get(name) != b.get(name)
        ]
    else:
        folder = TRAINING_STAGES[stage]
        a, b = tree(run_a / folder), tree(run_b / folder)
        for name in sorted(set(a) | set(b)):
            if "/runs/" in name:  # TensorBoard event files: named and stamped by wall-clock time
                continue
            if name not in a or name not in b:
                found.append(f"{folder}/{name}: {'missing' if name not in b else 'extra'}")
            elif a[name] != b[name] and name.endswith(TENSOR_FILES):
                found.append(f"{folder}/{name}: differs")
            elif name.endswith("metrics.json") and "/ranks/" not in name:
                values = [json.loads((run / folder / name).read_text()) for run in (run_a, run_b)]
                if not same_metrics(*(training_facts(value) for value in values)):
                    found.append(f"{folder}/{name}: steps, tokens, rows or held-out loss differ")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("zygote", help="(internal) serve forked children that run one notebook's cells each")
    cells = sub.add_parser("cells", help="run one notebook's code cells here; on an error print it as JSON, exit 3")
    cells.add_argument("notebook")
    cells.add_argument("params_file")
    cells.add_argument("--check", help="on an error, also report what is half-written or left over in this folder")
    replay = sub.add_parser("replay", help="rerun the fault injection of one stage with a given seed")
    replay.add_argument("--stage", required=True, help="01 .. 05")
    replay.add_argument("--seed", type=int, required=True)
    replay.add_argument("--kills", type=int, default=2)
    replay.add_argument("--workdir", help="where the runs go (default: a new temporary folder, kept)")
    args = parser.parse_args()
    if args.command == "zygote":
        zygote()
        return
    if args.command == "cells":
        import matplotlib

        matplotlib.use("Agg")
        try:
            execute_notebook_cells(Path(args.notebook), args.params_file)
        except Exception as exc:  # noqa: BLE001  (reported to the calling test)
            report = {"error": type(exc).__name__, "message": str(exc)}
            if args.check:
                folder = Path(args.check)
                report.update(
                    half_written=half_written(folder),
                    leftovers=leftovers(folder),
                    files=sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
                )
            print(json.dumps(report))
            sys.exit(3)
        return
    import tempfile

    stage = next(s for s in STAGES if s.startswith(args.stage))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="reflectevo-faults-"))
    forked = Zygote()
    try:
        reference = reference_run(forked, workdir, STAGES[: STAGES.index(stage) + 1])
        chain = fault_stage(forked, reference, stage, args.kills, args.seed, workdir)
    finally:
        forked.close()
    print(f"{stage}: kill points {chain.chosen}; landed {chain.landed}; runs {[r.returncode for r in chain.runs]}")
    found = differences(reference.root, chain.cwd, stage)
    print("\n".join(found) if found else "no difference from the uninterrupted run", f"\n(runs kept in {workdir})")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
