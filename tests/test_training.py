"""Stages 03 and 04 really train the tiny model on CPU: the trained tokens are exactly the completion
and the chat template's end of turn, no training input holds its target, rows that cannot teach their
phase are dropped and counted (a stage never stops on them), the phases of a variant hold out the same
questions, SFT lowers the held-out loss,
DPO raises the reward accuracy and margin, a killed run resumes to the same adapter, two processes
train one model, DPO from an SFT variant uses that model as its reference, and bad set-ups stop
before any model loads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import clone_run, official_data_dir, skip_or_fail

from reflectevo import errors, prompts
from reflectevo.errors import ReflectEvoError
from reflectevo.reflection import curation, exports
from reflectevo.reflection import released as released_data
from reflectevo.runs.plan import read_manifest
from reflectevo.tasks import get_task
from reflectevo.training import adapters
from reflectevo.training import datasets as training_sets
from reflectevo.training import stage as training_stage
from reflectevo.training import trainer as training_trainer

pytest.importorskip("trl")

BIN = Path(sys.executable).parent
SFT = {
    "modes": ["one_stage"],
    "per_device_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-3,
    "max_length": 512,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "report_to": [],
}
DPO = {
    "pairs": ["d_pm"],
    "per_device_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_length": 512,
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "report_to": [],
}


def lora_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def phase_metrics(params, stage_folder: str, variant: str, phase: int = 0) -> dict:
    return json.loads((params.run_dir / stage_folder / variant / "metrics.json").read_text())["phases"][phase][
        "metrics"
    ]


# ---- what is trained ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_params(smoke_reflect_run, tmp_path_factory):
    return clone_run(smoke_reflect_run, tmp_path_factory.mktemp("labels"), "labels")


@pytest.mark.parametrize("name", ["sft_one_stage", "sft_reflection", "sft_correction", "sft_qa_pairs"])
def test_sft_labels_are_the_completion_and_the_end_of_turn(smoke_params, tmp_path, name):
    """The trainer our stage builds computes its loss on exactly the completion + the template's end of turn."""
    dataset = training_sets.load_training_set(training_sets.datasets_dir(smoke_params), name)
    loaded = adapters.prepare_model(smoke_params.model, smoke_params.sft.lora, False, seed=0)
    args = training_trainer.training_arguments(
        "sft", smoke_params.sft, tmp_path, seed=0, device="cpu", dtype="float32", has_eval=False
    )
    trainer = training_trainer.make_trainer("sft", loaded, args, dataset, {})
    eot = training_sets.end_of_turn(loaded.tokenizer)
    assert eot == "<|end|>\n"  # the tiny model's template: both tokens are learned
    for index in range(min(3, len(dataset))):
        labels = [label for label in trainer.train_dataset[index]["labels"] if label != -100]
        assert loaded.tokenizer.decode(labels) == dataset[index]["completion"][0]["content"] + eot
        prompt_ids = trainer.train_dataset[index]["input_ids"][
            : len(trainer.train_dataset[index]["input_ids"]) - len(labels)
        ]
        context, _ = training_sets.trained_text(
            loaded.tokenizer, dataset[index]["prompt"], dataset[index]["completion"]
        )
        assert loaded.tokenizer.decode(prompt_ids) == context  # the model's own chat template, unchanged


def test_the_one_stage_target_is_reflection_answer_and_attempt(smoke_params):
    from reflectevo.prompts import split_one_stage

    dataset = training_sets.load_training_set(training_sets.datasets_dir(smoke_params), "sft_one_stage")
    for row in dataset:
        reflection, attempt = split_one_stage(row["completion"][0]["content"])
        assert reflection and attempt.startswith("Thought:") and "\nAction:" in attempt
        assert "After the reflection, answer the question again" in row["prompt"][0]["content"]


def test_no_training_input_contains_its_target(smoke_params):
    for name in ("sft_one_stage", "sft_reflection", "sft_correction", "sft_qa_pairs", "dpo_d_pm", "dpo_d_pref"):
        dataset = training_sets.load_training_set(training_sets.datasets_dir(smoke_params), name)
        assert training_sets.target_leaks(dataset, training_sets.set_kind(name)) == [], name


def test_released_correction_rows_are_rebuilt_without_the_leaked_target():
    path = official_data_dir() / "examples" / "example_D+.jsonl"
    if not path.is_file():
        skip_or_fail(f"released ReflectEvo example file not found: {path}")
    released = released_data.load_released(path)
    # the stored trial-2 prompt holds the finished second trial: the check catches it
    leaking = exports.to_trl_dataset(
        [
            {
                "task": row["task"],
                "id": row["id"],
                "prompt": row["reason_prompt"][1],
                "completion": row["second_trial_attempt"],
            }
            for row in released
        ]
    )
    assert training_sets.target_leaks(leaking, "correction") == list(range(len(released)))
    rebuilt = exports.to_trl_dataset(exports.training_rows("correction", released))
    assert len(rebuilt) == len(released) and training_sets.target_leaks(rebuilt, "correction") == []
    assert training_sets.screen_rows(rebuilt, "correction").kept == list(range(len(released)))


