"""Training sets of stages 03-04: loaded, held-out questions split off, rows screened, texts measured."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo.config import Params, TrainParams
from reflectevo.prompts import split_one_stage
from reflectevo.reflection.exports import TRAINING_DATASETS

if TYPE_CHECKING:
    import datasets


from reflectevo.errors import NoTrainingData, TrainingError

# variant -> its phases, in order: (phase name, training set saved by stage 02)
SFT_PHASES: dict[str, tuple[tuple[str, str], ...]] = {
    "one_stage": (("one_stage", "sft_one_stage"),),
    "two_stage": (("reflection", "sft_reflection"), ("correction", "sft_correction")),
    "qa_pairs": (("qa_pairs", "sft_qa_pairs"),),
}
DPO_PHASES: dict[str, tuple[tuple[str, str], ...]] = {
    "d_pm": (("d_pm", "dpo_d_pm"),),
    "d_pref": (("d_pref", "dpo_d_pref"),),
}


# ---- training sets -------------------------------------------------------------------------------
def datasets_dir(params: Params) -> Path:
    return params.run_dir / "reflect" / "datasets"


def load_training_set(folder: Path, name: str, in_memory: bool = False) -> datasets.Dataset:
    """One training set of stage 02, memory-mapped, or ``in_memory`` for training (so that no cache
    file of TRL's preprocessing is written into stage 02's folder). A missing or empty set is an
    error that says where the rows should have come from."""
    import datasets

    path = folder / name
    if not (path / "dataset_info.json").is_file():
        raise TrainingError(
            f"training set {name} not found in {folder}: run stage 02 (reflectevo run PARAMS --from 02), "
            "whose exports write it"
        )
    dataset = datasets.load_from_disk(str(path), keep_in_memory=in_memory)
    if len(dataset) == 0:
        source = {"sft_qa_pairs": "the questions of reflect.split"}.get(
            name, "D+ (reflections whose second trial was correct)" if name.startswith("sft_") else "D± / Dpref pairs"
        )
        raise NoTrainingData(
            f"training set {name} is empty: stage 02 found no rows for it ({source}); see reflect/counts.json",
            "More questions (data.max_items), more reflections (reflect.instructions_k, samples_per_instruction) "
            "or another judge (reflect.judge, for d_pref) give it rows; or remove this variant from the params",
        )
    return dataset


def question_keys(dataset: datasets.Dataset) -> set[tuple[str, str]]:
    """(task, id) of every question the set has rows for."""
    return set(zip(dataset["task"], dataset["id"], strict=True))


def heldout_questions(phase_sets: Sequence[datasets.Dataset], fraction: float, seed: int) -> list[tuple[str, str]]:
    """The questions a variant holds out of every one of its phases, sorted: a seeded ``fraction`` of the
    questions all the phases have rows for, so that each held-out question is measured in each phase and
    trained in none (two_stage's correction phase continues the reflection phase's adapter, which must
    not have seen them either). At least one when ``fraction`` > 0, and at least one shared question is
    always left to train on; none when ``fraction`` is 0 or the phases share a single question."""
    shared = sorted(set.intersection(*(question_keys(dataset) for dataset in phase_sets))) if phase_sets else []
    held = round(fraction * len(shared))
    if fraction > 0:
        held = max(1, held)
    held = min(held, len(shared) - 1)
    if held <= 0:
        return []
    return sorted(random.Random(seed).sample(shared, held))


def split_off(
    dataset: datasets.Dataset, questions: Sequence[tuple[str, str]]
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, held-out): every row of ``questions`` held out, so that no held-out completion shares a
    question with a training one. None when no row is held out."""
    chosen = set(questions)
    keys = list(zip(dataset["task"], dataset["id"], strict=True))
    heldout = [index for index, key in enumerate(keys) if key in chosen]
    if not heldout:
        return dataset, None
    return dataset.select([index for index, key in enumerate(keys) if key not in chosen]), dataset.select(heldout)


