"""The two-trial pipeline: stage-by-stage batching, the raw record schema, exact prompts, both
attempt modes and both second-trial variants, verifier feedback, the code-execution opt-in, and
resuming a run that was killed in the middle of generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reflectevo.config import load_params
from reflectevo.errors import CodeExecutionNotAllowed, DataError
from reflectevo.generation.engines import ReplayEngine, make_engine
from reflectevo.generation.requests import GenerationOutput
from reflectevo.models.loading import load_model
from reflectevo.prompts import get_instruction, reflection_prompt
from reflectevo.reflection.pipeline import (
    ReflectionPipeline,
    first_trial_summary,
    format_worked_example,
    make_sandbox,
    pick_worked_example,
    reflection_success,
)
from reflectevo.tasks import get_task

REPO = Path(__file__).resolve().parents[1]


def make_params(tmp_path, **reflect):
    sections = {
        "run": {"name": "t", "seed": 0, "output_dir": str(tmp_path / "outputs")},
        "model": {"name": "builtin:tiny", "backend": "transformers", "dtype": "float32", "device": "cpu"},
        "generation": {"batch_size": 8, "max_new_tokens": 64},
        "reflect": {
            "fewshots": 0,
            "instructions": ["1-3-2", "2-5-1"],
            "samples_per_instruction": 2,
            "max_new_tokens": 64,
            **reflect,
        },
        "eval": {"fewshots": 0},  # as reflect: the test inputs are asked like the training inputs
    }
    return load_params(None, sections)


class CountingReplay(ReplayEngine):
    """A replay engine that also remembers how many requests each generate call carried."""

    def __init__(self, rows):
        super().__init__(rows)
        self.calls: list[tuple[str, int]] = []

    def generate(self, requests, settings, *, stage, **options) -> list[GenerationOutput]:
        self.calls.append((stage, len(requests)))
        return super().generate(requests, settings, stage=stage, **options)


def logiqa_items(count=3):
    return get_task("logiqa").load_samples("train")[:count]


def unanswerable_math_items(count=4):
    """MATH sample items whose gold no model writes, so every first trial fails and is reflected on, whatever a
    build of the stand-in answers (it knows its training items, and another build gets others right)."""
    import dataclasses

    return [
        dataclasses.replace(item, gold="\\frac{99991}{7}") for item in get_task("math").load_samples("train")[:count]
    ]


def scripted_rows(items):
    """Item 0 right at once; items 1.. wrong, then one reflection of each instruction leads to the gold."""
    rows = []
    for index, item in enumerate(items):
        gold = item.gold.upper()
        wrong = "A" if gold != "A" else "B"
        rows.append(
            {"key": f"logiqa/{item.id}/t1", "text": f"Thought: pick.\nAction: Finish[{gold if index == 0 else wrong}]"}
        )
        for instruction in ("1-3-2", "2-5-1"):
            for sample in (0, 1):
                rows.append(
                    {
                        "key": f"logiqa/{item.id}/{instruction}",
                        "sample": sample,
                        "text": f"My answer {wrong} was wrong ({instruction} #{sample}).",
                    }
                )
                answer = gold if sample == 0 else wrong
                rows.append(
                    {
                        "key": f"logiqa/{item.id}/{instruction}/{sample}",
                        "text": f"Thought: again.\nAction: Finish[{answer}]",
                    }
                )
    return rows


def test_each_step_is_one_batched_call_over_all_questions(tmp_path):
    items = logiqa_items(3)
    engine = CountingReplay(scripted_rows(items))
    result = ReflectionPipeline(make_params(tmp_path), engine).run({"logiqa": items})
    # all first trials in one call, all reflections in one, all second trials in one; never per question
    assert engine.calls == [("first_trial", 3), ("reflection", 4), ("second_trial", 8)]
    records = result.records
    assert [len(r["output"]) for r in records] == [1, 5, 5]
    keys = [(r["task"], r["id"], o["instruction"], o["sample"]) for r in records for o in r["output"]]
    assert len(keys) == len(set(keys)) == 11
    assert result.stats["records"] == 11 and result.stats["questions"] == 3


def test_record_schema_is_close_to_the_official_raw_format(tmp_path):
    items = logiqa_items(2)
    records = (
        ReflectionPipeline(make_params(tmp_path), ReplayEngine(scripted_rows(items))).run({"logiqa": items}).records
    )
    record = records[1]
    assert {
        "task",
        "id",
        "question",
        "answer",
        "output",
        "protocol",
        "grader",
        "attempt_calls",
        "second_trial_variant",
    } <= set(record)
    assert record["protocol"] == "oracle" and record["grader"] == "official" and record["answer"] == items[1].gold
    first, second = record["output"][0], record["output"][1]
    assert first["trial"] == 1 and first["instruction"] is None and first["is_correct"] is False
    assert first["scratchpad"].endswith("Observation: Answer is INCORRECT") and first["outcome"] == "wrong"
    assert second["trial"] == 2 and second["instruction"] == "1-3-2" and second["sample"] == 0 and second["is_correct"]
    assert second["reflections"][0].endswith("(1-3-2 #0).")
    # the reflection prompt is built from the first trial the reflector saw, never from the second
    expected = reflection_prompt(items[1], first["reasoning"], first["feedback"], get_instruction("1-3-2"))
    assert second["reflection_input"] == expected
    assert second["generation"]["reflection"]["settings"]["temperature"] == 0.8
    assert second["generation"]["attempt"][0]["settings"]["temperature"] == 0.0


def test_second_trial_variants_differ_only_in_the_failed_attempt(tmp_path):
    items = logiqa_items(2)
    with_attempt = (
        ReflectionPipeline(make_params(tmp_path), ReplayEngine(scripted_rows(items))).run({"logiqa": items}).records
    )
    alone = (
        ReflectionPipeline(make_params(tmp_path, second_trial="reflection"), ReplayEngine(scripted_rows(items)))
        .run({"logiqa": items})
        .records
    )
    failed = with_attempt[1]["output"][0]["reasoning"]
    assert failed in with_attempt[1]["output"][1]["reason_input"]
    assert failed not in alone[1]["output"][1]["reason_input"]
    assert alone[1]["second_trial_variant"] == "reflection"
    assert "My answer A was wrong (1-3-2 #0)." in alone[1]["output"][1]["reason_input"]


def test_an_empty_split_is_refused_before_generation(tmp_path):
    engine = CountingReplay([])
    with pytest.raises(DataError, match="no questions to answer"):
        ReflectionPipeline(make_params(tmp_path), engine).run({"logiqa": [], "math": []})
    assert engine.calls == []


def test_parse_failures_are_counted_and_still_reflected_on(tmp_path):
    items = logiqa_items(2)
    unparseable = {"key": f"logiqa/{items[1].id}/t1", "text": "Thought: unsure."}
    rows = [row for row in scripted_rows(items) if row["key"] != unparseable["key"]] + [unparseable]
    records = ReflectionPipeline(make_params(tmp_path), ReplayEngine(rows)).run({"logiqa": items}).records
    first = records[1]["output"][0]
    assert first["outcome"] == "parse_failure" and first["generated_answer"] == "" and len(records[1]["output"]) == 5
    table = first_trial_summary(records)
    assert int(table.loc["logiqa", "parse_failure"]) == 1 and int(table.loc["logiqa", "correct"]) == 1


def test_mbpp_feedback_carries_the_failing_test_and_needs_the_opt_in(tmp_path):
    item = get_task("mbpp").load_samples("train")[0]
    params = make_params(tmp_path, instructions=["1-1-1"], samples_per_instruction=1, temperature=0.0)
    with pytest.raises(CodeExecutionNotAllowed):
        make_sandbox(params, ["mbpp"])
    params = params.model_copy(update={"run": params.run.model_copy(update={"allow_code_execution": True})})
    sandbox = make_sandbox(params, ["mbpp"])
    signature = next(line for line in item.gold.splitlines() if line.startswith("def "))
    rows = [
        {"key": f"mbpp/{item.id}/t1", "text": f"Thought: stub.\nAction: [BEGIN]\n{signature}\n    return None\n[END]"},
        {"key": f"mbpp/{item.id}/1-1-1", "text": "My code returned nothing."},
        {"key": f"mbpp/{item.id}/1-1-1/0", "text": f"Thought: real.\nAction: [BEGIN]\n{item.gold}\n[END]"},
    ]
    records = ReflectionPipeline(params, ReplayEngine(rows), sandbox=sandbox).run({"mbpp": [item]}).records
    first, second = records[0]["output"]
    assert first["outcome"] == "wrong" and "Answer is INCORRECT" in first["feedback"]
    assert first["error"] and first["error"] in first["feedback"]  # the failing assert, as the paper shows it
    assert first["error"] in second["reflection_input"]
    assert second["is_correct"] and records[0]["test_list"] == item.tests


def test_robust_grader_feedback_on_free_text_bigbench_reports_f1(tmp_path):
    item = next(i for i in get_task("bigbench").load_samples("train") if not i.options)
    params = make_params(tmp_path, grader="robust", instructions=["1-1-1"], samples_per_instruction=1, temperature=0.0)
    rows = [
        {"key": f"bigbench/{item.id}/t1", "text": "Thought: hm.\nAction: Finish[something else entirely]"},
        {"key": f"bigbench/{item.id}/1-1-1", "text": "Wrong."},
        {"key": f"bigbench/{item.id}/1-1-1/0", "text": "Thought: hm.\nAction: Finish[nothing]"},
    ]
    records = ReflectionPipeline(params, ReplayEngine(rows)).run({"bigbench": [item]}).records
    assert "F1 Score:" in records[0]["output"][0]["feedback"]
    assert "F1 Score:" in records[0]["output"][1]["reflection_input"]


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    params = make_params(Path("/nonexistent"))
    loaded = load_model(params.model)
    return loaded, make_engine(params.generation, loaded, progress=False)


@pytest.mark.parametrize(("attempt_calls", "prefill"), [(1, "action"), (2, "action"), (2, "answer")])
def test_the_stored_prompts_are_exactly_what_the_model_was_sent(tmp_path, tiny_engine, attempt_calls, prefill):
    loaded, engine = tiny_engine
    items = get_task("logiqa").load_samples("validation")  # unseen by the stand-in: some answers are wrong
    params = make_params(tmp_path, attempt_calls=attempt_calls, attempt_prefill=prefill)
    records = ReflectionPipeline(params, engine, tmp_path / "gen").run({"logiqa": items}).records
    template = loaded.tokenizer.apply_chat_template
    opening = "Action: Finish[" if prefill == "answer" else "Action:"
    for record in records:
        assert record["attempt_calls"] == attempt_calls and record["attempt_prefill"] == prefill
        for output in record["output"]:
            prompts = output["reason_prompt"]
            assert len(prompts) == attempt_calls
            user = [{"role": "user", "content": output["reason_input"]}]
            if attempt_calls == 1:
                assert prompts[0] == template(user, tokenize=False, add_generation_prompt=True)
            else:
                assert prompts[0].startswith(template(user, tokenize=False, add_generation_prompt=True))
                assert prompts[0].endswith("Thought:") and prompts[1].endswith(opening)
                # the pre-filled opening is part of the attempt the graders read
                assert f"\n{opening}" in output["reasoning"]
                thought = output["reasoning"].split("\nAction:")[0]
                assert prompts[1].startswith(prompts[0]) and thought.removeprefix("Thought:").strip() in prompts[1]
            if output["trial"] == 2:
                reflection_user = [{"role": "user", "content": output["reflection_input"]}]
                assert output["reflection_prompt"] == template(
                    reflection_user, tokenize=False, add_generation_prompt=True
                )
    assert any(len(record["output"]) > 1 for record in records), "the stand-in got every question right"
    example = pick_worked_example(records)
    text = format_worked_example(example)
    assert "FIRST ATTEMPT" in text and "REFLECTION" in text and "SECOND ATTEMPT" in text
    table = reflection_success(records)
    assert set(table["dimension"]) == {"verify", "error", "plan"}
    assert (table["successes"] <= table["reflections"]).all()


# ---- killed in the middle of generation, then resumed ----------------------------------------------
RUN_PIPELINE = """
import json, sys
from pathlib import Path
from reflectevo.config import load_params
from reflectevo.generation.engines import make_engine
from reflectevo.models.loading import load_model
from reflectevo.reflection.pipeline import ReflectionPipeline, write_records
from reflectevo.tasks import get_task