# ---- rows that cannot teach their phase ----------------------------------------------------------------
LOGIQA_WRONG = (
    "Thought: Tomas did not attend the review session, but that does not stop him from passing, "
    "so he passed the exam.\nAction: Finish[A]"
)
LOGIQA_RIGHT = (
    "Thought: Everyone who passed attended the review session and Tomas did not attend it, "
    "so Tomas did not pass the exam.\nAction: Finish[B]"
)
SQUARE = "Thought: The square of a number is the number multiplied by itself.\nAction: [BEGIN]\ndef square(n):\n    return n * n\n[END]"
TIMED_OUT = "Execution timed out after 10 seconds.\nAnswer is INCORRECT"


def raw_record(task_name: str, first: tuple[str, str, str], seconds: list[tuple[str, str, str]]) -> dict:
    """A raw record as stage 02 writes it: the failed first trial (text, outcome, feedback), then one
    (reflection, second-trial text, outcome) per reflection, each second trial prompted with the
    reflection and the failed attempt (reflect.second_trial's default)."""
    task = get_task(task_name)
    item = task.load_samples("train")[0]
    text, outcome, feedback = first

    def trial(number, key, reasoning, result, observation, reflection=None, sample=None):
        return {
            "trial": number,
            "key": key,
            "instruction": None if reflection is None else "1-3-2",
            "sample": sample,
            "reasoning": reasoning,
            "scratchpad": prompts.failed_trial(reasoning, observation),
            "generated_answer": "B",
            "is_correct": result == "correct",
            "outcome": result,
            "feedback": observation,
            "reflections": [] if reflection is None else [reflection],
            "reason_input": (
                prompts.attempt_prompt(task, item)
                if reflection is None
                else prompts.second_trial_prompt(task, item, reflection, previous=(text, feedback))
            ),
            "reflection_input": None,
        }

    outputs = [trial(1, f"{task_name}/{item.id}/t1", text, outcome, feedback)]
    for sample, (reflection, second, result) in enumerate(seconds):
        outputs.append(
            trial(
                2,
                f"{task_name}/{item.id}/1-3-2/{sample}",
                second,
                result,
                "Answer is CORRECT" if result == "correct" else "Answer is INCORRECT",
                reflection,
                sample,
            )
        )
    return {"task": task_name, "id": item.id, "question": item.question, "answer": item.gold, "output": outputs}


def screened(records: list[dict], kind: str) -> tuple:
    """(screening, dataset) of the training rows of ``kind`` built from ``records`` as stage 02 builds them."""
    source = curation.build_d_pm(records) if kind == "dpo" else curation.build_d_plus(records)
    dataset = exports.to_trl_dataset(exports.training_rows(kind, source))
    return training_sets.screen_rows(dataset, kind), dataset


def reasons(screening: training_sets.RowScreening) -> list[str | None]:
    """The drop reason of each row, in row order (None: kept)."""
    by_row: list[str | None] = [None] * screening.rows
    for reason, indices in screening.dropped.items():
        for index in indices:
            by_row[index] = reason
    return by_row


def test_short_and_quoting_reflections_and_a_retried_time_out_are_not_leaks():
    thought_line = LOGIQA_WRONG.splitlines()[0]
    logiqa = raw_record(
        "logiqa",
        (LOGIQA_WRONG, "wrong", "Answer is INCORRECT"),
        [
            (".", LOGIQA_RIGHT, "correct"),  # a reflection of "." that still led to the right answer
            (thought_line, LOGIQA_RIGHT, "correct"),  # a reflection that copies the failed attempt's Thought line
            (
                "I assumed passing was possible without the review; the first sentence rules that out.",
                LOGIQA_RIGHT,
                "correct",
            ),
        ],
    )
    mbpp = raw_record(
        "mbpp",
        (SQUARE, "timeout", TIMED_OUT),
        [
            ("The code is right; the run timed out, so submit the same function again.", SQUARE, "correct"),
        ],
    )
    records = [logiqa, mbpp]
    screening, _ = screened(records, "reflection")
    assert reasons(screening) == [None, "copies_prompt", None, None]
    screening, _ = screened(records, "one_stage")  # the reflection part, then the attempt part after "Answer:"
    assert reasons(screening) == [None, "copies_prompt", None, "copies_prompt"]
    screening, dataset = screened(records, "correction")
    assert SQUARE in dataset[3]["prompt"][0]["content"] and dataset[3]["completion"][0]["content"] == SQUARE
    assert reasons(screening) == [None, None, None, "copies_prompt"]  # the retry repeats the attempt it was shown
    assert screening.counts() == {
        "empty_target": 0,
        "target_in_prompt": 0,
        "copies_prompt": 1,
        "chosen_equals_rejected": 0,
    }
    assert screening.examples == {"copies_prompt": [["mbpp", mbpp["id"]]]}
    for kind in ("reflection", "one_stage", "correction"):
        assert training_sets.target_leaks(screened(records, kind)[1], kind) == [], kind