def split_by_question(
    dataset: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, held-out) of a single set: a seeded ``fraction`` of its questions held out with all their
    rows (:func:`heldout_questions` of that set alone). None when nothing is held out."""
    return split_off(dataset, heldout_questions([dataset], fraction, seed))


def heldout_record(questions: Sequence[tuple[str, str]], drawn_from: Sequence[str], seed: int) -> dict[str, Any]:
    """What a phase's metrics say of the held-out questions: the same record in every phase of a variant."""
    keys = [list(key) for key in questions]
    digest = hashlib.sha256(json.dumps(keys, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"count": len(keys), "drawn_from": list(drawn_from), "seed": seed, "sha256": digest, "keys": keys}


# ---- screening the rows ----------------------------------------------------------------------------
# A corrected attempt shorter than this, whitespace collapsed, is never called a leak: texts that short
# ("Finish[B]", "Answer: 4") turn up in prompts by chance, and a real attempt (a Thought line and an
# Action line) is longer.
MIN_LEAK_CHARS = 24
DROP_REASONS: dict[str, str] = {
    "empty_target": "the trained text is empty: only the end of the turn would be learned",
    "target_in_prompt": (
        f"the corrected attempt (at least {MIN_LEAK_CHARS} characters) appears whole in its prompt "
        "outside the failed attempt the prompt shows: the answer is in the input (the leak of the "
        "released correction data, method.md §8.1.3)"
    ),
    "copies_prompt": (
        "the trained text is identical to whole lines of its prompt (the failed attempt, its Thought line, "
        "a line of the instructions): the row teaches copying the input"
    ),
    "chosen_equals_rejected": "chosen and rejected are the same text: the pair carries no preference",
}
DROP_EXAMPLES = 5  # (task, id) of the first rows dropped for each reason, in the metrics
# The failed attempt a prompt shows by design: prompts.failed_trial after "Your attempt:" (reflection and
# one-stage prompts) or "It was:" (second-trial prompt), the attempt and then its observation. Generation
# stops an attempt at "\nObservation", so the first one after the header ends it.
SHOWN_ATTEMPT = re.compile(r"(?:Your attempt:|It was:)\n(.*?)\nObservation:", re.DOTALL)


def set_kind(name: str) -> str:
    """The kind of rows a training set of stage 02 holds (one_stage, reflection, correction, qa_pairs, dpo)."""
    if name not in TRAINING_DATASETS:
        raise TrainingError(f"unknown training set {name!r}; stage 02 saves {', '.join(TRAINING_DATASETS)}")
    return TRAINING_DATASETS[name][0]


def _text(messages: list[dict[str, str]]) -> str:
    return "\n".join(message["content"] for message in messages)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _lines(text: str) -> str:
    """The non-empty lines of ``text``, each with its whitespace collapsed."""
    return "\n".join(line for line in (_flat(raw) for raw in text.splitlines()) if line)


def row_targets(row: dict[str, Any], kind: str) -> tuple[list[str], list[str]]:
    """(corrected attempts, imitated texts) of one row. The corrected attempt is what a leak gives away:
    the completion of a correction or QA-pairs row, the attempt after ``Answer:`` of a one-stage row;
    reflection and DPO rows have none (a reflection quoting its prompt gives no answer away). The
    imitated texts are what the loss pulls the model towards: the completion (each part of a one-stage
    one), the chosen reflection (a rejected one that copies the prompt is a fair thing to push down)."""
    if kind == "dpo":
        return [], [_text(row["chosen"])]
    completion = _text(row["completion"])
    if kind == "one_stage":
        reflection, attempt = split_one_stage(completion)
        return ([attempt] if attempt else []), [reflection] + ([attempt] if attempt else [])
    if kind == "reflection":
        return [], [completion]
    return [completion], [completion]


def screen_row(row: dict[str, Any], kind: str) -> str | None:
    """Why one row of a training set of ``kind`` must not train (a key of :data:`DROP_REASONS`), or None.

    The rule, in this order:

    1. ``empty_target``: the completion, chosen or rejected text is empty or whitespace.
    2. ``target_in_prompt``: a corrected attempt (:func:`row_targets`) of at least
       :data:`MIN_LEAK_CHARS` characters appears whole (whitespace collapsed) in the prompt once the
       failed attempt the prompt shows by design (:data:`SHOWN_ATTEMPT`) is taken out. A correct answer
       then sits in the input; a second trial equal to the failed attempt it was shown is not one.
    3. ``copies_prompt``: an imitated text is identical to one or more whole lines of the prompt
       (whitespace collapsed, blank lines ignored): the failed attempt itself (an MBPP retry that passed
       where the same code had timed out), its Thought line, a line of the instructions. A text that
       merely occurs inside a line (a reflection of ".") is the model's own and is kept.
    4. ``chosen_equals_rejected``: a preference pair whose two texts are the same.
    """
    trained = [_text(row[column]) for column in ("completion", "chosen", "rejected") if column in row]
    if any(not text.strip() for text in trained):
        return "empty_target"
    prompt = _text(row["prompt"])
    corrected, imitated = row_targets(row, kind)
    outside = _flat(SHOWN_ATTEMPT.sub("\n\0\n", prompt))
    if any(len(_flat(attempt)) >= MIN_LEAK_CHARS and _flat(attempt) in outside for attempt in corrected):
        return "target_in_prompt"
    prompt_lines = f"\n{_lines(prompt)}\n"
    if any(_lines(text) and f"\n{_lines(text)}\n" in prompt_lines for text in imitated):
        return "copies_prompt"
    if kind == "dpo" and _flat(trained[0]) == _flat(trained[1]):
        return "chosen_equals_rejected"
    return None


@dataclass
class RowScreening:
    """Which rows of one training set train, and why the others do not (:data:`DROP_REASONS`)."""

    name: str
    rows: int  # in the training set
    kept: list[int]
    dropped: dict[str, list[int]]  # every reason, with the indices of its rows
    examples: dict[str, list[list[str]]]  # reason -> (task, id) of its first rows

    def counts(self) -> dict[str, int]:
        return {reason: len(indices) for reason, indices in self.dropped.items()}


def screen_rows(dataset: datasets.Dataset, kind: str, name: str = "") -> RowScreening:
    """Screen every row of a training set of ``kind`` (:func:`screen_row`)."""
    kept: list[int] = []
    dropped: dict[str, list[int]] = {reason: [] for reason in DROP_REASONS}
    examples: dict[str, list[list[str]]] = {}
    for index, row in enumerate(dataset):
        reason = screen_row(row, kind)
        if reason is None:
            kept.append(index)
            continue
        dropped[reason].append(index)
        if len(examples.setdefault(reason, [])) < DROP_EXAMPLES:
            examples[reason].append([row["task"], row["id"]])
    return RowScreening(name or kind, len(dataset), kept, dropped, examples)


def target_leaks(dataset: datasets.Dataset, kind: str) -> list[int]:
    """Rows whose corrected attempt sits in their own prompt (``target_in_prompt`` of :func:`screen_row`):
    the leak of the released correction data (method.md §8.1.3). Training drops and counts them."""
    return screen_rows(dataset, kind).dropped["target_in_prompt"]


def screened_set(params: Params, name: str, in_memory: bool = False) -> tuple[datasets.Dataset, RowScreening]:
    """A training set of stage 02 without the rows :func:`screen_row` drops, and its screening. A set
    whose every row is dropped stops here, before any model loads, with the reasons."""
    dataset = load_training_set(datasets_dir(params), name, in_memory=in_memory)
    screening = screen_rows(dataset, set_kind(name), name)
    if not screening.kept:
        reasons = "; ".join(
            f"{count} {reason} ({DROP_REASONS[reason]})" for reason, count in screening.counts().items() if count
        )
        raise NoTrainingData(
            f"every row of training set {name} is dropped: {reasons}",
            f"Look at its rows in {datasets_dir(params) / name} and stage 02's curated/ files, or remove this "
            "variant from the params",
        )
    return dataset.select(screening.kept), screening


def stage_kind(stage: str) -> str:
    if stage not in ("03_sft", "04_dpo"):
        raise ValueError(f"unknown training stage {stage!r}; choose 03_sft or 04_dpo")
    return "sft" if stage == "03_sft" else "dpo"


def stage_section(params: Params, stage: str) -> TrainParams:
    """The params section a training stage reads: ``sft`` or ``dpo``."""
    return getattr(params, stage_kind(stage))


def stage_variants(params: Params, stage: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """The variants the params ask the stage to train (``sft.modes`` or ``dpo.pairs``), each with
    its phases in order: (phase, training set)."""
    if stage_kind(stage) == "sft":
        return {mode: SFT_PHASES[mode] for mode in params.sft.modes}
    return {pairs: DPO_PHASES[pairs] for pairs in params.dpo.pairs}


def end_of_turn(tokenizer: Any) -> str:
    """What the chat template writes after an assistant message's content (``<|eot_id|>`` for Llama 3,
    ``<|im_end|>\\n`` for ChatML): the tokens training teaches the model to end its turn with."""
    marker = "\u2063reflectevo-end\u2063"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    return rendered[rendered.index(marker) + len(marker) :]


def trained_text(tokenizer: Any, prompt: list[dict[str, str]], completion: list[dict[str, str]]) -> tuple[str, str]:
    """(context, trained part) of a conversational row as TRL renders it: the prompt with the
    generation prompt, and the rest of the rendered conversation, on which the loss is computed."""
    context = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(context):
        raise TrainingError(
            "the chat template renders a prompt differently alone and followed by the answer, so "
            "the trained context would differ from the test-time one; use another chat template"
        )
    return context, full[len(context) :]


def variants_without_data(params: Params, stage: str) -> dict[str, str]:
    """The variants of a stage that have nothing to train on, each with why: a phase's training set is
    empty (stage 02 curated no D+, D± or Dpref rows for it) or every row of it is dropped. A small
    model's run can yield no such data; the stage trains the other variants and records these as skipped."""
    skipped = {}
    for variant, phases in stage_variants(params, stage).items():
        for _, name in phases:
            try:
                screened_set(params, name)
            except NoTrainingData as exc:
                skipped[variant] = exc.reason
                break
    return skipped


def screened_sets(params: Params, stage: str) -> dict[str, tuple[datasets.Dataset, RowScreening]]:
    """The screened training sets of the variants that train (those with data), by name."""
    skipped = variants_without_data(params, stage)
    return {
        name: screened_set(params, name)
        for variant, phases in stage_variants(params, stage).items()
        if variant not in skipped
        for _, name in phases
    }


def phase_examples(params: Params, stage: str, tokenizer: Any) -> list[dict[str, str]]:
    """The first row of each phase's training set as the model will see it: the end of the rendered
    context, and each trained part (completion, or chosen and rejected, with the end-of-turn tokens).
    Variants without data (:func:`variants_without_data`) have no rows to show."""
    examples = []
    skipped = variants_without_data(params, stage)
    for variant, phases in stage_variants(params, stage).items():
        if variant in skipped:
            continue
        for phase, name in phases:
            row = screened_set(params, name)[0][0]  # the first row that trains
            example = {"variant": variant, "phase": phase, "task": row["task"], "id": row["id"]}
            for column in ("completion", "chosen", "rejected"):
                if column in row:
                    context, trained = trained_text(tokenizer, row["prompt"], row[column])
                    example["context"] = context
                    example[f"trained ({column})"] = trained
            examples.append(example)
    return examples


def prompt_lengths(tokenizer: Any, dataset: datasets.Dataset) -> list[int]:
    """Tokens of each row's prompt, rendered with the generation prompt."""
    return [
        len(
            tokenizer(
                tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
        )
        for row in dataset
    ]


def row_lengths(tokenizer: Any, dataset: datasets.Dataset, completion_columns: tuple[str, ...]) -> list[int]:
    """Tokens of prompt + completion per row (the longest completion for preference rows)."""
    lengths = []
    for row in dataset:
        longest = 0
        for column in completion_columns:
            text = tokenizer.apply_chat_template(row["prompt"] + row[column], tokenize=False)
            longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        lengths.append(longest)
    return lengths
