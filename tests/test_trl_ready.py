"""The training sets stage 02 saves are TRL-ready: TRL's SFTTrainer and DPOTrainer train LoRA
adapters on them as saved, on the tiny model, with the loss on the completion only (its labels
decode to exactly the completion and the end-of-turn tokens of the model's chat template)."""

from __future__ import annotations

import pytest

from reflectevo.config import load_params
from reflectevo.generation.engines import ReplayEngine
from reflectevo.reflection import curation, exports
from reflectevo.reflection.pipeline import ReflectionPipeline
from reflectevo.tasks import get_task
from reflectevo.training.datasets import end_of_turn

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    """D+ and D± from a scripted pipeline run, saved the way notebook 02 saves them."""
    from transformers import AutoTokenizer

    items = get_task("logiqa").load_samples("train")[:4]
    rows = []
    for item in items:
        gold, wrong = item.gold.upper(), ("A" if item.gold.upper() != "A" else "B")
        rows.append({"key": f"logiqa/{item.id}/t1", "text": f"Thought: first guess.\nAction: Finish[{wrong}]"})
        for sample in (0, 1):
            rows.append(
                {
                    "key": f"logiqa/{item.id}/1-3-2",
                    "sample": sample,
                    "text": f"My answer {wrong} was wrong. {'The fix is to compare every option.' if sample == 0 else 'I guessed.'}",
                }
            )
            answer = gold if sample == 0 else wrong
            rows.append(
                {"key": f"logiqa/{item.id}/1-3-2/{sample}", "text": f"Thought: checked.\nAction: Finish[{answer}]"}
            )
    params = load_params(
        None,
        {"reflect": {"fewshots": 0, "instructions": ["1-3-2"], "samples_per_instruction": 2}, "eval": {"fewshots": 0}},
    )  # trained and tested on the same prompts
    records = ReflectionPipeline(params, ReplayEngine(rows)).run({"logiqa": items}).records
    d_plus, d_pm = curation.build_d_plus(records), curation.build_d_pm(records)
    assert len(d_plus) == 4 and len(d_pm) == 4
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("datasets")
    sizes = exports.save_training_datasets(out, d_plus, d_pm, [], {"logiqa": items})
    assert sizes == {
        "sft_one_stage": 4,
        "sft_reflection": 4,
        "sft_correction": 4,
        "sft_qa_pairs": 4,
        "dpo_d_pm": 4,
        "dpo_d_pref": 0,
    }
    return out, tokenizer


def common_args(tmp_path):
    return {
        "output_dir": str(tmp_path),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "max_length": 512,
        "seed": 0,
        "dataloader_pin_memory": False,
    }


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("name", ["sft_one_stage", "sft_reflection", "sft_correction", "sft_qa_pairs"])
def test_sft_trains_on_the_completion_and_the_end_of_turn_only(saved, tiny_model_dir, tmp_path, name):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    folder, tokenizer = saved
    dataset = load_from_disk(str(folder / name))
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=SFTConfig(**common_args(tmp_path)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    processed = trainer.train_dataset[0]
    labelled = [label for label in processed["labels"] if label != -100]
    completion = dataset[0]["completion"][0]
    assert completion["role"] == "assistant" and dataset[0]["prompt"][0]["role"] == "user"
    # the tiny model's template ends an assistant turn with "<|end|>\n"; both are learned
    assert end_of_turn(tokenizer) == "<|end|>\n"
    assert tokenizer.decode(labelled) == completion["content"] + "<|end|>\n"
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_dpo_trains_on_the_saved_pairs(saved, tiny_model_dir, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    folder, tokenizer = saved
    dataset = load_from_disk(str(folder / "dpo_d_pm"))
    assert set(dataset.column_names) == {"task", "id", "prompt", "chosen", "rejected"}
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        ref_model=None,
        args=DPOConfig(beta=0.1, **common_args(tmp_path)),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "rewards/accuracies" in entry]
    assert len(logged) == 2 and abs(logged[0]["loss"] - 0.6931) < 1e-3  # ln 2 at the first step: policy = reference


def test_an_empty_set_is_saved_with_its_columns(saved):
    from datasets import load_from_disk

    folder, _ = saved
    empty = load_from_disk(str(folder / "dpo_d_pref"))
    assert empty.num_rows == 0 and set(empty.column_names) == {"task", "id", "prompt", "chosen", "rejected"}
