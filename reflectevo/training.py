"""Reflection learning with LoRA: stage 03 (SFT) and stage 04 (DPO), one entry point for notebooks,
the command line and ``accelerate launch``.

    run_sft(params)     # each mode of sft.modes   -> outputs/<run>/sft/<mode>/
    run_dpo(params)     # each pair type of dpo.pairs -> outputs/<run>/dpo/<pairs>/

    reflectevo train sft params/quickstart.yaml                      # the same, without Jupyter
    accelerate launch --multi_gpu --num_processes 2 -m reflectevo train sft params/x.yaml

A *variant* (an SFT mode or a DPO pair type) is trained in one or more *phases*, each one TRL trainer
run on one training set that stage 02 saved (``reflect/datasets/``):

    one_stage   one_stage  on sft_one_stage   failed attempt -> reflection, "Answer:", corrected attempt
    two_stage   reflection on sft_reflection  failed attempt -> reflection
                correction on sft_correction  question + reflection + failed attempt -> corrected attempt,
                                              continuing the adapter of the reflection phase
    qa_pairs    qa_pairs   on sft_qa_pairs    question -> gold answer (the paper's baseline)
    d_pm        d_pm       on dpo_d_pm        reflection prompt -> chosen / rejected reflection
    d_pref      d_pref     on dpo_d_pref

Folder of one variant:

    <variant>/adapter/        the final LoRA adapter, with the tokenizer and a model card (README.md)
    <variant>/<phase>_adapter/   each earlier phase's adapter, kept beside it: two_stage's
                              reflection_adapter/ is the reflector its correction phase continued from
    <variant>/merged/         with save_merged: base + adapter merged into 16-bit weights
    <variant>/metrics.json    per phase: rows (trained, held out, dropped by reason), the held-out
                              questions, steps, tokens/s, losses and rewards before and after
    <variant>/train-<identity>/<phase>/   the trainer's folder: checkpoint-N/ (adapter, optimizer,
                              scheduler, RNG), runs/ (tensorboard), adapter/ once the phase is done,
                              ranks/rank-<r>.json (what each process saw)

The folder of the trainer is named after the stage identity, so a rerun with the same params resumes
from the newest *complete* checkpoint (with its optimizer, scheduler and RNG state) and a run with
other params starts afresh beside it. The backend is Unsloth's ``FastLanguageModel`` when the model
loaded through Unsloth (a CUDA GPU), else transformers + PEFT, with the same hyper-parameters. SFT
batches are padded, length-grouped or padding-free (``sft.batching``; :func:`choose_batching`), and
each phase's metrics say which ran and why.

Rows that cannot teach what the phase is for are dropped and counted, never trained and never a reason
to stop (:func:`screen_rows`, :data:`DROP_REASONS`): the corrected attempt inside its own prompt (the
leak of the released correction data), a target that only copies whole lines of its prompt, and a
preference pair whose chosen and rejected texts are the same. A variant holds the same questions out
of every phase (:func:`heldout_questions`), so the correction phase of two_stage is measured on
questions its reflection phase never trained on either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo.config import Params, TrainParams, derive_seed
from reflectevo.curation import TRAINING_DATASETS
from reflectevo.errors import ReflectEvoError
from reflectevo.prompts import split_one_stage
from reflectevo.runs import (
    RunDir,
    atomic_directory,
    atomic_write_json,
    get_stage,
    open_run,
    replace_directory,
)

if TYPE_CHECKING:
    import datasets

    from reflectevo.config import LoraParams, ModelParams

log = logging.getLogger(__name__)

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
# Files a checkpoint must hold to be resumed from; the trainer writes trainer_state.json last.
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
FIRST_BATCHES = 4  # fingerprints of the first training batches each process records


class TrainingError(ReflectEvoError):
    """Training cannot start as configured (a missing or empty training set, a missing SFT variant)."""


# ---- processes -----------------------------------------------------------------------------------
def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: set by ``torchrun`` and ``accelerate launch``, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def wait_for(path: Path, what: str, timeout_s: float = 3600.0) -> None:
    """Wait until the main process has put ``path`` in place (it appears whole, by a rename)."""
    started = time.monotonic()
    while not path.exists():
        if time.monotonic() - started > timeout_s:
            raise TrainingError(f"waited {timeout_s:.0f} s for the main process to write {what} ({path})")
        time.sleep(0.5)


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
        raise TrainingError(f"training set {name} not found in {folder}: run stage 02 (reflectevo run PARAMS --from 02), "
                            "whose exports write it")
    dataset = datasets.load_from_disk(str(path), keep_in_memory=in_memory)
    if len(dataset) == 0:
        source = {"sft_qa_pairs": "the questions of reflect.split"}.get(name, "D+ (reflections whose second trial was correct)"
                                                                        if name.startswith("sft_") else
                                                                        "D± / Dpref pairs")
        raise TrainingError(
            f"training set {name} is empty: stage 02 found no rows for it ({source}); see reflect/counts.json. "
            "More questions (data.max_items), more reflections (reflect.instructions_k, samples_per_instruction) "
            "or another judge (reflect.judge, for d_pref) give it rows; or remove this variant from the params")
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


def split_off(dataset: datasets.Dataset, questions: Sequence[tuple[str, str]]) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, held-out): every row of ``questions`` held out, so that no held-out completion shares a
    question with a training one. None when no row is held out."""
    chosen = set(questions)
    keys = list(zip(dataset["task"], dataset["id"], strict=True))
    heldout = [index for index, key in enumerate(keys) if key in chosen]
    if not heldout:
        return dataset, None
    return dataset.select([index for index, key in enumerate(keys) if key not in chosen]), dataset.select(heldout)


