"""The params schema: one YAML file per recipe, nested by stage, validated before any model loads.

Every default lives here, in the classes below, and nowhere else (not in notebook cells). A params
file only states what differs from these defaults; a section it leaves out gets the defaults, and a
section it states gets the defaults for the keys it leaves out. Unknown keys, wrong types and
impossible values are rejected with the key path and, for a misspelt key, a "did you mean".

    params = load_params("params/quickstart.yaml")              # a file
    params = load_params(None, {"data": {"tasks": ["logiqa"]}})  # sections, as papermill injects them
    params.data.tasks, params.hash(), params.section_hash(["data", "run.seed"])

papermill replaces whole top-level sections, so :func:`load_params` does the same: a non-empty
section passed in ``sections`` replaces that section of the file entirely.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from reflectevo.core.checks import did_you_mean, reject_duplicates
from reflectevo.core.seeds import canonical_hash
from reflectevo.core.yamlfile import read_sections
from reflectevo.errors import ConfigError
from reflectevo.prompts import check_instruction_keys
from reflectevo.tasks import task_names

SECTIONS = ("run", "model", "generation", "data", "reflect", "sft", "dpo", "eval", "analysis", "evolve")
TASK_NAMES = ("logiqa", "math", "mbpp", "bigbench")  # checked against the task registry in load_params
SFT_MODES = ("one_stage", "two_stage", "qa_pairs")
DPO_PAIRS = ("d_pm", "d_pref")


class Section(BaseModel):
    # NaN and infinity are never a meaningful setting (an infinite temperature or epoch count fails late, in torch)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _int_fits_in_64_bits(cls, value: Any) -> Any:
        # counts and sizes end up in torch, numpy and tokenizers, which overflow beyond 64 bits
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ValueError(f"is too large for a 64-bit integer (got {value:.3g})")
        return value


# ---- run ---------------------------------------------------------------------------------------
class RunParams(Section):
    name: str = "default"  # outputs/<name>/ holds everything the run writes
    seed: int = Field(0, ge=0)  # the one seed every stage derives its own seeds from
    output_dir: str = "outputs"  # relative to the working directory
    # MBPP is graded by running model-written code in the sandbox (reflectevo.sandbox): an explicit opt-in
    allow_code_execution: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError(
                "must be a folder name: letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        return value


# ---- model -------------------------------------------------------------------------------------
class ModelParams(Section):
    # A hub id or local folder, or a built-in stand-in: builtin:tiny (trained locally on CPU in
    # about 5 minutes, for demos and tests), builtin:random-1b, builtin:random-8b (random weights,
    # for speed and memory measurements only).
    name: str = "builtin:tiny"
    backend: Literal["auto", "unsloth", "transformers"] = "auto"  # auto: Unsloth on a CUDA GPU when installed
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    load_in_4bit: bool = False  # QLoRA-style NF4 weights (needs bitsandbytes and a CUDA GPU)
    adapter: str | None = None  # a LoRA adapter folder to load on top of the base model
    chat_template: str | None = None  # explicit fallback template for a base model that has none
    max_seq_length: int = Field(2048, ge=32)
    revision: str | None = None
    trust_remote_code: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _four_bit_needs_a_gpu_model(self) -> ModelParams:
        if self.load_in_4bit and self.device == "cpu":
            raise ValueError("load_in_4bit needs a CUDA GPU; set device: auto or cuda, or load_in_4bit: false")
        return self


# ---- generation --------------------------------------------------------------------------------
class GenerationParams(Section):
    # transformers (default), unsloth (its inference path), replay (stored outputs by record key),
    # vllm (optional extra); auto = unsloth when the model loaded through Unsloth, else transformers.
    engine: Literal["auto", "transformers", "unsloth", "replay", "vllm"] = "auto"
    batch_size: int | Literal["auto"] = 16  # sequences per batch; auto is computed once and recorded
    max_new_tokens: int = Field(256, ge=1)  # per attempt (reflections have their own limit)
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy, the paper's setting for answers
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    replay_from: str | None = None  # JSONL of stored outputs, for engine: replay
    num_shards: int = Field(1, ge=1)  # split a generation stage into whole-batch shards ...
    shard_index: int = Field(0, ge=0)  # ... and run only this one
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    vllm_tensor_parallel_size: int = Field(1, ge=1)  # engine vllm: GPUs one model is split over, from one process

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be a positive integer or 'auto'")
        return value

    @model_validator(mode="after")
    def _shard_in_range(self) -> GenerationParams:
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be below num_shards {self.num_shards}")
        if self.engine == "replay" and not self.replay_from:
            raise ValueError("engine: replay needs replay_from, the JSONL file of stored outputs")
        return self


# ---- data --------------------------------------------------------------------------------------
class SplitSizes(Section):
    train: int | None = Field(None, ge=1)
    validation: int | None = Field(None, ge=1)
    test: int | None = Field(None, ge=1)


class SplitFractions(Section):
    train: float = Field(0.8, ge=0.0, le=1.0)
    validation: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.1, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must sum to 1, got {total:g}")
        return self


class DataParams(Section):
    tasks: list[str] = Field(default_factory=lambda: list(TASK_NAMES), min_length=1)
    # Where items come from: samples (built-in, fixed roles), official (the paper's 500-item test
    # files in official_dir, split by split_fractions), hub (the datasets a user would name).
    source: Literal["samples", "official", "hub"] = "samples"
    # A different source for the test split only; paper replication: source hub, test_source official.
    test_source: Literal["samples", "official", "hub"] | None = None
    official_dir: str | None = None  # folder with <task>_test.jsonl from the paper's repository
    check_sha256: bool = True  # refuse official files that differ from the paper's commit 6634f923
    max_items: SplitSizes = Field(default_factory=SplitSizes)  # per task and split, after a seeded shuffle
    split_fractions: SplitFractions = Field(default_factory=SplitFractions)  # for sources without splits
    hub_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per task, passed to load_hub
    # The contamination guard: drop every train and validation item whose content matches a test item of
    # its task (reflectevo.data.prepare.content_keys), whatever the sources; drops are counted in
    # data/summary.json, the manifest and the report. false keeps them, and says so in the same places.
    decontaminate: bool = True
    # Tasks allowed to have no items in the evaluated split (eval.split): they are left out of evaluation,
    # and the exclusion is recorded. Any other task of `tasks` with no such items stops stage 01.
    allow_empty_eval: list[str] = Field(default_factory=list)

    @field_validator("tasks")
    @classmethod
    def _known_unique_tasks(cls, value: list[str]) -> list[str]:
        known = task_names()
        for name in value:
            if name not in known:
                raise ValueError(f"unknown task {name!r}{did_you_mean(name, known)}; known tasks: {', '.join(known)}")
        return reject_duplicates(value, "a task")

    @model_validator(mode="after")
    def _official_needs_a_folder(self) -> DataParams:
        if "official" in (self.source, self.test_source) and not self.official_dir:
            raise ValueError("source or test_source 'official' needs official_dir, the folder with <task>_test.jsonl")
        unknown = sorted(set(self.hub_options) - set(self.tasks))
        if unknown:
            raise ValueError(f"hub_options names task(s) {unknown} that are not in tasks {self.tasks}")
        reject_duplicates(self.allow_empty_eval, "a task of allow_empty_eval")
        unknown = sorted(set(self.allow_empty_eval) - set(self.tasks))
        if unknown:
            raise ValueError(f"allow_empty_eval names task(s) {unknown} that are not in tasks {self.tasks}")
        return self


# ---- reflect (notebook 02) -----------------------------------------------------------------------
class JudgeParams(Section):
    kind: Literal["self", "local", "openai"] = "self"  # self: no distillation from a superior model
    model: str | None = None  # for kind local: a model name or folder; for openai: the model id
    url: str | None = None  # for kind openai: the base URL of an OpenAI-compatible endpoint (…/v1)
    api_key_env: str = "OPENAI_API_KEY"  # for kind openai: the environment variable holding the key, if any
    both_orders: bool = True  # judge every pair as (A, B) and (B, A); only agreeing verdicts make a pair
    max_pairs_per_question: int = Field(16, ge=1)  # pairs of successful reflections judged per question (seeded choice)
    # room for a judge that explains before its verdict line (as instruct models do); a reply cut off by it has no
    # verdict, and is counted in counts.json by its finish reason (judge_unparsed_length)
    max_new_tokens: int = Field(512, ge=1)
    timeout_s: float = Field(120.0, gt=0)  # for kind openai: per request

    @model_validator(mode="after")
    def _needs(self) -> JudgeParams:
        if self.kind == "local" and not self.model:
            raise ValueError("judge kind 'local' needs model")
        if self.kind == "openai" and not (self.url and self.model):
            raise ValueError("judge kind 'openai' needs url and model")
        return self


class ReflectParams(Section):
    split: Literal["train", "validation", "test"] = "train"  # the split reflections are generated on
    fewshots: int = Field(3, ge=0, le=3)  # worked examples in the attempt prompt (0 for tiny models)
    attempt_calls: Literal[1, 2] = 1  # 2 reproduces the paper's thought call then action call
    # call 2 of a two-call attempt pre-filled up to "Action:" (the paper), or through the task's answer syntax
    # ("answer": "Action: Finish[" ...): a small model that ignores the format then only picks the answer
    attempt_prefill: Literal["action", "answer"] = "action"
    grader: Literal["official", "robust"] = "official"
    instructions: Literal["all", "random_k"] | list[str] = "random_k"  # or a fixed list of instruction keys
    instructions_k: int = Field(2, ge=1, le=32)
    samples_per_instruction: int = Field(2, ge=1)
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(512, ge=1)
    second_trial: Literal["reflection", "reflection_and_attempt"] = "reflection_and_attempt"
    judge: JudgeParams = Field(default_factory=JudgeParams)
    # the reflection prompt of the training datasets: "generic" (the test-time prompt, so a reflector is
    # trained and evaluated on one template) or "as_generated" (the instruction-bearing prompt, as the paper's SFT)
    training_prompt: Literal["generic", "as_generated"] = "generic"

    @field_validator("instructions")
    @classmethod
    def _known_instruction_keys(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            check_instruction_keys(value)
        return value

    @model_validator(mode="after")
    def _sampling(self) -> ReflectParams:
        if self.attempt_prefill == "answer" and self.attempt_calls != 2:
            raise ValueError("attempt_prefill 'answer' pre-fills call 2 of a two-call attempt: set attempt_calls: 2")
        if self.samples_per_instruction > 1 and self.temperature == 0:
            raise ValueError("samples_per_instruction > 1 needs temperature > 0 (greedy samples are identical)")
        return self


# ---- sft and dpo (notebooks 03, 04) ----------------------------------------------------------------
class LoraParams(Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"], min_length=1)


class TrainParams(Section):
    lora: LoraParams = Field(default_factory=LoraParams)
    learning_rate: float = Field(1e-3, gt=0.0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"  # decay after the warm-up
    epochs: float = Field(5.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set (smoke runs)
    per_device_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    max_length: int = Field(2048, ge=32)  # tokens of prompt + completion; longer rows are counted and cut
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    gradient_checkpointing: bool = True
    # held-out share of the *questions* (all rows of a question stay on one side), for the held-out
    # loss before and after training; 0 turns evaluation off
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(50, ge=1)  # a checkpoint (adapter, optimizer, scheduler, RNG) every N optimizer steps
    save_total_limit: int = Field(2, ge=1)  # checkpoints kept; a rerun resumes from the newest complete one
    eval_steps: int | None = Field(None, ge=1)  # held-out loss every N steps; None: at save_steps
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"]
    )  # [] logs to files only
    save_merged: bool = False  # also save base + adapter merged into 16-bit weights (never into 4-bit ones)

    @field_validator("report_to")
    @classmethod
    def _unique_loggers(cls, value: list[str]) -> list[str]:
        return reject_duplicates(value, "a logger")


class SFTParams(TrainParams):
    modes: list[Literal["one_stage", "two_stage", "qa_pairs"]] = Field(
        default_factory=lambda: ["one_stage"], min_length=1
    )
    # How rows make batches: padded (each batch padded to its longest row), length_grouped (rows of similar
    # length batched together, then padded), padding_free (each batch's rows concatenated, no padding, the
    # same rows and loss as padded), auto (padding_free where the attention kernel takes concatenated rows
    # natively: Unsloth, or flash attention on a CUDA GPU; else padded). See params/README.md.
    batching: Literal["auto", "padded", "length_grouped", "padding_free"] = "auto"

    @field_validator("modes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return reject_duplicates(value, "a mode")


class DPOParams(TrainParams):
    pairs: list[Literal["d_pm", "d_pref"]] = Field(default_factory=lambda: ["d_pm"], min_length=1)
    # the policy to start from: the base model, or an SFT variant of stage 03 (its adapter is merged
    # into 16-bit weights first, so that the frozen reference is that SFT model)
    start_from: Literal["base", "one_stage", "two_stage", "qa_pairs"] = "base"
    beta: float = Field(0.01, gt=0.0)
    precompute_ref_log_probs: bool = False  # one reference pass before training instead of one per step
    # training pairs on which the implicit reward accuracy and margin are measured before and after training
    reward_check_pairs: int = Field(256, ge=0)
    learning_rate: float = Field(5e-7, gt=0.0)
    scheduler: Literal["linear", "cosine", "constant"] = "cosine"
    epochs: float = Field(1.0, gt=0.0)
    per_device_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(32, ge=1)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)

    @field_validator("pairs")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return reject_duplicates(value, "a pair type")


# ---- eval, analysis, evolve (notebooks 05, 06; self-evolution) ---------------------------------------
EVAL_PROTOCOLS = ("oracle", "oracle_free", "self_verify")
BASELINES = ("retry", "base")  # the paper's prompt baselines: retry without reflection; prompted reflection
# two-stage SFT with the adapter of its reflection phase as the reflector (reflectevo.evaluation)
TWO_STAGE_REFLECTION_PHASE = "sft/two_stage:reflection_phase"


class EvalParams(Section):
    split: Literal["validation", "test"] = "test"
    # what to evaluate: "trained" = the two prompt baselines (retry: the untrained model answers again without
    # reflecting; base: it reflects first) and every variant stages 03 and 04 trained in this run; or a list
    # of names from: retry, base, sft/one_stage, sft/two_stage, sft/two_stage:reflection_phase, sft/qa_pairs,
    # dpo/d_pm, dpo/d_pref
    variants: Literal["trained"] | list[str] = "trained"
    # two-stage SFT trains a reflection phase, then continues that adapter on corrections: which adapter
    # reflects at test time. final: the final one (sft/two_stage); reflection_phase: the reflection phase's
    # (sft/two_stage:reflection_phase, the final adapter still answers the second turn); both: both variants
    two_stage_reflector: Literal["both", "final", "reflection_phase"] = "both"
    # oracle: the paper's (the grader decides who reflects and the reflector is told the answer was wrong);
    # oracle_free: every answer is reviewed with a prompt that does not say whether it was right;
    # self_verify: the model judges its own answer first and reflects only when it finds it wrong
    protocols: list[Literal["oracle", "oracle_free", "self_verify"]] = Field(
        default_factory=lambda: ["oracle", "oracle_free"], min_length=1
    )
    # the graders every answer is scored by; the oracle protocol runs once per grader, gated by that grader
    # (its verdict decides who reflects and its feedback is shown), and is scored by that grader only
    graders: list[Literal["official", "robust"]] = Field(default_factory=lambda: ["official", "robust"], min_length=1)
    # 1: one call per attempt, ending at the action line; 2: the paper's two calls (the thought, then the
    # action with the thought given). Null (the default): as reflect.attempt_calls
    attempt_calls: Literal[1, 2] | None = None
    attempt_prefill: Literal["action", "answer"] | None = None  # as reflect.attempt_prefill; null: take that one
    # Settings that shape a training input and the matching test input must agree: reflect.fewshots and
    # eval.fewshots, reflect.second_trial and eval.second_trial, reflect.attempt_calls and eval.attempt_calls
    # (each eval one, left null, takes the reflect one), and reflect.grader must be one of eval.graders (its
    # feedback text is what the training rows show). List here the ones this recipe means to differ; the
    # evaluation record then states them.
    allow_mismatch: list[Literal["fewshots", "second_trial", "attempt_calls", "attempt_prefill", "grader"]] = Field(
        default_factory=list
    )
    # The roles. first_turn: "base" answers every first turn once, shared by all variants, so Acc@t1 is
    # comparable (the paper's table); "variant" lets each variant answer its own. The reflector is always
    # the variant (the untrained model for the baselines). Who answers the second turn after a trained
    # reflector: two-stage SFT trained the correction too; DPO trained only reflections. One-stage SFT
    # writes its new answer in the same output as its reflection; SFT on QA pairs has no second turn.
    first_turn: Literal["base", "variant"] = "base"
    second_turn_after_sft: Literal["base", "variant"] = "variant"
    second_turn_after_dpo: Literal["base", "variant"] = "base"
    # with the failed attempt (the paper's setting 2) or the reflection alone; null: as reflect.second_trial
    second_trial: Literal["reflection", "reflection_and_attempt"] | None = None
    fewshots: int | None = Field(None, ge=0, le=3)  # worked examples in attempt prompts; null: as reflect.fewshots
    max_new_tokens: int = Field(512, ge=1)  # per attempt
    reflection_max_new_tokens: int = Field(512, ge=1)  # per reflection, review or self-verification
    bootstrap_samples: int = Field(1000, ge=0)  # for confidence intervals and paired tests; 0 turns them off
    confidence: float = Field(0.95, gt=0.5, lt=1.0)

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            known = [
                *BASELINES,
                *(f"sft/{m}" for m in SFT_MODES),
                TWO_STAGE_REFLECTION_PHASE,
                *(f"dpo/{p}" for p in DPO_PAIRS),
            ]
            if not value:
                raise ValueError("list at least one variant, or use 'trained'")
            for name in value:
                if name not in known:
                    raise ValueError(f"unknown variant {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}")
            reject_duplicates(value, "a variant")
        return value

    @field_validator("protocols", "graders", "allow_mismatch")
    @classmethod
    def _unique_entries(cls, value: list[str]) -> list[str]:
        return reject_duplicates(value, "an entry")

    @model_validator(mode="before")
    @classmethod
    def _gate_grader_was_removed(cls, value: Any) -> Any:
        if isinstance(value, dict) and "gate_grader" in value:
            raise ValueError(
                "gate_grader was removed: the oracle protocol now runs once per grader of eval.graders, "
                "gated by that grader and scored by it; delete gate_grader (to gate by one grader only, "
                "list only that one in eval.graders)"
            )
        return value


class AnalysisParams(Section):
    figure_format: Literal["png", "svg", "pdf"] = "png"
    dpi: int = Field(120, ge=50, le=600)


GENERATOR_CHOICES = ("best_on_validation", *(f"sft/{m}" for m in SFT_MODES), *(f"dpo/{p}" for p in DPO_PAIRS))


class EvolveParams(Section):
    # 1: the plain layout (outputs/<run>/data, reflect, ...); N >= 2: stage 01 once, then stages 02-05 once per
    # round into outputs/<run>/round_<k>/, then stage 06 once over every round
    rounds: int = Field(1, ge=1)
    # the trained variant of round k whose adapter, merged into the base weights, generates (and is trained
    # further in) round k+1: best_on_validation (the highest validation Acc@t2 under `protocol`) or a name
    generator: str = "best_on_validation"
    # what round k trains on: fresh (only what round k generated) or accumulate (rounds 1..k, de-duplicated)
    data: Literal["fresh", "accumulate"] = "fresh"
    # the protocol of the validation Acc@t2 that chooses the generator and drives stop_margin, and of the
    # stability table; oracle_free, because under the oracle a worse first answer makes correction look better
    protocol: Literal["oracle", "oracle_free", "self_verify"] = "oracle_free"
    # stop after round k (k >= 2) when its validation Acc@t2 rose by less than this over round k-1; null: run every round
    stop_margin: float | None = Field(None, ge=-1.0, le=1.0)
    # the round a per-round stage (02-05) works on: set by `reflectevo run` (it injects the evolve section);
    # null in a params file, and for stages 01 and 06
    round: int | None = Field(None, ge=1)

    @field_validator("generator")
    @classmethod
    def _known_generator(cls, value: str) -> str:
        if value not in GENERATOR_CHOICES:
            raise ValueError(
                f"unknown generator {value!r}{did_you_mean(value, GENERATOR_CHOICES)}; "
                f"choose one of {', '.join(GENERATOR_CHOICES)}"
            )
        return value

    @model_validator(mode="after")
    def _round_in_range(self) -> EvolveParams:
        if self.round is not None and self.rounds < 2:
            raise ValueError("round is only set in a run of several rounds (evolve.rounds >= 2); leave it null")
        if self.round is not None and self.round > self.rounds:
            raise ValueError(f"round {self.round} is beyond evolve.rounds ({self.rounds})")
        return self


class Params(Section):
    """All sections of a params file; each one defaults to its schema defaults."""

    run: RunParams = Field(default_factory=RunParams)
    model: ModelParams = Field(default_factory=ModelParams)
    generation: GenerationParams = Field(default_factory=GenerationParams)
    data: DataParams = Field(default_factory=DataParams)
    reflect: ReflectParams = Field(default_factory=ReflectParams)
    sft: SFTParams = Field(default_factory=SFTParams)
    dpo: DPOParams = Field(default_factory=DPOParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    analysis: AnalysisParams = Field(default_factory=AnalysisParams)
    evolve: EvolveParams = Field(default_factory=EvolveParams)
    # set by runs.for_round on one round's params: the run's params they were made from (the round's seed and
    # model are applied; the run's own are kept here, to make another round's params from them)
    _run_params: Params | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _dpo_starts_from_a_trained_variant(self) -> Params:
        if self.dpo.start_from != "base" and self.dpo.start_from not in self.sft.modes:
            raise ValueError(
                f"dpo.start_from is {self.dpo.start_from!r}, which sft.modes {self.sft.modes} does not train; "
                "add it to sft.modes or set dpo.start_from: base"
            )
        if isinstance(self.eval.variants, list):
            trained = [*(f"sft/{m}" for m in self.sft.modes), *(f"dpo/{p}" for p in self.dpo.pairs)]
            if "two_stage" in self.sft.modes:
                trained.append(TWO_STAGE_REFLECTION_PHASE)
            untrained = [name for name in self.eval.variants if name not in (*BASELINES, *trained)]
            if untrained:
                raise ValueError(
                    f"eval.variants names {untrained}, which sft.modes / dpo.pairs do not train; "
                    "add them there or remove them from eval.variants"
                )
        if self.evolve.rounds >= 2:
            self._check_evolve()
        for key in (
            "fewshots",
            "second_trial",
            "attempt_calls",
            "attempt_prefill",
        ):  # left null: asked as the training inputs were
            if getattr(self.eval, key) is None:
                setattr(self.eval, key, getattr(self.reflect, key))
        if self.eval.attempt_prefill == "answer" and self.eval.attempt_calls != 2:
            raise ValueError(
                "eval.attempt_prefill 'answer' pre-fills call 2 of a two-call attempt: set eval.attempt_calls: 2"
            )
        mismatched = training_test_mismatches(self)
        if mismatched:
            raise ValueError(
                "settings that shape the training inputs differ from those that shape the test inputs: "
                + "; ".join(f"{name}: {why}" for name, why in mismatched.items())
                + ". Make them agree, or list the setting in eval.allow_mismatch if the recipe means it"
            )
        return self

    def _check_evolve(self) -> None:
        """What several rounds need from the other sections, refused before any work."""
        trained = [*(f"sft/{m}" for m in self.sft.modes), *(f"dpo/{p}" for p in self.dpo.pairs)]
        generator = self.evolve.generator
        if generator != "best_on_validation" and generator not in trained:
            raise ValueError(
                f"evolve.generator is {generator!r}, which sft.modes / dpo.pairs do not train; "
                "add it there, or use best_on_validation"
            )
        if self.evolve.protocol not in self.eval.protocols:
            raise ValueError(
                f"evolve.protocol {self.evolve.protocol!r} is not in eval.protocols {self.eval.protocols}: "
                "the stability table reports it on the eval split; add it there"
            )
        if isinstance(self.eval.variants, list):
            if "base" not in self.eval.variants:
                raise ValueError(
                    "several rounds (evolve.rounds >= 2) need 'base' in eval.variants: each round's first "
                    "answers and prompted reflection are the stability table's rows"
                )
            if generator != "best_on_validation" and generator not in self.eval.variants:
                raise ValueError(
                    f"evolve.generator {generator!r} is not in eval.variants; add it, its validation score "
                    "is recorded with every round"
                )

    @property
    def round_resolved(self) -> bool:
        """Whether these are one round's params as :func:`reflectevo.runs.for_round` made them."""
        return self._run_params is not None

    @property
    def run_params(self) -> Params:
        """The run's params: these, or the ones a round's params were made from."""
        return self._run_params if self._run_params is not None else self

    def to_dict(self) -> dict[str, Any]:
        """The resolved params, every default filled in (what the manifest records)."""
        return self.model_dump(mode="json")

    def hash(self) -> str:
        return canonical_hash(self.to_dict())

    def section_hash(self, paths: list[str] | tuple[str, ...]) -> str:
        """The hash of the named sections or dotted keys (``"data"``, ``"run.seed"``)."""
        resolved = self.to_dict()
        picked = {}
        for path in paths:
            value: Any = resolved
            for part in path.split("."):
                value = value[part]
            picked[path] = value
        return canonical_hash(picked)

    @property
    def run_dir(self) -> Path:
        """Where this run's stages write: ``outputs/<run>/``, or its round's folder for a per-round stage."""
        return self.top_run_dir / round_folder(self.evolve.round) if self.evolve.round else self.top_run_dir

    @property
    def top_run_dir(self) -> Path:
        """``outputs/<run>/``: the run's folder, holding every round's (stage 01, 06 and the manifest of the run)."""
        return Path(self.run.output_dir) / self.run.name