def test_the_corrected_attempt_pasted_into_its_prompt_is_a_leak():
    record = raw_record(
        "logiqa",
        (LOGIQA_WRONG, "wrong", "Answer is INCORRECT"),
        [
            (
                "I assumed passing was possible without the review; the first sentence rules that out.",
                LOGIQA_RIGHT,
                "correct",
            ),
            ("Read the first sentence again: it says who passed.", LOGIQA_RIGHT, "correct"),
        ],
    )
    # the second trial's stored prompt rendered after the trial finished, as the released data did
    finished = record["output"][2]
    finished["reason_input"] += "\n" + prompts.failed_trial(LOGIQA_RIGHT, "Answer is CORRECT")
    screening, dataset = screened([record], "correction")
    assert reasons(screening) == [None, "target_in_prompt"]
    assert training_sets.target_leaks(dataset, "correction") == [1]
    # the same text with its whitespace changed is still the same answer
    spaced = [
        {
            "task": "logiqa",
            "id": record["id"],
            "prompt": dataset[1]["prompt"][0]["content"].replace(" so ", "  so\n"),
            "completion": LOGIQA_RIGHT,
        }
    ]
    assert training_sets.target_leaks(exports.to_trl_dataset(spaced), "correction") == [0]
    # a one-stage prompt that holds its own corrected attempt leaks it too, and a QA pair whose gold answer is in its prompt
    rows = exports.training_rows("one_stage", curation.build_d_plus([record]))
    rows[0]["prompt"] += f"\n\nA correct attempt:\n{LOGIQA_RIGHT}"
    assert training_sets.target_leaks(exports.to_trl_dataset(rows), "one_stage") == [0]
    items = get_task("logiqa").load_samples("train")[:2]
    pairs = exports.qa_pair_rows({"logiqa": items})
    pairs[1]["prompt"] = pairs[1]["prompt"].replace("Question:", f"Example:\n{pairs[1]['completion']}\n\nQuestion:")
    assert training_sets.target_leaks(exports.to_trl_dataset(pairs), "qa_pairs") == [1]
    short = [{"task": "logiqa", "id": "x", "prompt": "Answer with Finish[B] or Finish[C].", "completion": "Finish[B]"}]
    assert training_sets.target_leaks(exports.to_trl_dataset(short), "correction") == []  # shorter than MIN_LEAK_CHARS


def test_preference_pairs_are_dropped_only_when_they_cannot_teach_a_preference():
    thought_line = LOGIQA_WRONG.splitlines()[0]
    record = raw_record(
        "logiqa",
        (LOGIQA_WRONG, "wrong", "Answer is INCORRECT"),
        [
            ("The first sentence says who passed; apply it to Tomas.", LOGIQA_RIGHT, "correct"),
            (thought_line, LOGIQA_RIGHT, "correct"),
            ("Read the first sentence again: it says who passed.", LOGIQA_WRONG, "wrong"),
            (thought_line, LOGIQA_WRONG, "wrong"),
            ("The first sentence says who passed; apply it to Tomas.", LOGIQA_WRONG, "wrong"),
        ],
    )
    screening, _ = screened([record], "dpo")  # chosen in output order, then rejected in output order
    assert reasons(screening) == [
        None,
        None,
        "chosen_equals_rejected",  # a rejected copy is a fair thing to push down
        "copies_prompt",
        "copies_prompt",
        "copies_prompt",
    ]


def test_the_shown_attempt_is_found_in_every_prompt_that_shows_one():
    """The rule takes the failed attempt out of the prompt by the templates' wording: if they change, this fails."""
    task = get_task("mbpp")
    item = task.load_samples("train")[0]
    shown = [
        prompts.reflection_prompt(item, SQUARE, TIMED_OUT, prompts.GENERIC_INSTRUCTION),
        prompts.one_stage_prompt(task, item, SQUARE, TIMED_OUT, prompts.GENERIC_INSTRUCTION),
        prompts.second_trial_prompt(task, item, "Run it again.", previous=(SQUARE, TIMED_OUT)),
    ]
    for prompt in shown:
        assert training_sets.SHOWN_ATTEMPT.findall(prompt) == [SQUARE], prompt
    assert training_sets.SHOWN_ATTEMPT.findall(prompts.second_trial_prompt(task, item, "Run it again.")) == []


def plain_rows(dataset) -> list[dict]:
    """A saved training set's rows with each message list as its text, as exports.to_trl_dataset takes them."""
    return [
        {key: value[0]["content"] if isinstance(value, list) else value for key, value in row.items()}
        for row in dataset
    ]


def replace_set(params, name: str, rows: list[dict]) -> None:
    import shutil

    folder = training_sets.datasets_dir(params) / name
    shutil.rmtree(folder)
    exports.to_trl_dataset(rows).save_to_disk(str(folder), num_shards=1)