def split_by_question(dataset: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
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
    "target_in_prompt": (f"the corrected attempt (at least {MIN_LEAK_CHARS} characters) appears whole in its prompt "
                         "outside the failed attempt the prompt shows: the answer is in the input (the leak of the "
                         "released correction data, method.md §8.1.3)"),
    "copies_prompt": ("the trained text is identical to whole lines of its prompt (the failed attempt, its Thought line, "
                      "a line of the instructions): the row teaches copying the input"),
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
        reasons = "; ".join(f"{count} {reason} ({DROP_REASONS[reason]})" for reason, count in screening.counts().items() if count)
        raise TrainingError(f"every row of training set {name} is dropped: {reasons}. Look at its rows in "
                            f"{datasets_dir(params) / name} and stage 02's curated/ files, or remove this variant from the params")
    return dataset.select(screening.kept), screening


def training_plan(params: Params, stage: str) -> list[dict[str, Any]]:
    """One row per phase the stage will train (variant, phase, training set, rows, questions, the rows
    kept and those dropped by reason). Every set is opened and screened, so a missing or empty one, or
    one whose every row is dropped, stops here, before any model loads."""
    plan = []
    for variant, phases in stage_variants(params, stage).items():
        for phase, name in phases:
            kept, screening = screened_set(params, name)
            plan.append({"variant": variant, "phase": phase, "training set": name, "rows": screening.rows,
                         "rows kept": len(kept), **{f"dropped: {reason}": n for reason, n in screening.counts().items()},
                         "questions": len(question_keys(kept))})
    return plan


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
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    return rendered[rendered.index(marker) + len(marker):]


def trained_text(tokenizer: Any, prompt: list[dict[str, str]], completion: list[dict[str, str]]) -> tuple[str, str]:
    """(context, trained part) of a conversational row as TRL renders it: the prompt with the
    generation prompt, and the rest of the rendered conversation, on which the loss is computed."""
    context = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(context):
        raise TrainingError("the chat template renders a prompt differently alone and followed by the answer, so "
                            "the trained context would differ from the test-time one; use another chat template")
    return context, full[len(context):]


def phase_examples(params: Params, stage: str, tokenizer: Any) -> list[dict[str, str]]:
    """The first row of each phase's training set as the model will see it: the end of the rendered
    context, and each trained part (completion, or chosen and rejected, with the end-of-turn tokens)."""
    examples = []
    for variant, phases in stage_variants(params, stage).items():
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
    return [len(tokenizer(tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"]) for row in dataset]


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


# ---- models --------------------------------------------------------------------------------------
def lora_config(lora: LoraParams):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                      bias="none", task_type="CAUSAL_LM")


def prepare_model(model_params: ModelParams, lora: LoraParams, gradient_checkpointing: bool, seed: int,
                  adapter: Path | None = None):
    """The model to train: a new LoRA adapter on the base model, or ``adapter`` loaded trainable (the
    correction phase continues the reflection phase's adapter). Returns the LoadedModel."""
    from transformers import set_seed

    from reflectevo.models import load_model

    set_seed(seed)  # the adapter's initial weights
    loaded = load_model(model_params.model_copy(update={"adapter": str(adapter) if adapter else None}), for_training=True)
    loaded.tokenizer.padding_side = "right"  # training pads on the right; generation set it to left
    if adapter is not None:
        return loaded
    if loaded.backend == "unsloth":
        from unsloth import FastLanguageModel

        loaded.model = FastLanguageModel.get_peft_model(
            loaded.model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
            bias="none", use_gradient_checkpointing="unsloth" if gradient_checkpointing else False, random_state=seed)
    else:
        from peft import get_peft_model

        loaded.model = get_peft_model(loaded.model, lora_config(lora))
    return loaded


def lora_digest(model: Any) -> str:
    """sha256 of every LoRA tensor, in name order: equal digests, equal adapters."""
    digest = hashlib.sha256()
    for name, tensor in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def merge_adapter(model_params: ModelParams, adapter: Path, out_dir: Path, card: str = "") -> Path:
    """Base model + LoRA adapter merged into one model on disk, in the base's 16-bit (or 32-bit)
    weights: a 4-bit recipe's base is loaded in bfloat16 for the merge, never merged into 4-bit."""
    from reflectevo.models import load_model

    dtype = "bfloat16" if model_params.load_in_4bit and model_params.dtype == "auto" else model_params.dtype
    plain = model_params.model_copy(update={"load_in_4bit": False, "adapter": str(adapter), "backend": "transformers",
                                            "dtype": dtype})
    loaded = load_model(plain)
    merged = loaded.model.merge_and_unload()
    with atomic_directory(out_dir) as folder:
        merged.save_pretrained(str(folder), safe_serialization=True)
        loaded.tokenizer.padding_side = "left"
        loaded.tokenizer.save_pretrained(str(folder))
        if card:
            (folder / "README.md").write_text(card, encoding="utf-8")
    del merged, loaded
    return out_dir


# ---- batching ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batching:
    """How an SFT phase puts rows into batches (``sft.batching`` resolved for the loaded model)."""

    mode: str  # padded, length_grouped or padding_free
    requested: str  # as configured, auto included
    attention: str  # the attention that sees the batches: the model's implementation, or "unsloth"
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"mode": self.mode, "requested": self.requested, "attention": self.attention, "reason": self.reason}


def attention_implementation(loaded: Any) -> str:
    if loaded.backend == "unsloth":
        return "unsloth"  # its own kernels, which take padding-free batches with their row lengths
    config = getattr(loaded.model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "unknown")


def choose_batching(requested: str, loaded: Any) -> Batching:
    """Resolve ``sft.batching`` for ``loaded`` (a LoadedModel).

    A padding-free batch is every row of the batch concatenated into one sequence, each row restarting
    its position ids at 0. Flash attention and Unsloth's kernels attend within each row natively. With
    sdpa or eager attention, transformers builds a block-diagonal mask from the position ids, so rows
    still never see each other (the loss equals the padded batch's), but attention is then computed over
    the whole concatenation; ``auto`` therefore picks padding_free only where the kernel is natively
    per-row, switching a bf16/fp16 model on a CUDA GPU to flash attention when flash-attn is installed.
    """
    if requested not in ("auto", "padded", "length_grouped", "padding_free"):
        raise ValueError(f"unknown batching {requested!r}; choose auto, padded, length_grouped or padding_free")
    attention = attention_implementation(loaded)
    if requested == "padded":
        return Batching("padded", requested, attention, "requested")
    if requested == "length_grouped":
        return Batching("length_grouped", requested, attention, "requested: rows of similar length share a batch")
    native = attention == "unsloth" or "flash" in attention
    if not native and requested == "auto" and loaded.device == "cuda" and loaded.dtype in ("bfloat16", "float16"):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            try:
                loaded.model.set_attn_implementation("flash_attention_2")
            except (ImportError, ValueError, NotImplementedError) as exc:  # a model class without flash attention
                log.info("flash attention not used for training: %s", exc)
            else:
                attention, native = attention_implementation(loaded), True
    if requested == "padding_free":
        why = ("the attention kernel takes the concatenated rows natively" if native else
               f"{attention} attention: transformers masks each row off from the others by its position ids "
               "(same loss as padded), attention computed over the whole concatenated batch")
        return Batching("padding_free", requested, attention, why)
    if native:
        return Batching("padding_free", requested, attention, f"auto: {attention} attention takes concatenated rows natively")
    return Batching("padded", requested, attention,
                    f"auto: {attention} attention has no per-row kernel for concatenated rows here "
                    "(set sft.batching to length_grouped or padding_free to reduce padding anyway)")


def use_padding_free(trainer: Any, backend: str) -> None:
    """Switch a built SFT trainer to padding-free batches. The trainer is built padded, so that TRL
    prepares the rows exactly as for padded batches (cut to max_length, rows without a trained token
    dropped: it refuses padding_free with max_length at construction); only the collation changes."""
    collator = trainer.data_collator
    if not hasattr(collator, "padding_free"):
        raise TrainingError(f"padding-free batches need TRL's language-modelling collator, and this trainer has "
                            f"{type(collator).__name__}; set sft.batching to padded or length_grouped")
    collator.padding_free = True
    trainer.padding_free = True
    if backend == "unsloth":
        try:  # the row lengths Unsloth's attention kernels read (what it does itself for padding_free=True)
            from unsloth.utils import enable_padding_free_metadata
        except ImportError as exc:
            raise TrainingError("this Unsloth release has no padding-free batches (unsloth.utils."
                                "enable_padding_free_metadata); upgrade it, or set sft.batching to padded") from exc
        enable_padding_free_metadata(trainer.model, trainer)


# ---- trainer -------------------------------------------------------------------------------------
def training_arguments(kind: str, train: TrainParams, out_dir: Path, *, seed: int, device: str, dtype: str,
                       has_eval: bool, eval_on_start: bool = False, beta: float | None = None, precompute_ref: bool = False,
                       batching: str = "padded"):
    """SFTConfig or DPOConfig from the params: the same fields for every backend.

    The evaluation before training runs inside ``train()`` (``eval_on_start``): a ``trainer.evaluate()``
    called before ``train()`` leaves a distributed run's processes unsynchronised (measured: two CPU
    processes ended 0.0067 apart instead of bit-equal)."""
    from trl import DPOConfig, SFTConfig

    on_gpu = device == "cuda"
    report_to = list(train.report_to) or "none"
    args: dict[str, Any] = {
        "output_dir": str(out_dir),
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": train.scheduler,
        "warmup_steps": train.warmup_ratio,  # below 1: a share of the training steps
        "weight_decay": train.weight_decay,
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps or -1,
        "per_device_train_batch_size": train.per_device_batch_size,
        "per_device_eval_batch_size": train.per_device_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_checkpointing": train.gradient_checkpointing,
        "max_length": train.max_length,
        "logging_steps": train.logging_steps,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": train.eval_steps or train.save_steps,
        "eval_on_start": eval_on_start,
        "report_to": report_to,
        "seed": seed,
        "data_seed": seed,
        "include_num_input_tokens_seen": "non_padding",
        # without use_cpu, a CPU run under torchrun/accelerate silently trains unsynchronised copies
        "use_cpu": not on_gpu,
        "bf16": on_gpu and dtype == "bfloat16",
        "fp16": on_gpu and dtype == "float16",
        "dataloader_pin_memory": on_gpu,
        "ddp_find_unused_parameters": False,
        "remove_unused_columns": True,
    }
    if train.gradient_checkpointing:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if batching == "length_grouped":
        args["train_sampling_strategy"] = "group_by_length"
    if kind == "dpo":
        return DPOConfig(beta=beta, loss_type=["sigmoid"], precompute_ref_log_probs=precompute_ref, **args)
    # padding_free is switched on after the trainer is built (use_padding_free); stated here so that
    # Unsloth, which turns it on by itself when it is left unset, keeps the batching chosen
    return SFTConfig(completion_only_loss=True, padding_free=False, **args)


class RecordsFirstBatches:
    """Mixed into the TRL trainer: fingerprints of the first training batches this process trains on
    (a distributed run must give each process different batches)."""

    first_batches: list[str]

    def training_step(self, model, inputs, *args, **kwargs):
        if len(self.first_batches) < FIRST_BATCHES:
            ids = inputs["input_ids"]
            self.first_batches.append(hashlib.sha1(ids.detach().cpu().numpy().tobytes()).hexdigest()[:16])
        return super().training_step(model, inputs, *args, **kwargs)


class RestoresTheTrainedAdapter:
    """Mixed into the TRL trainer. A checkpoint that also holds other adapters in sub-folders (DPO's
    ``ref/``) makes transformers load only those on resume, and the trained adapter at the checkpoint's
    root stays as initialised: the run would go on from untrained weights. Load it as well."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = model if model is not None else self.model
        root = Path(resume_from_checkpoint)
        others = [p for p in root.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file()]
        if others and (root / "adapter_model.safetensors").is_file() and hasattr(target, "load_adapter"):
            active = target.active_adapters[0]
            target.load_adapter(str(root), active, is_trainable=True)
            target.set_adapter(active)


def make_trainer(kind: str, loaded: Any, args: Any, train_set: datasets.Dataset, eval_sets: dict[str, datasets.Dataset],
                 callbacks: tuple = (), batching: str = "padded"):
    from trl import DPOTrainer, SFTTrainer

    if kind == "dpo" and loaded.backend == "unsloth":
        try:  # a no-op in recent Unsloth releases, which patch the RL trainers on import
            from unsloth import PatchDPOTrainer

            PatchDPOTrainer()
        except ImportError:
            pass
    base = DPOTrainer if kind == "dpo" else SFTTrainer
    trainer_class = type(f"Recorded{base.__name__}", (RecordsFirstBatches, RestoresTheTrainedAdapter, base), {})
    extra = {"ref_model": None} if kind == "dpo" else {}
    trainer = trainer_class(model=loaded.model, args=args, train_dataset=train_set, eval_dataset=eval_sets or None,
                            processing_class=loaded.tokenizer, callbacks=list(callbacks), **extra)
    trainer.first_batches = []
    if kind == "sft" and batching == "padding_free":
        use_padding_free(trainer, loaded.backend)
    return trainer


def last_complete_checkpoint(folder: Path, main: bool) -> Path | None:
    """The newest checkpoint that holds every file a resume needs; newer, incomplete ones (a process
    killed while saving) are removed by the main process, as they cannot be resumed from."""
    import re

    checkpoints = sorted((p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()),
                         key=lambda p: int(p.name.split("-")[1]), reverse=True)
    for checkpoint in checkpoints:
        if all((checkpoint / name).is_file() for name in CHECKPOINT_FILES):
            return checkpoint
        if main:
            log.warning("removing incomplete checkpoint %s (missing %s)", checkpoint,
                        [n for n in CHECKPOINT_FILES if not (checkpoint / n).is_file()])
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def sort_adapter_config(folder: Path) -> None:
    """Sort the module lists PEFT keeps as sets: it writes them in hash order, which changes from one
    Python process to the next, so the same adapter would not be the same bytes."""
    for path in folder.rglob("adapter_config.json"):  # DPO also saves its reference adapter in ref/
        config = json.loads(path.read_text(encoding="utf-8"))
        for key in ("target_modules", "exclude_modules"):
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
        path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")  # as PEFT writes it


def checkpoint_is_final(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was saved after the last training step (only saving the adapter was lost)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


# ---- one phase -----------------------------------------------------------------------------------
@dataclass
class PhaseResult:
    """What one phase trained and measured (``metrics.json`` of the variant holds these)."""

    variant: str
    phase: str
    dataset: str
    adapter: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    log_history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "phase": self.phase, "dataset": self.dataset, "adapter": str(self.adapter),
                "metrics": self.metrics, "log_history": self.log_history}


BOOKKEEPING = ("_runtime", "_samples_per_second", "_steps_per_second", "_preparation_time", "num_tokens",
               "num_input_tokens_seen", "epoch", "step")


def named_eval_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """One evaluation's metrics named after its set: ``eval_heldout_loss`` -> ``heldout_loss``. TRL
    logs its own metrics (``eval_rewards/margins``, ``eval_entropy``) without the set's name, so they
    are only told apart by the loss key logged with them, one evaluation per set."""
    names = [key[len("eval_"):-len("_loss")] for key in entry if key.startswith("eval_") and key.endswith("_loss")]
    if len(names) != 1:
        return {}
    name = names[0]
    named = {}
    for key, value in entry.items():
        if not key.startswith("eval_") or key.endswith(BOOKKEEPING):
            continue
        short = key[len("eval_"):]
        named[short if short.startswith(f"{name}_") else f"{name}_{short}"] = value
    return named


def before_after(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The evaluation metrics before and after training, side by side."""
    return {key: {"before": before.get(key), "after": after.get(key)} for key in sorted(set(before) | set(after))}


def train_phase(*, kind: str, variant: str, phase: str, dataset_name: str, params: Params, train: TrainParams,
                model_params: ModelParams, phase_dir: Path, adapter_in: Path | None, callbacks: tuple = (),
                seed: int, rows: datasets.Dataset, screening: RowScreening, heldout: dict[str, Any]) -> PhaseResult:
    """Train one phase on ``rows`` (its training set without the rows ``screening`` dropped) into
    ``phase_dir`` (resuming from its newest complete checkpoint), the questions of ``heldout`` (a
    :func:`heldout_record`) held out, save its adapter to ``phase_dir/adapter`` and return its metrics.
    A phase already done is read back."""
    rank, world = process_rank()
    main = rank == 0
    adapter_dir = phase_dir / "adapter"
    metrics_path = phase_dir / "metrics.json"
    if (adapter_dir / "adapter_config.json").is_file() and metrics_path.is_file():
        done = json.loads(metrics_path.read_text(encoding="utf-8"))
        return PhaseResult(variant, phase, dataset_name, adapter_dir, done["metrics"], done["log_history"])

    train_set, heldout_set = split_off(rows, [tuple(key) for key in heldout["keys"]])
    eval_sets: dict[str, Any] = {"heldout": heldout_set} if heldout_set is not None else {}
    if kind == "dpo" and params.dpo.reward_check_pairs:
        count = min(params.dpo.reward_check_pairs, len(train_set))
        eval_sets["train_sample"] = train_set.shuffle(seed=derive_seed(seed, "reward-check") % 2**32).select(range(count))

    # lengths first, with the tokenizer alone: a set that cannot train stops before the model loads
    from reflectevo.models import load_tokenizer

    tokenizer = load_tokenizer(model_params)
    lengths = row_lengths(tokenizer, train_set, ("chosen", "rejected") if kind == "dpo" else ("completion",))
    too_long = sum(length > train.max_length for length in lengths)
    dropped = 0
    if kind == "dpo":  # TRL drops a pair whose prompt alone fills max_length (nothing of it would be trained)
        dropped = sum(length >= train.max_length for length in prompt_lengths(tokenizer, train_set))
        if dropped == len(train_set):
            raise TrainingError(f"every prompt of {dataset_name} is at least dpo.max_length ({train.max_length}) tokens "
                                "long, so TRL would drop every pair; raise dpo.max_length")

    loaded = prepare_model(model_params, train.lora, train.gradient_checkpointing, seed, adapter=adapter_in)
    tokenizer = loaded.tokenizer
    phase_dir.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(phase_dir, main)
    batching = (choose_batching(getattr(train, "batching", "padded"), loaded) if kind == "sft" else
                Batching("padded", "padded", attention_implementation(loaded), "TRL's DPO trainer pads its batches"))
    args = training_arguments(kind, train, phase_dir, seed=seed, device=loaded.device, dtype=loaded.dtype,
                              has_eval=bool(eval_sets), eval_on_start=bool(eval_sets) and resume is None,
                              beta=getattr(train, "beta", None),
                              precompute_ref=getattr(train, "precompute_ref_log_probs", False),
                              batching=batching.mode)
    trainer = make_trainer(kind, loaded, args, train_set, eval_sets, callbacks, batching=batching.mode)

    tokens_at_start = 0
    if resume is not None:
        tokens_at_start = json.loads((resume / "trainer_state.json").read_text())["num_input_tokens_seen"]
    if resume is not None and checkpoint_is_final(resume):
        # killed after the last step was saved: the Trainer, resumed from its final checkpoint, would run
        # one step more, so load that checkpoint's weights and state and go on to evaluation and saving
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        trainer._load_from_checkpoint(str(resume))
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        output = TrainOutput(trainer.state.global_step, 0.0, {"train_runtime": 0.0})
    else:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # "before" is the evaluation at step 0 (eval_on_start), kept in the trainer state through a resume
    before = {key: value for entry in trainer.state.log_history if entry.get("step") == 0
              for key, value in named_eval_metrics(entry).items()}
    after: dict[str, float] = {}
    for name, eval_set in eval_sets.items():  # one evaluation per set, so that TRL's metrics keep their set
        after.update(named_eval_metrics(trainer.evaluate(eval_dataset=eval_set, metric_key_prefix=f"eval_{name}")))

    # the adapter appears whole: saved under a temporary name, then renamed by the main process
    partial = phase_dir / ".adapter.partial"
    if main:
        shutil.rmtree(partial, ignore_errors=True)
    trainer.save_model(str(partial))
    if main:
        sort_adapter_config(partial)
    digest = lora_digest(trainer.model)
    state = trainer.state
    tokens = state.num_input_tokens_seen  # every token trained on, before a resume too
    seconds = output.metrics["train_runtime"]
    # the Trainer's own train_loss averages only the steps of this process over all steps, so after a
    # resume it is too low; the mean of the logged losses (kept in checkpoints) is the same either way
    logged = [entry["loss"] for entry in state.log_history if "loss" in entry]
    metrics = {
        "kind": kind, "variant": variant, "phase": phase, "dataset": dataset_name,
        "rows": {"in_training_set": screening.rows, "kept": len(rows), "train": len(train_set),
                 "heldout": len(heldout_set) if heldout_set is not None else 0,
                 "train_questions": len(question_keys(train_set))},
        "rows_dropped": screening.counts(), "rows_dropped_examples": screening.examples,
        "heldout_questions": heldout,
        "rows_longer_than_max_length": too_long, "max_length": train.max_length,
        "pairs_dropped_prompt_too_long": dropped if kind == "dpo" else None,
        "row_tokens": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "steps": state.global_step, "epochs": round(state.epoch or 0.0, 3),
        "resumed_from": resume.name if resume else None,
        "train_seconds": round(seconds, 2), "tokens": tokens,
        "tokens_per_s": round((tokens - tokens_at_start) / seconds, 1) if seconds else None,
        "world_size": world, "backend": loaded.backend, "device": loaded.device, "dtype": loaded.dtype,
        "batching": batching.to_dict(),
        "train_loss": sum(logged) / len(logged) if logged else None,  # mean of the logged training losses
        "evaluation": before_after(before, after),
        "adapter_sha256_of_tensors": digest, "seed": seed,
        "model": loaded.name, "model_source": loaded.source, "started_from_adapter": str(adapter_in) if adapter_in else None,
    }
    ranks = phase_dir / "ranks"
    ranks.mkdir(exist_ok=True)
    atomic_write_json(ranks / f"rank-{rank}.json", {
        "rank": rank, "world_size": world, "distributed_type": str(trainer.accelerator.distributed_type),
        "backend": _process_group_backend(), "first_batches": trainer.first_batches,
        "adapter_sha256_of_tensors": digest, "torch_threads": _threads()})
    # without the Trainer's end-of-training summary: wall-clock figures (in the metrics above) and a
    # train_loss of this process's steps only, which a resumed run would report differently
    history = [dict(entry) for entry in state.log_history if not ("train_loss" in entry and "loss" not in entry)]
    if main:
        tokenizer.save_pretrained(str(partial))
        replace_directory(partial, adapter_dir)
        atomic_write_json(metrics_path, {"metrics": metrics, "log_history": history})
    trainer.accelerator.wait_for_everyone()
    del trainer, loaded
    _free_memory()
    return PhaseResult(variant, phase, dataset_name, adapter_dir, metrics, history)


def _process_group_backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- variants and stages -------------------------------------------------------------------------
def model_card(*, stage: str, variant: str, params: Params, base: str, base_name: str, results: list[PhaseResult],
               identity: str, later_phases: Sequence[str] = ()) -> str:
    """A short README.md for an adapter folder: what it was trained from, on what, and how to load it.
    ``later_phases`` names the phases the variant went on to train after this adapter's last one."""
    from reflectevo import __version__

    section = stage_kind(stage)
    train = stage_section(params, stage)
    last = results[-1].metrics
    title = f"# reflectevo {section.upper()} adapter: {variant}"
    lines = [f"{title}, after phase {results[-1].phase}" if later_phases else title, ""]
    if later_phases:
        lines += [f"The adapter of {variant} after its {results[-1].phase} phase; the variant's final adapter, in "
                  f"`adapter/` beside this folder, continued it through {', '.join(later_phases)}.", ""]
    lines += [
        f"- base model: `{base}` (backend {last['backend']}, {last['dtype']})",
        (f"- LoRA: r {train.lora.r}, alpha {train.lora.alpha}, dropout {train.lora.dropout}, "
         f"targets {', '.join(train.lora.target_modules)}"),
        (f"- run `{params.run.name}`, seed {params.run.seed}; hash of the params this stage reads (run.seed, model, "
         f"{section}) `{params.section_hash(['run.seed', 'model', section])[:16]}`; stage identity `{identity[:16]}`"),
        f"- reflectevo {__version__}",
        "",
        "| phase | training set | train rows | held-out rows | dropped rows | steps | tokens/s | held-out loss before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        m = result.metrics
        loss = m["evaluation"].get("heldout_loss", {})
        dropped = ", ".join(f"{reason} {count}" for reason, count in m.get("rows_dropped", {}).items() if count) or "0"
        lines.append(f"| {result.phase} | {result.dataset} | {m['rows']['train']} | {m['rows']['heldout']} | {dropped} | "
                     f"{m['steps']} | {m['tokens_per_s']} | {_fmt(loss.get('before'))} | {_fmt(loss.get('after'))} |")
    lines += [
        "",
        "Use it in a reflectevo params file:",
        "",
        "```yaml",
        f"model: {{name: {base_name}, adapter: path/to/this/folder}}",
        "```",
        "",
        "or with PEFT: `PeftModel.from_pretrained(base_model, 'path/to/this/folder')`.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def adapter_folders(phases: Sequence[tuple[str, str]]) -> dict[str, str]:
    """phase -> the folder of its adapter in the variant's folder: ``adapter`` for the last phase (the
    variant's final adapter), ``<phase>_adapter`` for each earlier one (two_stage: ``reflection_adapter``)."""
    return {phase: "adapter" if index == len(phases) - 1 else f"{phase}_adapter" for index, (phase, _) in enumerate(phases)}


def train_variant(*, stage: str, variant: str, params: Params, stage_dir: Path, identity: str, model_params: ModelParams,
                  base_description: str, callbacks: tuple = ()) -> list[PhaseResult]:
    """Every phase of one variant, then its adapters (and merged model) in ``stage_dir/variant``: the
    final one in ``adapter/``, an earlier phase's in ``<phase>_adapter/`` (:func:`adapter_folders`)."""
    kind = stage_kind(stage)
    train = stage_section(params, stage)
    phases = stage_variants(params, stage)[variant]
    main = process_rank()[0] == 0
    variant_dir = stage_dir / variant
    sets = {name: screened_set(params, name, in_memory=True) for _, name in phases}
    # one draw for the whole variant, by a seed that names no phase: every phase holds out the same questions
    heldout_seed = derive_seed(params.run.seed, stage, variant, "heldout") % 2**31
    heldout = heldout_record(heldout_questions([rows for rows, _ in sets.values()], train.eval_fraction, heldout_seed),
                             list(sets), heldout_seed)
    results: list[PhaseResult] = []
    adapter_in: Path | None = None
    for phase, dataset_name in phases:
        seed = derive_seed(params.run.seed, stage, variant, phase) % 2**31  # numpy and the Trainer take 32-bit seeds
        rows, screening = sets[dataset_name]
        result = train_phase(kind=kind, variant=variant, phase=phase, dataset_name=dataset_name, params=params, train=train,
                             model_params=model_params, phase_dir=variant_dir / f"train-{identity[:12]}" / phase,
                             adapter_in=adapter_in, callbacks=callbacks, seed=seed, rows=rows, screening=screening,
                             heldout=heldout)
        results.append(result)
        adapter_in = result.adapter
    if main:
        folders = adapter_folders(phases)
        phase_names = [phase for phase, _ in phases]
        for index, result in enumerate(results):
            later = phase_names[index + 1:]
            card = model_card(stage=stage, variant=variant, params=params, base=base_description, base_name=model_params.name,
                              results=results[:index + 1], identity=identity, later_phases=later)
            with atomic_directory(variant_dir / folders[result.phase]) as folder:
                shutil.copytree(result.adapter, folder, dirs_exist_ok=True)
                (folder / "README.md").write_text(card, encoding="utf-8")
        atomic_write_json(variant_dir / "metrics.json", {"variant": variant, "adapters": folders,
                                                         "phases": [r.to_dict() for r in results]})
        if train.save_merged:
            merge_adapter(model_params, variant_dir / "adapter", variant_dir / "merged", card)
    return results


def dpo_start(params: Params, run: RunDir, main: bool) -> tuple[ModelParams, str]:
    """The model DPO starts from: the base, or an SFT variant's adapter merged into 16-bit weights
    (kept in ``dpo/start/<mode>-<identity>/``), loaded as configured (in 4 bits for a 4-bit recipe),
    so that the frozen reference, the policy with its DPO adapter disabled, is that SFT model."""
    mode = params.dpo.start_from
    if mode == "base":
        return params.model, params.model.name
    entry = run.manifest().get("stages", {}).get("03_sft", {})
    adapter = params.run_dir / "sft" / mode / "adapter"
    if entry.get("status") != "done" or not (adapter / "adapter_config.json").is_file():
        raise TrainingError(f"dpo.start_from is {mode!r}, but stage 03_sft has not finished with that variant in "
                            f"{params.run_dir} (no {adapter}); run stage 03 first (reflectevo run PARAMS --from 03)")
    merged = params.run_dir / "dpo" / "start" / f"{mode}-{entry['identity'][:12]}"
    if main and not (merged / "config.json").is_file():
        merge_adapter(params.model, adapter, merged,
                      f"# {params.model.name} + SFT adapter {mode}, merged for DPO\n\nSFT stage identity {entry['identity']}\n")
    wait_for(merged / "config.json", "the merged SFT model")
    return params.model.model_copy(update={"name": str(merged), "adapter": None}), f"{merged} ({params.model.name} + SFT {mode})"


@dataclass
class StageSummary:
    """What a training stage produced: one row per phase (``table``) and the paths it wrote."""

    stage: str
    results: list[PhaseResult]
    outputs: list[Path]
    figures: list[Path]

    def table(self):
        import pandas as pd

        rows = []
        for result in self.results:
            m = result.metrics
            row = {"variant": result.variant, "phase": result.phase, "train rows": m["rows"]["train"],
                   "held-out rows": m["rows"]["heldout"], "steps": m["steps"], "train loss": m["train_loss"],
                   "tokens/s": m["tokens_per_s"], "longer than max_length": m["rows_longer_than_max_length"]}
            row.update({f"dropped: {reason}": count for reason, count in m.get("rows_dropped", {}).items()})
            for key, values in m["evaluation"].items():
                if key.endswith(("loss", "rewards/accuracies", "rewards/margins")):
                    row[f"{key} before"] = values["before"]
                    row[f"{key} after"] = values["after"]
            rows.append(row)
        return pd.DataFrame(rows)

    def manifest_entry(self) -> dict[str, Any]:
        entry = {}
        for r in self.results:
            phase = {k: v for k, v in r.metrics.items() if k in (
                "rows", "rows_dropped", "steps", "epochs", "tokens", "tokens_per_s", "train_seconds", "train_loss",
                "evaluation", "resumed_from", "rows_longer_than_max_length", "world_size", "backend", "batching")}
            if "heldout_questions" in r.metrics:  # which questions: metrics.json lists them, the manifest their digest
                phase["heldout_questions"] = {k: v for k, v in r.metrics["heldout_questions"].items() if k != "keys"}
            entry[f"{r.variant}/{r.phase}"] = phase
        return entry


def run_training_stage(stage: str, params: Params, rundir: RunDir | None = None, *, callbacks: tuple = (),
                       params_file: str | Path | None = None) -> StageSummary:
    """Train every variant of a stage ("03_sft" or "04_dpo") and record it in the run's manifest.

    Pass the notebook's open ``rundir``; without one the run is opened here (and closed at the end).
    Under ``accelerate launch`` / ``torchrun`` only the main process writes the manifest, the figures
    and the final adapters; every process trains.
    """
    from reflectevo import plots

    kind = stage_kind(stage)
    variants = list(stage_variants(params, stage))
    main = process_rank()[0] == 0
    _check_loggers(stage_section(params, stage))
    training_plan(params, stage)  # every training set must be there and non-empty before any model loads

    opened_here = rundir is None and main
    if opened_here:
        rundir = open_run(params, params_file=params_file, command=f"reflectevo train {kind}")
    run = rundir if rundir is not None else RunDir(params, params.run_dir)  # other ranks: read-only, no lock
    try:
        stage_run = run.begin_stage(stage) if main else None
        identity = stage_run.identity if stage_run else run.stage_identity(stage)
        stage_dir = params.run_dir / get_stage(stage).folder
        model_params, base = (params.model, params.model.name) if kind == "sft" else dpo_start(params, run, main)
        results = []
        for variant in variants:
            results += train_variant(stage=stage, variant=variant, params=params, stage_dir=stage_dir, identity=identity,
                                     model_params=model_params, base_description=base, callbacks=callbacks)
        figures: list[Path] = []
        outputs = [stage_dir / variant / name for variant in variants
                   for name in (*adapter_folders(stage_variants(params, stage)[variant]).values(), "metrics.json")]
        if main:
            history = plots.training_history([r.to_dict() for r in results])
            fmt, dpi = params.analysis.figure_format, params.analysis.dpi
            drawers = [("loss", plots.training_loss)] + ([("rewards", plots.dpo_rewards)] if kind == "dpo" else [])
            for name, draw in drawers:
                path = run.figures / f"{stage}_{name}.{fmt}"
                plots.close(draw(history, path, dpi=dpi))
                figures.append(path)
            summary = StageSummary(stage, results, outputs, figures)
            stage_run.finish(outputs=[*outputs, *figures], training=summary.manifest_entry(), base_model=base)
        return StageSummary(stage, results, outputs, figures)
    except BaseException as exc:
        if main and rundir is not None and not isinstance(exc, KeyboardInterrupt):
            run.mark_stage_failed(stage, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if opened_here:
            rundir.close()


def _check_loggers(train: TrainParams) -> None:
    import importlib.util

    for logger in train.report_to:
        if importlib.util.find_spec(logger) is None:
            raise TrainingError(f"report_to lists {logger}, which is not installed: pip install {logger}, "
                                "or remove it from report_to")


def run_sft(params: Params, rundir: RunDir | None = None, **kwargs: Any) -> StageSummary:
    """Stage 03: every mode of ``sft.modes`` into ``outputs/<run>/sft/<mode>/``."""
    return run_training_stage("03_sft", params, rundir, **kwargs)


def run_dpo(params: Params, rundir: RunDir | None = None, **kwargs: Any) -> StageSummary:
    """Stage 04: every pair type of ``dpo.pairs`` into ``outputs/<run>/dpo/<pairs>/``."""
    return run_training_stage("04_dpo", params, rundir, **kwargs)
