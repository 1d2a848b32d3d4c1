"""The pipeline on a real instruct model: stages 01-03 of ``params/quickstart.yaml`` on builtin:smollm2-135m,
with one question per task and a few training steps (what CI can afford on every commit).

A real model rambles, stops early, skips the action line and carries its own system message. What must
hold whatever it writes: every record complete, every prompt the one the chat template renders, no
corrected answer inside a training input, labels ending with the template's end of turn, and a
variant without data skipped and recorded rather than crashing the stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reflectevo.config import load_params
from reflectevo.errors import NoTrainingData
from reflectevo.runs.plan import read_manifest

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def realmodel_run(smollm2_model_dir, tmp_path_factory):
    """``params/quickstart.yaml`` with 1 training question per task and 2 SFT steps, stages 01-03 run by
    ``reflectevo run``; returns the params of that run."""
    cwd = tmp_path_factory.mktemp("realmodel")
    recipe = yaml.safe_load((REPO / "params" / "quickstart.yaml").read_text())
    recipe["run"]["name"] = "realmodel"
    recipe["data"]["max_items"] = {"train": 1, "validation": 1, "test": 1}
    recipe["sft"].update(modes=["two_stage", "qa_pairs"], max_steps=2, eval_fraction=0.0)
    path = cwd / "realmodel.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [
        str(BIN / "reflectevo"),
        "run",
        str(path),
        "--stages",
        "01,02,03",
        "--notebooks",
        str(REPO / "notebooks"),
    ]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    params = load_params(path)
    params.run.output_dir = str(cwd / "outputs")
    return params


def raw_records(params) -> list[dict]:
    return [json.loads(line) for line in (params.run_dir / "reflect" / "raw.jsonl").read_text().splitlines()]


def test_every_record_is_complete(realmodel_run):
    params = realmodel_run
    records = raw_records(params)
    assert len(records) == len(params.data.tasks)  # every training question answered once
    per_question = params.reflect.instructions_k * params.reflect.samples_per_instruction
    for record in records:
        first, *second = record["output"]
        assert first["trial"] == 1 and first["outcome"] in ("correct", "wrong", "parse_failure", "timeout", "error")
        # two calls per attempt, the second pre-filled through the answer syntax: the attempt states an action
        assert len(first["generation"]["attempt"]) == 2 and "\nAction: " in first["reasoning"]
        assert record["attempt_prefill"] == "answer" and record["attempt_calls"] == 2
        assert len(second) == (per_question if not first["is_correct"] else 0)
        for output in second:
            assert output["trial"] == 2 and output["reflection_input"] and output["generation"]["reflection"]
            reason = output["generation"]["reflection"]["finish_reason"]
            assert reason in ("eos", "length")  # the end token stops generation; nothing else may end it
    counts = {row["task"]: row for row in json.loads((params.run_dir / "reflect" / "counts.json").read_text())}
    assert counts["all"]["questions"] == len(records)
    assert counts["all"]["reflections_cut_at_limit"] <= counts["all"]["reflections"]


def test_prompts_are_the_chat_template_rendering_with_its_default_system_message(realmodel_run):
    from reflectevo.models.loading import load_tokenizer

    params = realmodel_run
    tokenizer = load_tokenizer(params.model)
    manifest = read_manifest(params.run_dir)
    model = manifest["generation"]["02_reflect"]["model_info"]
    system = model["default_system_message"]
    assert "not the hub's bf16 weights" in model["weights"] and model["eos_token"] == "<|im_end|>"
    assert system.startswith("You are a helpful AI assistant named SmolLM")
    for record in raw_records(params):
        first = record["output"][0]
        thought_prompt, action_prompt = first["reason_prompt"]
        user = [{"role": "user", "content": first["reason_input"]}]
        rendered = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert thought_prompt == rendered + "Thought:"  # the stored prompt is exactly what the model saw
        assert system in thought_prompt
        opening = action_prompt[action_prompt.rindex("\nAction:") :]
        assert opening in ("\nAction: Finish[", "\nAction: Finish<<<", "\nAction: [BEGIN]\n")


def gold_answers(params) -> dict[tuple[str, str], str]:
    golds = {}
    for path in (params.run_dir / "data").glob("*/train.jsonl"):
        for line in path.read_text().splitlines():
            item = json.loads(line)
            golds[(item["task"], item["id"])] = item["gold"]
    return golds


def test_no_training_input_holds_its_target_and_labels_end_with_the_end_of_turn(realmodel_run, tmp_path):
    import datasets

    from reflectevo.tasks import get_task
    from reflectevo.training import adapters
    from reflectevo.training import datasets as training_sets
    from reflectevo.training import trainer as training_trainer

    params = realmodel_run
    folder = training_sets.datasets_dir(params)
    golds = gold_answers(params)
    loaded = adapters.prepare_model(params.model, params.sft.lora, False, seed=0)
    eot = training_sets.end_of_turn(loaded.tokenizer)
    assert eot == "<|im_end|>\n"
    checked = 0
    for name in sorted(p.name for p in folder.iterdir() if (p / "dataset_info.json").is_file()):
        # the gold answer, written as the action that states it, is in no input of any set, screened or not
        for row in datasets.load_from_disk(str(folder / name)):  # empty sets too
            gold_action = get_task(row["task"]).render_answer(golds[(row["task"], row["id"])])
            assert not any(gold_action in message["content"] for message in row["prompt"]), (name, row["id"])
        if not name.startswith("sft_"):
            continue
        try:
            dataset, _ = training_sets.screened_set(params, name)
        except NoTrainingData:
            continue
        args = training_trainer.training_arguments(
            "sft", params.sft, tmp_path / name, seed=0, device="cpu", dtype="float32", has_eval=False
        )
        trainer = training_trainer.make_trainer("sft", loaded, args, dataset, {})
        for index in range(len(dataset)):
            labels = [label for label in trainer.train_dataset[index]["labels"] if label != -100]
            assert loaded.tokenizer.decode(labels) == dataset[index]["completion"][0]["content"] + eot
            assert labels[-2] == loaded.tokenizer.eos_token_id  # <|im_end|>, the token generation stops at
            checked += 1
    assert checked >= len(params.data.tasks)  # the QA pairs always have rows: every training question


def test_stage_03_trained_what_had_data_and_recorded_what_it_skipped(realmodel_run):
    params = realmodel_run
    entry = read_manifest(params.run_dir)["stages"]["03_sft"]
    assert entry["status"] == "done"
    trained = {key.split("/")[0] for key in entry["training"]}
    assert "qa_pairs" in trained and trained | set(entry["skipped"]) == {"two_stage", "qa_pairs"}
    assert not trained & set(entry["skipped"])
    for mode in trained:
        assert (params.run_dir / "sft" / mode / "adapter" / "adapter_model.safetensors").is_file()
        steps = [value["steps"] for key, value in entry["training"].items() if key.startswith(f"{mode}/")]
        assert all(step == 2 for step in steps)
    for mode, why in entry["skipped"].items():
        assert "empty" in why or "dropped" in why
        assert not (params.run_dir / "sft" / mode / "adapter").exists()