def test_the_phases_of_a_variant_hold_out_the_same_questions():
    def rows(keys, completion):
        return exports.to_trl_dataset(
            [{"task": task, "id": item, "prompt": f"Question {item}?", "completion": completion} for task, item in keys]
        )

    shared = [("logiqa", f"q{n}") for n in range(10)]
    reflection = rows(shared * 2, "I misread the second premise.")  # two reflections per question
    correction = rows([*shared, ("math", "only-in-correction")], "Thought: the premise excludes A.\nAction: Finish[B]")
    held = training_sets.heldout_questions([reflection, correction], 0.3, seed=7)
    assert len(held) == 3 and held == sorted(held) and ("math", "only-in-correction") not in held
    assert (
        training_sets.heldout_questions([correction, reflection], 0.3, seed=7) == held
    )  # whatever the order of the phases
    for dataset in (reflection, correction):
        train, heldout = training_sets.split_off(dataset, held)
        assert set(zip(heldout["task"], heldout["id"])) == set(held)
        assert not set(zip(train["task"], train["id"])) & set(held) and len(train) + len(heldout) == len(dataset)
    assert any(training_sets.heldout_questions([reflection, correction], 0.3, seed=seed) != held for seed in (8, 9, 10))
    assert training_sets.heldout_questions([reflection, correction], 0.0, seed=7) == []
    assert training_sets.split_off(reflection, []) == (reflection, None)


def test_a_variant_whose_every_row_is_dropped_is_skipped_and_recorded(smoke_reflect_run, tmp_path):
    params = clone_run(smoke_reflect_run, tmp_path, "all-dropped", {"sft": {**SFT, "modes": ["two_stage"]}})
    rows = plain_rows(training_sets.load_training_set(training_sets.datasets_dir(params), "sft_correction"))
    replace_set(params, "sft_correction", [{**row, "completion": " \n"} for row in rows])
    assert training_stage.training_plan(params, "03_sft") == [
        {"variant": "two_stage", "skipped": training_sets.variants_without_data(params, "03_sft")["two_stage"]}
    ]
    summary = training_stage.run_sft(params)
    assert summary.trained == [] and summary.results == [] and summary.figures == []
    assert re.match(
        r"every row of training set sft_correction is dropped: \d+ empty_target", summary.skipped["two_stage"]
    )
    entry = read_manifest(params.run_dir)["stages"]["03_sft"]
    assert entry["status"] == "done" and entry["skipped"] == summary.skipped and entry["training"] == {}
    assert not (params.run_dir / "sft" / "two_stage").exists()  # nothing half-written where an adapter would be


def test_questions_are_held_out_whole(smoke_params):
    dataset = training_sets.load_training_set(training_sets.datasets_dir(smoke_params), "sft_qa_pairs")
    train, heldout = training_sets.split_by_question(dataset, 0.25, seed=3)

    def keys(d):
        return {(t, i) for t, i in zip(d["task"], d["id"], strict=True)}

    assert len(train) + len(heldout) == len(dataset) and not keys(train) & keys(heldout)
    assert len(keys(heldout)) == round(0.25 * len(keys(dataset)))
    assert training_sets.split_by_question(dataset, 0.0, seed=3)[1] is None
    assert (
        training_sets.split_by_question(dataset.select([0]), 0.5, seed=3)[1] is None
    )  # one question: nothing held out


# ---- learning ----------------------------------------------------------------------------------------
def test_sft_lowers_the_held_out_loss(smoke_reflect_run, tmp_path):
    params = clone_run(
        smoke_reflect_run,
        tmp_path,
        "sft-learns",
        {"sft": {**SFT, "max_steps": 16, "save_steps": 8, "eval_fraction": 0.3}},
    )
    summary = training_stage.run_sft(params)
    metrics = phase_metrics(params, "sft", "one_stage")
    loss = metrics["evaluation"]["heldout_loss"]
    print(
        f"held-out loss of one_stage: {loss['before']:.4f} -> {loss['after']:.4f}; {metrics['tokens_per_s']} tokens/s"
    )
    assert metrics["rows"]["heldout"] > 0 and metrics["steps"] == 16
    assert loss["after"] < loss["before"]
    entry = read_manifest(params.run_dir)["stages"]["03_sft"]
    assert entry["status"] == "done" and entry["training"]["one_stage/one_stage"]["evaluation"]["heldout_loss"] == loss
    assert (params.run_dir / "figures" / "03_sft_loss.png").stat().st_size > 10_000
    card = (params.run_dir / "sft" / "one_stage" / "adapter" / "README.md").read_text()
    assert "builtin:tiny" in card and params.section_hash(["run.seed", "model", "sft"])[:16] in card
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in (params.run_dir / "sft" / "one_stage" / "adapter").iterdir()
    }
    assert len(summary.table()) == 1
    assert list((params.run_dir / "sft" / "one_stage").glob("train-*/one_stage/runs/*/events.out.tfevents.*")) == []


