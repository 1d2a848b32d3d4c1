"""Curated records as training rows and TRL-ready datasets."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo import prompts
from reflectevo.errors import DataError
from reflectevo.tasks import get_task
from reflectevo.tasks.base import Item

if TYPE_CHECKING:
    import datasets


from reflectevo.core.files import atomic_directory
from reflectevo.core.jsonl import write_jsonl_atomic
from reflectevo.reflection.curation import (
    PROMPT_CHOICES,
    RELEASED,
    SECOND_TRIAL_VARIANTS,
    TRAINING_KINDS,
    generic_reflection_prompt,
    item_of,
)

# ---- training rows -------------------------------------------------------------------------------
KIND_FIELDS = {
    "one_stage": ("reflections", "second_trial_attempt", "first_trial_attempt", "first_trial_feedback"),
    "reflection": ("reflections", "first_trial_attempt", "first_trial_feedback"),
    "correction": ("reflections", "second_trial_attempt"),
    "dpo": ("reflection_chosen", "reflection_rejected", "first_trial_attempt", "first_trial_feedback"),
}


def training_rows(
    kind: str,
    rows: Sequence[dict[str, Any]],
    *,
    prompt: str = "generic",
    fewshots: int = 0,
    second_trial: str = "reflection_and_attempt",
) -> list[dict[str, Any]]:
    """Plain-text training rows (user prompt not yet chat-templated) with ``task`` and ``id``.

    one_stage, reflection and correction take D+ rows and give {prompt, completion}; dpo takes D± or
    Dpref rows and gives {prompt, chosen, rejected}. ``prompt`` picks the reflection prompt: "generic"
    (the test-time prompt) or "as_generated" (the instruction the reflection was generated with). It
    does not apply to correction, whose prompt is the trial-2 prompt; ``fewshots`` and ``second_trial``
    (the evaluation's variant: the reflection alone, or also the failed attempt) are used when that
    prompt has to be rebuilt (released rows, whose stored one holds the target).
    """
    if second_trial not in SECOND_TRIAL_VARIANTS:
        raise ValueError(f"unknown second_trial {second_trial!r}; choose one of {', '.join(SECOND_TRIAL_VARIANTS)}")
    if kind not in TRAINING_KINDS:
        raise ValueError(f"unknown training kind {kind!r}; choose one of {', '.join(TRAINING_KINDS)}")
    if prompt not in PROMPT_CHOICES:
        raise ValueError(f"unknown prompt choice {prompt!r}; choose one of {', '.join(PROMPT_CHOICES)}")
    if kind == "dpo" and prompt == "as_generated":
        raise ValueError(
            "DPO pairs mix reflections generated under different instructions, so there is no single "
            "'as generated' prompt; use prompt='generic' (the reflection prompt used at test time)"
        )
    build = {
        "one_stage": one_stage_row,
        "reflection": reflection_row,
        "correction": functools.partial(correction_row, second_trial=second_trial),
        "dpo": dpo_row,
    }[kind]
    out = []
    for index, row in enumerate(rows):
        missing = [name for name in ("task", "id", "question", "answer", *KIND_FIELDS[kind]) if name not in row]
        if missing:
            wanted = "D± or Dpref" if kind == "dpo" else "D+"
            raise DataError(f"row {index}: training kind {kind!r} needs {wanted} rows; this row lacks {missing}")
        out.append({"task": row["task"], "id": row["id"], **build(row, prompt, fewshots)})
    return out


def row_item(row: dict[str, Any]) -> Item:
    return item_of(row["task"], row["id"], row["question"], row["answer"])


def row_instruction(row: dict[str, Any], prompt: str) -> prompts.Instruction:
    """The generic instruction, or the one the reflection was generated with (released rows have none)."""
    key = row.get("instruction")
    if prompt == "as_generated" and key:
        return prompts.get_instruction(key)
    return prompts.GENERIC_INSTRUCTION


def reflection_row(row: dict[str, Any], prompt: str, fewshots: int) -> dict[str, str]:
    if prompt == "generic":
        text = generic_reflection_prompt(row_item(row), row["first_trial_attempt"], row["first_trial_feedback"])
    else:
        text = row.get("reflect_prompt")
        if not text:
            raise DataError(f"row {row['task']}/{row['id']} has no stored reflect_prompt; use prompt='generic'")
    return {"prompt": text, "completion": row["reflections"]}


def one_stage_row(row: dict[str, Any], prompt: str, fewshots: int) -> dict[str, str]:
    text = prompts.one_stage_prompt(
        get_task(row["task"]),
        row_item(row),
        row["first_trial_attempt"],
        row["first_trial_feedback"],
        row_instruction(row, prompt),
    )
    return {"prompt": text, "completion": prompts.one_stage_completion(row["reflections"], row["second_trial_attempt"])}


def correction_row(
    row: dict[str, Any], prompt: str, fewshots: int, second_trial: str = "reflection_and_attempt"
) -> dict[str, str]:
    stored = row.get("reason_prompt") or []
    if row.get("source") == RELEASED or len(stored) < 2 or not stored[1]:
        # the released reason_prompt[1] already holds the finished second trial (method.md §8.1.3): rebuilt
        # with the second-trial variant the evaluation shows, so the corrector is trained on its test prompt
        previous = (
            (row["first_trial_attempt"], row["first_trial_feedback"])
            if second_trial == "reflection_and_attempt"
            else None
        )
        text = prompts.second_trial_prompt(
            get_task(row["task"]), row_item(row), row["reflections"], fewshots, previous=previous
        )
    else:
        text = stored[1]
    return {"prompt": text, "completion": row["second_trial_attempt"]}


def dpo_row(row: dict[str, Any], prompt: str, fewshots: int) -> dict[str, str]:
    text = generic_reflection_prompt(row_item(row), row["first_trial_attempt"], row["first_trial_feedback"])
    return {"prompt": text, "chosen": row["reflection_chosen"], "rejected": row["reflection_rejected"]}


def qa_pair_rows(items: Mapping[str, Sequence[Item]], *, fewshots: int = 0) -> list[dict[str, str]]:
    """The paper's "SFT on QA pairs" baseline (method.md §5.6): every question with its gold answer,
    no reflection. The prompt is the first-trial prompt (so the trained model is asked the way it is
    evaluated); the completion is the gold answer in the task's answer syntax after a fixed thought."""
    rows = []
    for task_name, task_items in items.items():
        task = get_task(task_name)
        for item in task_items:
            rows.append(
                {
                    "task": item.task,
                    "id": item.id,
                    "prompt": prompts.attempt_prompt(task, item, fewshots),
                    "completion": prompts.qa_pair_completion(task, item),
                }
            )
    return rows


MESSAGE_COLUMNS = ("prompt", "completion", "chosen", "rejected")
ROLES = {"prompt": "user", "completion": "assistant", "chosen": "assistant", "rejected": "assistant"}


def to_trl_dataset(rows: Sequence[dict[str, Any]]) -> datasets.Dataset:
    """A ``datasets.Dataset`` in TRL's conversational prompt-completion (or preference) form: the
    prompt a one-message user turn, the completion (or chosen / rejected) a one-message assistant
    turn. TRL renders them with the training model's own chat template, so the trained tokens are
    the completion followed by exactly the end-of-turn tokens that template writes."""
    import datasets

    columns = {tuple(row) for row in rows}
    if len(columns) > 1:
        raise ValueError(f"rows of different kinds cannot share one dataset: {sorted(columns)}")
    converted = [
        {
            key: [{"role": ROLES[key], "content": value}] if key in MESSAGE_COLUMNS else value
            for key, value in row.items()
        }
        for row in rows
    ]
    return datasets.Dataset.from_list(converted, features=training_features(next(iter(columns), ())))


def training_features(columns: Sequence[str]) -> datasets.Features:
    import datasets

    message = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
    return datasets.Features({c: message if c in MESSAGE_COLUMNS else datasets.Value("string") for c in columns})


# The training sets stage 02 saves, and what each is built from (D+, D±, Dpref or the questions).
TRAINING_DATASETS = {
    "sft_one_stage": ("one_stage", "d_plus"),
    "sft_reflection": ("reflection", "d_plus"),
    "sft_correction": ("correction", "d_plus"),
    "sft_qa_pairs": ("qa_pairs", "items"),
    "dpo_d_pm": ("dpo", "d_pm"),
    "dpo_d_pref": ("dpo", "d_pref"),
}
SFT_COLUMNS = ("task", "id", "prompt", "completion")
TRAINING_COLUMNS = {
    "one_stage": SFT_COLUMNS,
    "reflection": SFT_COLUMNS,
    "correction": SFT_COLUMNS,
    "qa_pairs": SFT_COLUMNS,
    "dpo": ("task", "id", "prompt", "chosen", "rejected"),
}


def save_training_datasets(
    out_dir: str | Path,
    d_plus: Sequence[dict[str, Any]],
    d_pm: Sequence[dict[str, Any]],
    d_pref: Sequence[dict[str, Any]],
    items: Mapping[str, Sequence[Item]],
    *,
    prompt: str = "generic",
    fewshots: int = 0,
    second_trial: str = "reflection_and_attempt",
) -> dict[str, int]:
    """Every TRL-ready set of :data:`TRAINING_DATASETS` under ``out_dir/<name>`` (``datasets.save_to_disk``,
    each folder replaced whole). ``items`` are the questions of the reflection split, for the QA-pairs
    baseline. An empty set is saved too, with its columns, so a later stage can say exactly which set
    is empty. Returns the row count of each set."""

    sources = {"d_plus": d_plus, "d_pm": d_pm, "d_pref": d_pref}
    sizes = {}
    for name, (kind, source) in TRAINING_DATASETS.items():
        if kind == "qa_pairs":
            rows = qa_pair_rows(items, fewshots=fewshots)
        else:
            rows = training_rows(
                kind,
                sources[source],
                prompt="generic" if kind == "dpo" else prompt,
                fewshots=fewshots,
                second_trial=second_trial,
            )
        dataset = to_trl_dataset(rows) if rows else empty_training_set(kind)
        with atomic_directory(Path(out_dir) / name) as folder:
            dataset.save_to_disk(str(folder), num_shards=1)  # an empty set needs its one (empty) shard to load back
        sizes[name] = len(rows)
    return sizes


def empty_training_set(kind: str) -> datasets.Dataset:
    import datasets

    columns = TRAINING_COLUMNS[kind]
    return datasets.Dataset.from_dict({column: [] for column in columns}, features=training_features(columns))


# ---- one dataset folder for the Hub and datasets.load_dataset ----------------------------------
DATASET_FOLDER = "dataset"  # reflect/dataset/
CURATED_SETS = {
    "d_plus": "D+: each reflection whose second trial was correct, with the question and both trials",
    "d_pm": "D±: per question, a reflection that led to a correct second trial against one that did not",
    "d_pref": "Dpref: pairs of successful reflections of one question, ranked by the judge",
    "judgements": "the judge's verdicts behind Dpref (both orders), including ties and unparseable replies",
}
TRL_SETS = {
    "sft_one_stage": "one-stage SFT (D+): prompt/completion chat messages, reflection and second answer in one turn",
    "sft_reflection": "two-stage SFT, phase 1 (D+): the reflection as the completion",
    "sft_correction": "two-stage SFT, phase 2 (D+): the second answer as the completion, after the reflection",
    "sft_qa_pairs": "the SFT-on-QA-pairs baseline: every question of the split with its gold answer",
    "dpo_d_pm": "DPO on D±: prompt/chosen/rejected chat messages",
    "dpo_d_pref": "DPO on Dpref: prompt/chosen/rejected chat messages",
}


def write_dataset_folder(reflect_dir: str | Path, *, run: str, model: str, seed: int) -> Path:
    """``reflect_dir/dataset/``: one folder with a dataset card whose ``configs`` name one config per
    non-empty set (the curated D+, D±, Dpref and judge verdicts, and the TRL-ready sets, all JSON Lines:
    the Hub's loader picks one format per folder), so that ``datasets.load_dataset(folder, "d_plus")`` loads it and the folder can be pushed
    to the Hub as it is. Reads what stage 02 wrote (``curated/`` and ``datasets/``); replaced whole."""
    import datasets as hf_datasets

    reflect_dir = Path(reflect_dir)
    sizes: dict[str, int] = {}
    files: dict[str, str] = {}
    with atomic_directory(reflect_dir / DATASET_FOLDER) as folder:
        (folder / "data").mkdir()
        for name in CURATED_SETS:
            source = reflect_dir / "curated" / f"{name}.jsonl"
            if not source.is_file():
                raise DataError(f"{source} is missing: stage 02 writes it (reflectevo run PARAMS --stages 02)")
            data = source.read_bytes()
            sizes[name] = sum(1 for line in data.splitlines() if line.strip())
            if sizes[name]:
                files[name] = f"data/{name}.jsonl"
                (folder / files[name]).write_bytes(data)
        for name in TRL_SETS:
            source = reflect_dir / "datasets" / name
            if not source.is_dir():
                raise DataError(f"{source} is missing: stage 02 writes it (reflectevo run PARAMS --stages 02)")
            rows = hf_datasets.load_from_disk(str(source)).to_list()
            sizes[name] = len(rows)
            if rows:
                files[name] = f"data/{name}.jsonl"
                write_jsonl_atomic(folder / files[name], rows)
        (folder / "README.md").write_text(dataset_card(sizes, files, run=run, model=model, seed=seed), encoding="utf-8")
    return reflect_dir / DATASET_FOLDER


def dataset_card(sizes: Mapping[str, int], files: Mapping[str, str], *, run: str, model: str, seed: int) -> str:
    """The dataset folder's README.md: Hub metadata (one config per non-empty set, split ``train``) and a
    body saying what each set is, its rows, and which sets are empty (an empty set has no config)."""
    from huggingface_hub import DatasetCardData

    from reflectevo.models.cards import base_model_info

    data = DatasetCardData(
        pretty_name=f"reflectevo {run}: self-reflection data",
        tags=["reflectevo", "self-reflection", "sft", "dpo"],
        task_categories=["text-generation"],
        configs=[
            {"config_name": name, "data_files": [{"split": "train", "path": path}]} for name, path in files.items()
        ],
    )
    descriptions = {**CURATED_SETS, **TRL_SETS}
    empty = [name for name in descriptions if not sizes.get(name)]
    lines = [
        f"---\n{data.to_yaml()}\n---",
        f"# reflectevo run `{run}`: curated reflections and training sets",
        "",
        f"Generated by reflectevo's stage 02 with the model {base_model_info(model).description}, seed {seed}, "
        "on the training split of the run's questions (the paper's ReflectEvo method, arXiv 2505.16475). The "
        "questions and gold answers come from LogiQA, MATH, MBPP and BIG-bench under their own licences.",
        "",
        "| config | rows | what it is |",
        "|---|---|---|",
        *(f"| `{name}` | {sizes.get(name, 0)} | {text} |" for name, text in descriptions.items()),
        "",
        "The curated sets use the field names of the released ReflectEvo-460K; the TRL-ready sets hold chat "
        "messages that TRL renders with the trained model's own chat template.",
        "",
    ]
    if empty:
        lines += [f"Empty, so without a config: {', '.join(f'`{name}`' for name in empty)}.", ""]
    if files:
        first = next(iter(files))
        lines += [
            "```python",
            "import datasets",
            f'rows = datasets.load_dataset("path/to/this/folder", "{first}", split="train")',
            "```",
            "",
        ]
    return "\n".join(lines)
