"""The hostile corpus end to end: first trial -> grading -> reflection -> second trial -> curation.

Every hostile program of the sandbox tests is the model's answer to one MBPP question, in the
first trial and again in every second trial (served by the ``replay`` engine; the reflections are
scripted text). The run must grade every trial as failed, curate nothing (D+, D± and Dpref empty),
and leave the host as it was: canary file and host folder untouched, no connection to a loopback
server, the host's secret environment value nowhere in what the run wrote, no process left behind.

Like the containment tests of test_sandbox.py it needs an isolation layer; without one it skips
(a failure under REFLECTEVO_REQUIRE_FULL_TESTS=1). One sandbox batch per trial, 2 s time-outs.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

import pytest
from hostile_corpus import (
    LoopbackServer,
    all_pids,
    hostile_corpus,
    sandbox_processes,
    system_paths,
)

from reflectevo.config import load_params
from reflectevo.generation.engines import ReplayEngine
from reflectevo.reflection.curation import (
    build_d_plus,
    build_d_pm,
    build_d_pref,
    counts_table,
    plan_comparisons,
    read_records,
    write_curated,
)
from reflectevo.reflection.exports import save_training_datasets
from reflectevo.reflection.judges import make_judge
from reflectevo.reflection.pipeline import ReflectionPipeline, write_records
from reflectevo.sandbox.host import Sandbox
from reflectevo.tasks import SPLITS, check_code_execution, get_task

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "1-3-2"
SAMPLES = 2  # two second trials per question: Dpref would have a pair to judge if both passed
# What the sandbox reports for each program (as in test_sandbox.py); MBPP grades a time-out as
# "timeout" and every other failed run as "wrong".
EXPECTED_STATUS = {
    "infinite loop": {"timeout"},
    "SIGTERM ignored": {"timeout"},
    "fork bomb": {"timeout", "crashed", "error"},
    "memory hog": {"error"},
    "delete outside": {"error"},
    "rmtree outside": {"error"},
    "write outside": {"failed"},
    "open a socket": {"error"},
    "os._exit(0)": {"crashed"},
    "sys.exit(0)": {"failed"},
    "print 100 MB": {"output_limit"},
    "read secrets": {"failed"},
    "setsid daemon": {"failed"},
    "kill everything": {"crashed", "failed", "error"},
    "forge a pass": {"crashed"},
}


class CountingSandbox(Sandbox):
    """The sandbox, remembering the size of every batch it was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def run_many(self, jobs):
        self.batches.append(len(jobs))
        return super().run_many(jobs)


def model_answer(program: str) -> str:
    """The program as the model writes an MBPP answer, in the form the official extractor accepts."""
    return f"Thought: I will write the function.\nAction: {get_task('mbpp').render_answer(program)}"


def replay_rows(questions: dict[str, object], corpus: dict[str, str]) -> list[dict[str, object]]:
    """First trial, reflections and second trials of every question: the hostile program each time."""
    rows: list[dict[str, object]] = []
    for name, item in questions.items():
        answer = model_answer(corpus[name])
        rows.append({"key": f"mbpp/{item.id}/t1", "text": answer})
        for sample in range(SAMPLES):
            rows.append(
                {
                    "key": f"mbpp/{item.id}/{INSTRUCTION}",
                    "sample": sample,
                    "text": f"My code did not define the function the tests call. I will define it. ({sample})",
                }
            )
            rows.append({"key": f"mbpp/{item.id}/{INSTRUCTION}/{sample}", "text": answer})
    return rows


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def sandbox_temp_dirs() -> set[str]:
    return {path.name for path in Path(tempfile.gettempdir()).glob("reflectevo-sandbox-*")}


@pytest.fixture(scope="module")
def hostile_pipeline(isolated_sandbox, tmp_path_factory):
    """Run the pipeline and the curation once over the whole corpus, then look at the host."""
    out = tmp_path_factory.mktemp("hostile-pipeline")
    host_dir = tmp_path_factory.mktemp("host")
    canary = host_dir / "canary.txt"
    canary.write_text("keep me")
    secret = "s3cr3t-" + secrets.token_hex(8)
    os.environ["REFLECTEVO_TEST_SECRET"] = secret  # the host's environment holds a secret
    server = LoopbackServer()
    try:
        corpus = hostile_corpus(canary, host_dir, server.port)
        task = get_task("mbpp")
        items = [item for split in SPLITS for item in task.load_samples(split)]
        assert len({item.id for item in items}) >= len(corpus), "not enough distinct MBPP sample items"
        questions = dict(zip(corpus, items))
        params = load_params(
            REPO / "params" / "smoke.yaml",
            {
                "run": {"name": "hostile", "seed": 0, "output_dir": str(out / "outputs"), "allow_code_execution": True},
                "reflect": {
                    "fewshots": 0,
                    "instructions": [INSTRUCTION],
                    "samples_per_instruction": SAMPLES,
                    "max_new_tokens": 64,
                },
            },
        )
        check_code_execution(["mbpp"], allowed=params.run.allow_code_execution)
        sandbox = CountingSandbox(allow_code_execution=True, timeout_s=2.0, workers=isolated_sandbox.workers)
        engine = ReplayEngine(replay_rows(questions, corpus))
        temp_before, pids_before = sandbox_temp_dirs(), all_pids()
        result = ReflectionPipeline(params, engine, out / "generations", sandbox=sandbox).run(
            {"mbpp": list(questions.values())}
        )
        strays = sandbox_processes(pids_before)
        leftover_temp = sorted(sandbox_temp_dirs() - temp_before)
        server.close()

        raw = write_records(result.records, out / "raw.jsonl")
        records = read_records(raw)  # curate what was written, as the reflect stage does
        d_plus, d_pm = build_d_plus(records), build_d_pm(records)
        # the "self" judge over the replay engine: it holds no judge replies, so a request would fail
        judge_params = params.reflect.judge
        judge = make_judge(judge_params, engine=engine, seed=params.run.seed)
        d_pref = build_d_pref(
            records,
            judge,
            max_pairs_per_question=judge_params.max_pairs_per_question,
            both_orders=judge_params.both_orders,
            seed=params.run.seed,
        )
        curated = write_curated(out / "curated", d_plus, d_pm, d_pref.rows, d_pref.judgements)
        sizes = save_training_datasets(out / "training", d_plus, d_pm, d_pref.rows, {"mbpp": list(questions.values())})
        yield {
            "corpus": corpus,
            "questions": questions,
            "records": records,
            "sandbox": sandbox,
            "out": out,
            "d_plus": d_plus,
            "d_pm": d_pm,
            "d_pref": d_pref,
            "curated": curated,
            "sizes": sizes,
            "counts": counts_table(records, d_plus, d_pm, d_pref),
            "canary": canary,
            "host_dir": host_dir,
            "secret": secret,
            "connections": server.connections,
            "strays": strays,
            "leftover_temp": leftover_temp,
        }
    finally:
        server.close()
        del os.environ["REFLECTEVO_TEST_SECRET"]