def test_dpo_raises_the_reward_accuracy_and_margin(smoke_reflect_run, tmp_path):
    params = clone_run(
        smoke_reflect_run,
        tmp_path,
        "dpo-learns",
        {"dpo": {**DPO, "max_steps": 12, "learning_rate": 5e-4, "beta": 0.1, "report_to": ["tensorboard"]}},
    )
    training_stage.run_dpo(params)
    metrics = phase_metrics(params, "dpo", "d_pm")
    accuracy = metrics["evaluation"]["train_sample_rewards/accuracies"]
    margin = metrics["evaluation"]["train_sample_rewards/margins"]
    print(
        f"d_pm on {metrics['rows']['train']} training pairs: reward accuracy {accuracy['before']} -> {accuracy['after']}, "
        f"margin {margin['before']:.4f} -> {margin['after']:.4f}"
    )
    assert accuracy["before"] == 0.0 and margin["before"] == 0.0  # the policy starts equal to its reference
    assert accuracy["after"] > 0.5 and margin["after"] > margin["before"]
    history = json.loads((params.run_dir / "dpo" / "d_pm" / "metrics.json").read_text())["phases"][0]["log_history"]
    first = next(entry for entry in history if "rewards/chosen" in entry)
    assert abs(first["loss"] - 0.6931) < 1e-3  # ln 2 at the first step
    assert (params.run_dir / "figures" / "04_dpo_rewards.png").stat().st_size > 10_000
    assert list((params.run_dir / "dpo" / "d_pm").glob("train-*/d_pm/runs/*/events.out.tfevents.*"))  # tensorboard


# ---- checkpoints and resume --------------------------------------------------------------------------
KILLABLE = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from reflectevo.config import load_params
    from reflectevo.training.stage import run_dpo, run_sft

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)

    run = run_dpo if sys.argv[3] == "dpo" else run_sft
    run(load_params(sys.argv[1]), callbacks=(KillAt(),) if int(sys.argv[2]) else ())
