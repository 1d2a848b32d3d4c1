"""The `reflectevo` command, run as a user runs it (a subprocess of the installed entry point)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def reflectevo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("reflectevo")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "reflectevo"]
    return subprocess.run(command + list(args), capture_output=True, text=True, check=False, cwd=cwd, timeout=600)


def test_entry_point_is_installed():
    assert shutil.which("reflectevo", path=os.path.dirname(sys.executable)), "pip install -e . installs the command"


def test_tasks():
    done = reflectevo("tasks")
    assert done.returncode == 0
    for name in ("logiqa", "math", "mbpp", "bigbench"):
        assert name in done.stdout
    rows = json.loads(reflectevo("tasks", "--json").stdout)
    assert [row["name"] for row in rows] == ["logiqa", "math", "mbpp", "bigbench"]


def test_grade_one_answer_under_both_graders():
    done = reflectevo("grade", "math", "--gold", "\\frac{1}{4}", "--output", "Thought: t\nAction: Finish<<<0.25>>>")
    assert done.returncode == 0
    assert "official wrong" in done.stdout and "robust   correct" in done.stdout
    verdicts = json.loads(
        reflectevo("grade", "logiqa", "--gold", "b", "--output", "Action: Finish[(B)]", "--json").stdout
    )
    assert [(v["grader"], v["outcome"]) for v in verdicts] == [("official", "wrong"), ("robust", "correct")]


def test_grade_a_predictions_file(tmp_path, official_dir):
    items = [json.loads(line) for line in (official_dir / "logiqa_test.jsonl").read_text().splitlines()[:3]]
    predictions = tmp_path / "predictions.jsonl"
    outputs = [f"Action: Finish[{items[0]['answer'].upper()}]", "Action: Finish[(A)]", "no answer"]
    predictions.write_text("".join(json.dumps({"id": i + 1, "output": o}) + "\n" for i, o in enumerate(outputs)))
    out = tmp_path / "graded.jsonl"
    done = reflectevo(
        "grade",
        "logiqa",
        "--data",
        str(official_dir / "logiqa_test.jsonl"),
        "--predictions",
        str(predictions),
        "--allow-missing",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "3 predictions graded (497 items without one)" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and {row["grader"] for row in rows} == {"official", "robust"}
    assert [row["outcome"] for row in rows if row["grader"] == "official"][2] == "parse_failure"


def test_grade_mbpp_needs_the_opt_in_and_then_runs(official_dir):
    data = str(official_dir / "mbpp_test.jsonl")
    output = "Action: [BEGIN]\ndef remove_Occ(s, ch):\n    return s\n[END]"
    refused = reflectevo("grade", "mbpp", "--data", data, "--id", "11", "--output", output)
    assert refused.returncode == 2 and "--allow-code-execution" in refused.stderr
    done = reflectevo("grade", "mbpp", "--data", data, "--id", "11", "--output", output, "--allow-code-execution")
    assert done.returncode == 0, done.stderr
    assert "official wrong" in done.stdout and 'assert remove_Occ("hello","l") == "heo"' in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["grade", "gsm8k", "--gold", "1", "--output", "x"],
            "unknown task 'gsm8k'; known tasks: bigbench, logiqa, math, mbpp",
        ),
        (
            ["grade", "math", "--data", "/nonexistent/math.jsonl", "--id", "1", "--output", "x"],
            "data file not found: /nonexistent/math.jsonl",
        ),
        (["grade", "math", "--output", "x"], "--gold GOLD, or --data FILE --id ID"),
        (
            ["grade", "mbpp", "--gold", "def f(): pass", "--output", "x", "--allow-code-execution"],
            "--data FILE --id ID",
        ),
        (["check-graders", "math"], "--official-dir DIR"),
    ],
)
def test_bad_input_gives_a_clear_error(args, message):
    done = reflectevo(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_malformed_data_line_is_named(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    done = reflectevo("grade", "logiqa", "--data", str(data), "--id", "1", "--output", "Finish[A]")
    assert done.returncode == 2 and f"{data}:2: not valid JSON" in done.stderr


def test_check_graders_on_the_samples(tmp_path):
    report = tmp_path / "report.json"
    done = reflectevo("check-graders", "--samples", "--allow-code-execution", "--json", str(report))
    assert done.returncode == 0, done.stderr
    assert "mbpp: 20 items" in done.stdout and "gold not correct: s15" in done.stdout
    reports = {r["task"]: r for r in json.loads(report.read_text())}
    assert reports["mbpp"]["graders"]["robust"]["gold_outcomes"] == {"correct": 20}


def test_check_graders_refuses_mbpp_without_opt_in_before_running_anything():
    done = reflectevo("check-graders", "--samples", "mbpp")
    assert done.returncode == 2 and "opt in explicitly" in done.stderr


def test_sandbox_command():
    done = reflectevo("sandbox", "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout)["mode"] in ("userns", "rootns", "uid", "none")