def outputs_by_program(run) -> dict[str, list[dict]]:
    """Each program's trial outputs: the first trial, then its second trials."""
    by_id = {record["id"]: record for record in run["records"]}
    return {name: by_id[item.id]["output"] for name, item in run["questions"].items()}


def test_every_trial_of_every_hostile_program_is_graded_failed(hostile_pipeline):
    run = hostile_pipeline
    table = []
    for name, outputs in outputs_by_program(run).items():
        assert [output["trial"] for output in outputs] == [1] + [2] * SAMPLES, name
        for output in outputs:
            execution = output["verdict"]["details"]["execution"]
            where = f"{name}, trial {output['trial']}: {output['outcome']} ({execution['status']}: {execution['error'][:200]})"
            # the extractor took the program as code and the sandbox ran it: no parse failure hides anything
            assert output["generated_answer"].strip() == run["corpus"][name].strip(), where
            assert execution["isolation"] in ("userns", "rootns", "uid"), where
            assert not output["is_correct"] and output["outcome"] != "correct", where
            assert execution["status"] in EXPECTED_STATUS[name], where
            assert output["outcome"] == ("timeout" if execution["status"] == "timeout" else "wrong"), where
            assert output["feedback"].endswith("Answer is INCORRECT"), where
        table.append(
            f"{name:16} "
            + "  ".join(
                f"t{o['trial']}={o['outcome']}/{o['verdict']['details']['execution']['status']}" for o in outputs
            )
        )
    print("\n" + "\n".join(table))


def test_each_trial_is_one_sandbox_batch(hostile_pipeline):
    count = len(hostile_pipeline["corpus"])
    assert hostile_pipeline["sandbox"].batches == [count, count * SAMPLES]


def test_nothing_is_curated(hostile_pipeline):
    run = hostile_pipeline
    records = run["records"]
    assert run["d_plus"] == [] and run["d_pm"] == [] and run["d_pref"].rows == []
    assert (
        plan_comparisons(records) == [] and run["d_pref"].judgements == []
    )  # no candidate pair, the judge never asked
    assert sum(run["d_pref"].outcomes.values()) == 0
    for name in ("d_plus", "d_pm", "d_pref", "judgements"):
        assert run["curated"][name].read_text() == "", name
    assert run["sizes"] == {
        "sft_one_stage": 0,
        "sft_reflection": 0,
        "sft_correction": 0,
        "sft_qa_pairs": len(run["corpus"]),
        "dpo_d_pm": 0,
        "dpo_d_pref": 0,
    }
    total = run["counts"].loc["all"]
    assert total["questions"] == len(run["corpus"]) and total["first_correct"] == 0
    assert total["reflections"] == len(run["corpus"]) * SAMPLES and total["second_correct"] == 0
    assert total["d_plus"] == total["d_pm"] == total["d_pref"] == 0


def test_files_outside_the_sandbox_are_untouched(hostile_pipeline):
    assert hostile_pipeline["canary"].read_text() == "keep me"
    assert sorted(p.name for p in hostile_pipeline["host_dir"].iterdir()) == ["canary.txt"]
    for path in system_paths():
        assert not os.path.exists(path), path


def test_no_network(hostile_pipeline):
    assert hostile_pipeline["connections"] == 0
    for output in outputs_by_program(hostile_pipeline)["open a socket"]:
        error = output["verdict"]["details"]["execution"]["error"]
        assert "unreachable" in error or "refused" in error or "OSError" in error, error


def test_host_secret_is_in_nothing_the_run_wrote(hostile_pipeline):
    run = hostile_pipeline
    for output in outputs_by_program(run)["read secrets"]:
        assert "HOME" in output["verdict"]["details"]["execution"]["stdout"]  # it did print its environment
    secret = run["secret"].encode()
    written = files_under(run["out"])
    assert {"raw.jsonl", "d_plus.jsonl", "d_pm.jsonl", "d_pref.jsonl", "judgements.jsonl"} <= {p.name for p in written}
    assert any(path.suffix == ".arrow" for path in written)  # the training sets
    for path in written:
        assert secret not in path.read_bytes(), path
    assert run["secret"] not in json.dumps(run["records"])


def test_nothing_survives_the_run(hostile_pipeline):
    assert hostile_pipeline["strays"] == []
    assert hostile_pipeline["leftover_temp"] == []
    assert sandbox_processes(all_pids()) == []  # no zombie children now either