out = Path(sys.argv[1])
params = load_params(None, {
    "model": {"name": "builtin:tiny", "backend": "transformers", "dtype": "float32", "device": "cpu"},
    "generation": {"batch_size": 2, "max_new_tokens": 48},
    "reflect": {"fewshots": 0, "instructions": "random_k", "instructions_k": 2, "samples_per_instruction": 2,
                "max_new_tokens": 48},
    "eval": {"fewshots": 0},
})
items = {name: get_task(name).load_samples("train")[:6] for name in ("logiqa", "bigbench")}
engine = make_engine(params.generation, load_model(params.model), progress=False)
result = ReflectionPipeline(params, engine, out / "generations").run(items)
write_records(result.records, out / "raw.jsonl")
print(json.dumps(result.stats))
"""


def run_pipeline_process(folder: Path, kill_when=None) -> subprocess.CompletedProcess | None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_PIPELINE, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    if kill_when is None:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        return subprocess.CompletedProcess(process.args, 0, stdout, stderr)
    deadline = time.monotonic() + 600
    while not kill_when() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed: " + process.communicate()[1][-2000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return None


def test_a_run_killed_during_generation_resumes_with_every_record_exactly_once(tmp_path, tiny_model_dir):
    reference = tmp_path / "reference"
    run_pipeline_process(reference)
    expected = [json.loads(line) for line in (reference / "raw.jsonl").read_text().splitlines()]

    resumed = tmp_path / "resumed"
    reflections = resumed / "generations" / "reflection"
    # kill once some, but not all, reflection batches are committed
    run_pipeline_process(
        resumed, kill_when=lambda: reflections.is_dir() and len(list(reflections.glob("batch-*.jsonl"))) >= 2
    )
    assert not (resumed / "raw.jsonl").exists()
    committed_before = {p.name: p.read_bytes() for p in reflections.glob("batch-*.jsonl")}
    result = run_pipeline_process(resumed)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["records"] == sum(len(r["output"]) for r in expected)
    for name, content in committed_before.items():  # finished batches were kept, not generated again
        assert (reflections / name).read_bytes() == content
    records = [json.loads(line) for line in (resumed / "raw.jsonl").read_text().splitlines()]
    keys = [(r["task"], r["id"], o["instruction"], o["sample"]) for r in records for o in r["output"]]
    assert len(keys) == len(set(keys))
    assert records == expected  # nothing lost, nothing duplicated, the same bytes as an uninterrupted run


def test_out_of_memory_halves_the_batch_the_run_completes_and_the_manifest_records_it(tmp_path, tiny_model_dir):
    """CUDA's out-of-memory error injected into the model's forward pass above 2 rows: generation backs off,
    the stage finishes with every record, and the run manifest lists each back-off."""
    import torch

    from reflectevo.runs.plan import read_manifest
    from reflectevo.runs.rundir import open_run

    params = make_params(tmp_path)  # generation.batch_size 8
    items = {"logiqa": logiqa_items(4), "math": unanswerable_math_items(4)}  # the math ones all fail, so they reflect
    loaded = load_model(params.model)
    plain = ReflectionPipeline(params, make_engine(params.generation, loaded, progress=False)).run(items).records
    forward = loaded.model.forward

    def out_of_memory_above_two_rows(input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected above 2 rows)")
        return forward(input_ids=input_ids, **kwargs)

    loaded.model.forward = out_of_memory_above_two_rows
    engine = make_engine(params.generation, loaded, progress=False)
    with open_run(params) as rundir:
        stage = rundir.begin_stage("02_reflect", require_upstream=False)
        records = ReflectionPipeline(params, engine, stage.dir / "generations").run(items).records
        rundir.record_engine("02_reflect", engine)
        stage.finish()
    manifest = read_manifest(params.run_dir)
    backoffs = [event for event in manifest["events"] if event.get("event") == "oom_backoff"]
    assert [{k: v for k, v in event.items() if k != "time"} for event in backoffs] == [
        {
            "kind": "generation",
            "event": "oom_backoff",
            "stage": "first_trial",
            "batch": 0,
            "old_size": 8,
            "new_size": 4,
        },
        {
            "kind": "generation",
            "event": "oom_backoff",
            "stage": "first_trial",
            "batch": 0,
            "old_size": 4,
            "new_size": 2,
        },
        # 2 samples per reflection prompt: 2 prompts are 4 rows, too many; 1 prompt (2 rows) fits
        {"kind": "generation", "event": "oom_backoff", "stage": "reflection", "batch": 0, "old_size": 4, "new_size": 2},
    ]
    assert any(len(record["output"]) > 1 for record in records)  # reflections and second trials ran too
    assert manifest["stages"]["02_reflect"]["status"] == "done"
    # greedy first trials are the same text in smaller batches; every question and reflection has its record
    assert [r["output"][0]["reasoning"] for r in records] == [r["output"][0]["reasoning"] for r in plain]
    keys = [[(o["instruction"], o["sample"]) for o in r["output"]] for r in records]
    assert keys == [[(o["instruction"], o["sample"]) for o in r["output"]] for r in plain]