def training_test_mismatches(params: Params, *, allowed: bool = False) -> dict[str, str]:
    """Settings where the training inputs (stage 02's prompts, hence the SFT and DPO rows) and the test
    inputs (stage 05's prompts) would differ, each with the keys named: those not in
    ``eval.allow_mismatch``, or with ``allowed`` the ones the recipe lists there (what the record states)."""
    reflect, ev = params.reflect, params.eval
    found = {}
    if reflect.fewshots != ev.fewshots:
        found["fewshots"] = f"reflect.fewshots is {reflect.fewshots}, eval.fewshots is {ev.fewshots}"
    if reflect.second_trial != ev.second_trial:
        found["second_trial"] = (
            f"reflect.second_trial is {reflect.second_trial!r}, eval.second_trial is {ev.second_trial!r}"
        )
    if reflect.attempt_calls != ev.attempt_calls:
        found["attempt_calls"] = (
            f"reflect.attempt_calls is {reflect.attempt_calls}, eval.attempt_calls is {ev.attempt_calls}"
        )
    if reflect.attempt_prefill != ev.attempt_prefill:
        found["attempt_prefill"] = (
            f"reflect.attempt_prefill is {reflect.attempt_prefill!r}, eval.attempt_prefill is {ev.attempt_prefill!r}"
        )
    if reflect.grader not in ev.graders:
        found["grader"] = (
            f"reflect.grader is {reflect.grader!r}, which eval.graders {ev.graders} does not include "
            "(the oracle would show the reflector feedback of another grader than it was trained on)"
        )
    return {name: why for name, why in found.items() if (name in ev.allow_mismatch) == allowed}