""")


def write_params(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.to_dict()))
    return path


# kind: (params section, variant, steps, save every, killed at, newest complete checkpoint then)
KILLED_RUNS = {
    "sft": ({**SFT, "max_steps": 12, "save_steps": 4, "per_device_batch_size": 2}, "one_stage", 12, 6, "checkpoint-4"),
    # DPO's checkpoints also hold its reference adapter in ref/, which once hid the trained one on resume
    "dpo": ({**DPO, "max_steps": 6, "save_steps": 2, "learning_rate": 5e-4}, "d_pm", 6, 3, "checkpoint-2"),
}


# SFT killed mid-run is covered by tests/test_faults.py (stage 03, killed at drawn points, compared with an
# uninterrupted run); DPO is kept here for its reference adapter, which once hid the trained one on resume.
@pytest.mark.parametrize("kind", ["dpo"])
def test_a_killed_run_resumes_to_the_same_adapter(smoke_reflect_run, tmp_path, kind):
    section, variant, steps, kill, newest = KILLED_RUNS[kind]
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    runs = {}
    for name, kill_at in (("straight", 0), ("killed", kill)):
        params = clone_run(smoke_reflect_run, tmp_path, name, {kind: section})
        file = write_params(params, tmp_path / f"{name}.yaml")
        result = subprocess.run(
            [sys.executable, str(script), str(file), str(kill_at), kind],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if kill_at:  # SIGKILLed after step `kill`: the steps after the newest checkpoint are lost
            assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
            phase = next((params.run_dir / kind / variant).glob(f"train-*/{variant}"))
            assert sorted(p.name for p in phase.glob("checkpoint-*")) == [newest]
            assert not (params.run_dir / kind / variant / "adapter").exists()
            result = subprocess.run(
                [sys.executable, str(script), str(file), "0", kind],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = params
    straight, killed = (phase_metrics(runs[n], kind, variant) for n in ("straight", "killed"))
    assert straight["resumed_from"] is None and killed["resumed_from"] == newest
    assert straight["steps"] == killed["steps"] == steps and straight["tokens"] == killed["tokens"]
    difference = max_difference(*(lora_tensors(runs[n].run_dir / kind / variant / "adapter") for n in runs))
    print(f"{kind}: killed at step {kill}, resumed from {newest}: max |difference| of the LoRA weights = {difference}")
    assert difference == 0.0  # CPU, fp32: bit-equal, so no skipped or repeated batch can hide in a tolerance
    assert killed["adapter_sha256_of_tensors"] == straight["adapter_sha256_of_tensors"]
    assert killed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)  # the same whether resumed or not
    for key, value in straight["evaluation"].items():  # evaluations agree to ~1e-5 between processes (README)
        assert killed["evaluation"][key]["after"] == pytest.approx(value["after"], rel=1e-4, abs=1e-5), key


def test_an_incomplete_checkpoint_is_not_resumed_from(tmp_path):
    for step, files in ((2, training_trainer.CHECKPOINT_FILES), (4, ("optimizer.pt",))):  # killed while saving step 4
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("x")
    assert training_trainer.last_complete_checkpoint(tmp_path, main=True) == tmp_path / "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()
    assert training_trainer.last_complete_checkpoint(tmp_path / "checkpoint-2", main=True) is None


# ---- several processes -------------------------------------------------------------------------------
def test_two_processes_train_one_model(smoke_reflect_run, tmp_path):
    """accelerate launch, 2 CPU processes: world size 2 in both, different batches, bit-equal weights."""
    params = clone_run(
        smoke_reflect_run,
        tmp_path,
        "ddp",
        {"sft": {**SFT, "max_steps": 6, "save_steps": 3, "per_device_batch_size": 2}},
    )
    file = write_params(params, tmp_path / "ddp.yaml")
    command = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "reflectevo",
        "train",
        "sft",
        str(file),
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    phase = next((params.run_dir / "sft" / "one_stage").glob("train-*/one_stage"))
    ranks = [json.loads((phase / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert all(r["distributed_type"].endswith("MULTI_CPU") and r["backend"] == "gloo" for r in ranks)
    # each rank draws its own batches (a rank that trained alone on all the data would draw the same ones); one
    # batch may coincide, because the distributed sampler pads a set that does not divide evenly with repeated
    # rows, and how many rows the stand-in's reflections gave the set differs from build to build
    assert len(ranks[0]["first_batches"]) == 4 and set(ranks[0]["first_batches"]) != set(ranks[1]["first_batches"])
    assert len(set(ranks[0]["first_batches"]) & set(ranks[1]["first_batches"])) <= 1
    assert ranks[0]["adapter_sha256_of_tensors"] == ranks[1]["adapter_sha256_of_tensors"]
    saved = lora_tensors(params.run_dir / "sft" / "one_stage" / "adapter")
    assert saved and read_manifest(params.run_dir)["stages"]["03_sft"]["status"] == "done"  # written once, by rank 0
    assert phase_metrics(params, "sft", "one_stage")["world_size"] == 2


# ---- DPO from an SFT variant ---------------------------------------------------------------------------
def test_dpo_from_an_sft_variant_has_that_model_as_its_reference(smoke_reflect_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from reflectevo.models.builtin.tiny import tiny_model_dir

    params = clone_run(
        smoke_reflect_run,
        tmp_path,
        "sft-then-dpo",
        {
            "sft": {**SFT, "max_steps": 6, "save_merged": True},
            "dpo": {**DPO, "max_steps": 2, "start_from": "one_stage", "learning_rate": 1e-4},
        },
    )
    with pytest.raises(ReflectEvoError, match="03_sft"):  # DPO from SFT needs stage 03 first
        training_stage.run_dpo(params)
    training_stage.run_sft(params)
    training_stage.run_dpo(params)
    manifest = read_manifest(params.run_dir)["stages"]
    merged = next((params.run_dir / "dpo" / "start").glob("one_stage-*"))
    assert merged.name == f"one_stage-{manifest['03_sft']['identity'][:12]}"
    assert str(merged) in manifest["04_dpo"]["base_model"]

    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir())
    with torch.no_grad():
        base_logits = base(ids).logits
        sft = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir()),
            str(params.run_dir / "sft" / "one_stage" / "adapter"),
        )
        sft_logits = sft(ids).logits
        dpo = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(merged), str(params.run_dir / "dpo" / "d_pm" / "adapter")
        )
        with dpo.disable_adapter():
            reference_logits = dpo(ids).logits
        saved_merged = AutoModelForCausalLM.from_pretrained(params.run_dir / "sft" / "one_stage" / "merged")(ids).logits
    print(
        f"reference vs SFT model: {(reference_logits - sft_logits).abs().max().item():.2e}; "
        f"SFT vs base: {(sft_logits - base_logits).abs().max().item():.2e}"
    )
    assert torch.allclose(reference_logits, sft_logits, atol=1e-4)  # the reference is the SFT model ...
    assert not torch.allclose(sft_logits, base_logits, atol=1e-3)  # ... which is not the base
    assert torch.allclose(saved_merged, sft_logits, atol=1e-4)  # sft.save_merged wrote the same model


# ---- bad set-ups -----------------------------------------------------------------------------------------
def test_an_empty_training_set_skips_its_variant_and_the_others_train(smoke_reflect_run, tmp_path):
    from reflectevo.evaluation.variants import finished_variants, skipped_variants

    params = clone_run(smoke_reflect_run, tmp_path, "empty", {"sft": {**SFT, "modes": ["one_stage", "qa_pairs"]}})
    folder = training_sets.datasets_dir(params) / "sft_qa_pairs"
    import shutil

    shutil.rmtree(folder)
    exports.empty_training_set("qa_pairs").save_to_disk(str(folder), num_shards=1)
    summary = training_stage.run_sft(params)
    assert summary.trained == ["one_stage"] and list(summary.skipped) == ["qa_pairs"]
    assert summary.skipped["qa_pairs"].startswith("training set sft_qa_pairs is empty")
    manifest = read_manifest(params.run_dir)
    assert (params.run_dir / "sft" / "one_stage" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (params.run_dir / "sft" / "qa_pairs").exists()
    # stage 05 evaluates what was trained and leaves out what was skipped, saying why
    assert finished_variants(params, manifest) == ["sft/one_stage"]
    assert list(skipped_variants(manifest)) == ["sft/qa_pairs"]
    shutil.rmtree(folder)
    with pytest.raises(errors.TrainingError, match="sft_qa_pairs not found.*run stage 02"):
        training_stage.run_sft(params)


def test_a_logger_that_is_not_installed_is_refused(smoke_reflect_run, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    params = clone_run(smoke_reflect_run, tmp_path, "wandb", {"sft": {**SFT, "report_to": ["wandb"]}})
    with pytest.raises(errors.TrainingError, match="wandb, which is not installed"):
        training_stage.run_sft(params)


def test_dpo_from_a_mode_that_sft_does_not_train_is_a_params_error():
    from reflectevo.config import load_params
    from reflectevo.errors import ConfigError

    with pytest.raises(ConfigError, match="dpo.start_from is 'two_stage'"):
        load_params(None, {"sft": {"modes": ["one_stage"]}, "dpo": {"start_from": "two_stage"}})


# ---- launchers -----------------------------------------------------------------------------------------
def test_each_process_loads_the_model_onto_its_own_gpu(monkeypatch):
    from reflectevo.models.loading import device_map

    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device_map("cpu") is None
    assert device_map("cuda") == {"": 3}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # DeepSpeed places and shards the weights itself ...
    assert device_map("cuda") is None
    assert device_map("cuda", four_bit=True) == {"": 3}  # ... except 4-bit weights, which load onto a GPU


@pytest.mark.parametrize("name", ["multi_gpu", "deepspeed_zero3", "fsdp"])
def test_the_shipped_launcher_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(
        {"multi_gpu": "MULTI_GPU", "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP"}[name]
    )
    assert config.num_processes > 1 and not config.use_cpu


def test_precomputed_reference_log_probs_train_the_same_adapter(smoke_reflect_run, tmp_path):
    adapters = {}
    for precompute in (False, True):
        params = clone_run(
            smoke_reflect_run,
            tmp_path,
            f"precompute-{precompute}",
            {
                "dpo": {
                    **DPO,
                    "pairs": ["d_pref"],
                    "max_steps": 3,
                    "learning_rate": 5e-4,
                    "precompute_ref_log_probs": precompute,
                }
            },
        )
        training_stage.run_dpo(params)
        adapters[precompute] = lora_tensors(params.run_dir / "dpo" / "d_pref" / "adapter")
    difference = max_difference(adapters[False], adapters[True])
    print(f"DPO with and without precomputed reference log-probs: max |difference| {difference:.2e}")
    assert difference < 1e-5


def test_dpo_prompts_longer_than_max_length_stop_before_training(smoke_reflect_run, tmp_path):
    params = clone_run(smoke_reflect_run, tmp_path, "too-long", {"dpo": {**DPO, "max_length": 32, "max_steps": 2}})
    with pytest.raises(errors.TrainingError, match=r"every prompt of dpo_d_pm is at least dpo.max_length \(32\)"):
        training_stage.run_dpo(params)
    assert read_manifest(params.run_dir)["stages"]["04_dpo"]["status"] == "failed"  # said so in the manifest
    assert not list((params.run_dir / "dpo" / "d_pm").glob("train-*/d_pm/checkpoint-*"))


def test_dpo_from_an_sft_variant_depends_on_stage_03():
    from reflectevo.config import load_params
    from reflectevo.runs.plan import depends_on, identity_of
    from reflectevo.runs.stages import get_stage

    dpo = get_stage("04_dpo")
    from_base = load_params(None, {"sft": {"modes": ["one_stage"]}})
    from_sft = load_params(None, {"sft": {"modes": ["one_stage"]}, "dpo": {"start_from": "one_stage"}})
    assert depends_on(dpo, from_base) == ("02",) and depends_on(dpo, from_sft) == ("02", "03")
    upstream = {"02_reflect": "a", "03_sft": "b"}
    assert identity_of(from_sft, dpo, upstream) != identity_of(from_sft, dpo, {**upstream, "03_sft": "c"})


def test_a_stage_drops_and_counts_what_cannot_teach_and_keeps_the_reflection_adapter(smoke_reflect_run, tmp_path):
    """Rows shaped like a real model's output join the smoke run's two-stage sets: a reflection of ".", one
    that is the failed attempt's Thought line, a second trial identical to the failed attempt it was shown,
    and a real leak (the corrected attempt pasted into its prompt). The stage trains, drops and counts."""
    from reflectevo.reflection.pipeline import RECORDS_FILE

    params = clone_run(
        smoke_reflect_run,
        tmp_path,
        "screened",
        {"sft": {**SFT, "modes": ["two_stage"], "max_steps": 2, "eval_fraction": 0.3}},
    )
    folder = training_sets.datasets_dir(params)
    records = {(r["task"], r["id"]): r for r in curation.read_records(params.run_dir / "reflect" / RECORDS_FILE)}
    reflection = plain_rows(training_sets.load_training_set(folder, "sft_reflection"))
    correction = plain_rows(training_sets.load_training_set(folder, "sft_correction"))
    before = {
        name: training_sets.screen_rows(training_sets.load_training_set(folder, name), kind)
        for name, kind in (("sft_reflection", "reflection"), ("sft_correction", "correction"))
    }
    failed = records[(reflection[0]["task"], reflection[0]["id"])]["output"][0]["reasoning"]
    replace_set(
        params,
        "sft_reflection",
        [*reflection, {**reflection[0], "completion": "."}, {**reflection[0], "completion": failed.splitlines()[0]}],
    )
    shown = records[(correction[0]["task"], correction[0]["id"])]["output"][0]["reasoning"]
    assert (
        shown.strip() in correction[0]["prompt"]
    )  # the second trial is shown the failed attempt (reflect.second_trial)
    assert len(" ".join(correction[0]["completion"].split())) >= training_sets.MIN_LEAK_CHARS
    replace_set(
        params,
        "sft_correction",
        [
            *correction,
            {**correction[0], "completion": shown},
            {**correction[0], "prompt": f"{correction[0]['prompt']}\n\n{correction[0]['completion']}"},
        ],
    )

    summary = training_stage.run_sft(params)
    reflection_metrics, correction_metrics = (phase_metrics(params, "sft", "two_stage", index) for index in (0, 1))
    print(
        f"two_stage: reflection rows {reflection_metrics['rows']}, dropped {reflection_metrics['rows_dropped']}; "
        f"correction rows {correction_metrics['rows']}, dropped {correction_metrics['rows_dropped']}; "
        f"{reflection_metrics['heldout_questions']['count']} questions held out of both"
    )
    expected = before["sft_reflection"].counts()
    expected["copies_prompt"] += 1
    assert reflection_metrics["rows_dropped"] == expected
    assert reflection_metrics["rows"]["kept"] == len(before["sft_reflection"].kept) + 1  # "." trains
    expected = before["sft_correction"].counts()
    expected["copies_prompt"] += 1
    expected["target_in_prompt"] += 1
    assert correction_metrics["rows_dropped"] == expected
    assert [correction[0]["task"], correction[0]["id"]] in correction_metrics["rows_dropped_examples"][
        "target_in_prompt"
    ]
    table = summary.table()
    assert list(table["dropped: target_in_prompt"]) == [
        0,
        expected["target_in_prompt"],
    ]  # a reflection gives no answer away
    assert list(table["dropped: copies_prompt"]) == [
        reflection_metrics["rows_dropped"]["copies_prompt"],
        expected["copies_prompt"],
    ]

    # one held-out draw for the variant: both phases hold out the same questions and train on none of them
    held = reflection_metrics["heldout_questions"]
    assert held == correction_metrics["heldout_questions"] and held["count"] == len(held["keys"]) > 0
    assert held["drawn_from"] == ["sft_reflection", "sft_correction"]
    for metrics, name in ((reflection_metrics, "sft_reflection"), (correction_metrics, "sft_correction")):
        kept, _ = training_sets.screened_set(params, name)
        keys = [[task, item] for task, item in zip(kept["task"], kept["id"])]
        assert metrics["rows"]["heldout"] == sum(key in held["keys"] for key in keys) > 0
        assert metrics["rows"]["train"] == len(keys) - metrics["rows"]["heldout"]

    manifest = read_manifest(params.run_dir)["stages"]["03_sft"]
    assert manifest["training"]["two_stage/correction"]["rows_dropped"] == expected
    assert manifest["training"]["two_stage/reflection"]["heldout_questions"]["sha256"] == held["sha256"]
    # the reflection phase's adapter stays in a stable place beside the final one, recorded with its files
    variant = params.run_dir / "sft" / "two_stage"
    assert json.loads((variant / "metrics.json").read_text())["adapters"] == {
        "reflection": "reflection_adapter",
        "correction": "adapter",
    }
    phase = next(variant.glob("train-*/reflection/adapter"))
    assert max_difference(lora_tensors(variant / "reflection_adapter"), lora_tensors(phase)) == 0.0
    assert max_difference(lora_tensors(variant / "reflection_adapter"), lora_tensors(variant / "adapter")) > 0.0
    assert "after phase reflection" in (variant / "reflection_adapter" / "README.md").read_text()
    assert "sft/two_stage/reflection_adapter/adapter_model.safetensors" in manifest["outputs"]