def round_folder(round_number: int) -> str:
    return f"round_{round_number}"


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a params YAML file into its top-level sections (not yet validated)."""
    return read_sections(path, SECTIONS)


def load_params(path: str | Path | None = None, sections: Mapping[str, Any] | None = None) -> Params:
    """Validate a params file and/or sections into :class:`Params`.

    ``sections`` are top-level sections as papermill injects them; a non-empty one replaces the
    file's section whole (an empty dict or None means "not given"). Raises :class:`ConfigError`
    listing every problem with its key path.
    """
    raw: dict[str, Any] = dict(read_params_file(path)) if path is not None else {}
    source = str(path) if path is not None else "params"
    if sections is not None and not isinstance(sections, Mapping):
        raise ConfigError(
            f"sections must be a mapping of section name to keys ({', '.join(SECTIONS)}), got {type(sections).__name__}"
        )
    for name, value in (sections or {}).items():
        if name not in SECTIONS:
            raise ConfigError(
                f"unknown section {name!r}{did_you_mean(name, SECTIONS)}; the sections are {', '.join(SECTIONS)}"
            )
        if value is None or (isinstance(value, Mapping) and not value):
            continue
        raw[name] = value
    return validate_params(raw, source)


def validate_params(raw: Mapping[str, Any], source: str = "params") -> Params:
    for name, value in raw.items():
        if name in SECTIONS and value is None:
            raise ConfigError(f"{source}: section {name!r} is empty; remove it or give it keys")
    try:
        return Params.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def format_validation_error(exc: ValidationError, source: str) -> str:
    problems: dict[str, list[str]] = {}  # key path -> messages (a union type gives one per branch)
    for error in exc.errors():
        location = _schema_location(error["loc"])
        path = ".".join(str(part) for part in location) or "(top level)"
        if error["type"] == "extra_forbidden":
            parent = _fields_at(location[:-1])
            hint = did_you_mean(location[-1], parent)
            where = ".".join(str(p) for p in location[:-1]) or "the top level"
            message = f"unknown key{hint}; keys allowed in {where}: {', '.join(parent)}"
        else:
            message = error["msg"].removeprefix("Value error, ")
            got = error.get("input")
            if not isinstance(got, (dict, list)) and not message.endswith(")"):
                shown = repr(got)
                message += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        problems.setdefault(path, [])
        if message not in problems[path]:
            problems[path].append(message)
    lines = [f"{source}: {len(problems)} problem(s) in the params"]
    lines += [f"  {path}: {' -- or -- '.join(messages)}" for path, messages in problems.items()]
    return "\n".join(lines)


def _schema_location(loc: tuple[Any, ...]) -> list[Any]:
    """The key path of an error, without pydantic's union-branch tags (``int``, ``literal['auto']``)."""
    return [part for part in loc if not (isinstance(part, str) and _BRANCH_TAG.fullmatch(part))]


_BRANCH_TAG = re.compile(r"(int|float|str|bool|none|(list|dict|literal|tuple|set)\[.*\])")


def _fields_at(location: list[Any]) -> list[str]:
    """The keys allowed at a location of the schema, for "did you mean" and the allowed-keys list."""
    model: Any = Params
    for part in location:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model is not None else []
