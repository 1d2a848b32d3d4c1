"""One training phase with TRL: batching, arguments, the trainer, checkpoints and resume."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo.config import Params, TrainParams
from reflectevo.core import live
from reflectevo.core.files import atomic_write_json, replace_directory
from reflectevo.core.seeds import derive_seed

if TYPE_CHECKING:
    import datasets

    from reflectevo.config import ModelParams

from reflectevo.errors import TrainingError
from reflectevo.models.loading import load_tokenizer
from reflectevo.training.adapters import lora_digest, prepare_model, process_rank, sort_adapter_config
from reflectevo.training.datasets import RowScreening, prompt_lengths, question_keys, row_lengths, split_off

log = logging.getLogger(__name__)
# Files a checkpoint must hold to be resumed from; the trainer writes trainer_state.json last.
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
FIRST_BATCHES = 4  # fingerprints of the first training batches each process records


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
        why = (
            "the attention kernel takes the concatenated rows natively"
            if native
            else f"{attention} attention: transformers masks each row off from the others by its position ids "
            "(same loss as padded), attention computed over the whole concatenated batch"
        )
        return Batching("padding_free", requested, attention, why)
    if native:
        return Batching(
            "padding_free", requested, attention, f"auto: {attention} attention takes concatenated rows natively"
        )
    return Batching(
        "padded",
        requested,
        attention,
        f"auto: {attention} attention has no per-row kernel for concatenated rows here "
        "(set sft.batching to length_grouped or padding_free to reduce padding anyway)",
    )


def use_padding_free(trainer: Any, backend: str) -> None:
    """Switch a built SFT trainer to padding-free batches. The trainer is built padded, so that TRL
    prepares the rows exactly as for padded batches (cut to max_length, rows without a trained token
    dropped: it refuses padding_free with max_length at construction); only the collation changes."""
    collator = trainer.data_collator
    if not hasattr(collator, "padding_free"):
        raise TrainingError(
            f"padding-free batches need TRL's language-modelling collator, and this trainer has "
            f"{type(collator).__name__}; set sft.batching to padded or length_grouped"
        )
    collator.padding_free = True
    trainer.padding_free = True
    if backend == "unsloth":
        try:  # the row lengths Unsloth's attention kernels read (what it does itself for padding_free=True)
            from unsloth.utils import enable_padding_free_metadata
        except ImportError as exc:
            raise TrainingError(
                "this Unsloth release has no padding-free batches (unsloth.utils."
                "enable_padding_free_metadata); upgrade it, or set sft.batching to padded"
            ) from exc
        enable_padding_free_metadata(trainer.model, trainer)


# ---- trainer -------------------------------------------------------------------------------------
def training_arguments(
    kind: str,
    train: TrainParams,
    out_dir: Path,
    *,
    seed: int,
    device: str,
    dtype: str,
    has_eval: bool,
    eval_on_start: bool = False,
    beta: float | None = None,
    precompute_ref: bool = False,
    batching: str = "padded",
):
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


def make_trainer(
    kind: str,
    loaded: Any,
    args: Any,
    train_set: datasets.Dataset,
    eval_sets: dict[str, datasets.Dataset],
    callbacks: tuple = (),
    batching: str = "padded",
):
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
    trainer = trainer_class(
        model=loaded.model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sets or None,
        processing_class=loaded.tokenizer,
        callbacks=list(callbacks),
        **extra,
    )
    trainer.first_batches = []
    if kind == "sft" and batching == "padding_free":
        use_padding_free(trainer, loaded.backend)
    return trainer


def live_callback(label: str):
    """A callback that sends each logged step (loss, held-out loss) to `reflectevo run`'s terminal."""
    from transformers import TrainerCallback

    class LiveLines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            shown = {key: value for key, value in (logs or {}).items() if "loss" in key and isinstance(value, float)}
            if shown:
                values = ", ".join(f"{key} {value:.4f}" for key, value in shown.items())
                live.report("train", f"{label}: step {state.global_step}/{state.max_steps}, {values}")

    return LiveLines()


def last_complete_checkpoint(folder: Path, main: bool) -> Path | None:
    """The newest checkpoint that holds every file a resume needs; newer, incomplete ones (a process
    killed while saving) are removed by the main process, as they cannot be resumed from."""

    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()),
        key=lambda p: int(p.name.split("-")[1]),
        reverse=True,
    )
    for checkpoint in checkpoints:
        if all((checkpoint / name).is_file() for name in CHECKPOINT_FILES):
            return checkpoint
        if main:
            log.warning(
                "removing incomplete checkpoint %s (missing %s)",
                checkpoint,
                [n for n in CHECKPOINT_FILES if not (checkpoint / n).is_file()],
            )
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


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
        return {
            "variant": self.variant,
            "phase": self.phase,
            "dataset": self.dataset,
            "adapter": str(self.adapter),
            "metrics": self.metrics,
            "log_history": self.log_history,
        }


BOOKKEEPING = (
    "_runtime",
    "_samples_per_second",
    "_steps_per_second",
    "_preparation_time",
    "num_tokens",
    "num_input_tokens_seen",
    "epoch",
    "step",
)


def named_eval_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """One evaluation's metrics named after its set: ``eval_heldout_loss`` -> ``heldout_loss``. TRL
    logs its own metrics (``eval_rewards/margins``, ``eval_entropy``) without the set's name, so they
    are only told apart by the loss key logged with them, one evaluation per set."""
    names = [key[len("eval_") : -len("_loss")] for key in entry if key.startswith("eval_") and key.endswith("_loss")]
    if len(names) != 1:
        return {}
    name = names[0]
    named = {}
    for key, value in entry.items():
        if not key.startswith("eval_") or key.endswith(BOOKKEEPING):
            continue
        short = key[len("eval_") :]
        named[short if short.startswith(f"{name}_") else f"{name}_{short}"] = value
    return named


def before_after(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The evaluation metrics before and after training, side by side."""
    return {key: {"before": before.get(key), "after": after.get(key)} for key in sorted(set(before) | set(after))}


def train_phase(
    *,
    kind: str,
    variant: str,
    phase: str,
    dataset_name: str,
    params: Params,
    train: TrainParams,
    model_params: ModelParams,
    phase_dir: Path,
    adapter_in: Path | None,
    callbacks: tuple = (),
    seed: int,
    rows: datasets.Dataset,
    screening: RowScreening,
    heldout: dict[str, Any],
) -> PhaseResult:
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
        eval_sets["train_sample"] = train_set.shuffle(seed=derive_seed(seed, "reward-check") % 2**32).select(
            range(count)
        )

    # lengths first, with the tokenizer alone: a set that cannot train stops before the model loads

    tokenizer = load_tokenizer(model_params)
    lengths = row_lengths(tokenizer, train_set, ("chosen", "rejected") if kind == "dpo" else ("completion",))
    too_long = sum(length > train.max_length for length in lengths)
    dropped = 0
    if kind == "dpo":  # TRL drops a pair whose prompt alone fills max_length (nothing of it would be trained)
        dropped = sum(length >= train.max_length for length in prompt_lengths(tokenizer, train_set))
        if dropped == len(train_set):
            raise TrainingError(
                f"every prompt of {dataset_name} is at least dpo.max_length ({train.max_length}) tokens "
                "long, so TRL would drop every pair; raise dpo.max_length"
            )

    loaded = prepare_model(model_params, train.lora, train.gradient_checkpointing, seed, adapter=adapter_in)
    tokenizer = loaded.tokenizer
    phase_dir.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(phase_dir, main)
    batching = (
        choose_batching(train.batching, loaded)
        if kind == "sft"
        else Batching("padded", "padded", attention_implementation(loaded), "TRL's DPO trainer pads its batches")
    )
    args = training_arguments(
        kind,
        train,
        phase_dir,
        seed=seed,
        device=loaded.device,
        dtype=loaded.dtype,
        has_eval=bool(eval_sets),
        eval_on_start=bool(eval_sets) and resume is None,
        beta=train.beta if kind == "dpo" else None,
        precompute_ref=train.precompute_ref_log_probs if kind == "dpo" else False,
        batching=batching.mode,
    )
    if live.enabled() and main:
        callbacks = (*callbacks, live_callback(f"train {kind} {variant}, {phase}"))
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
    before = {
        key: value
        for entry in trainer.state.log_history
        if entry.get("step") == 0
        for key, value in named_eval_metrics(entry).items()
    }
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
        "kind": kind,
        "variant": variant,
        "phase": phase,
        "dataset": dataset_name,
        "rows": {
            "in_training_set": screening.rows,
            "kept": len(rows),
            "train": len(train_set),
            "heldout": len(heldout_set) if heldout_set is not None else 0,
            "train_questions": len(question_keys(train_set)),
        },
        "rows_dropped": screening.counts(),
        "rows_dropped_examples": screening.examples,
        "heldout_questions": heldout,
        "rows_longer_than_max_length": too_long,
        "max_length": train.max_length,
        "pairs_dropped_prompt_too_long": dropped if kind == "dpo" else None,
        "row_tokens": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 3),
        "resumed_from": resume.name if resume else None,
        "train_seconds": round(seconds, 2),
        "tokens": tokens,
        "tokens_per_s": round((tokens - tokens_at_start) / seconds, 1) if seconds else None,
        "world_size": world,
        "backend": loaded.backend,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "batching": batching.to_dict(),
        "train_loss": sum(logged) / len(logged) if logged else None,  # mean of the logged training losses
        "evaluation": before_after(before, after),
        "adapter_sha256_of_tensors": digest,
        "seed": seed,
        "model": loaded.name,
        "model_source": loaded.source,
        "started_from_adapter": str(adapter_in) if adapter_in else None,
    }
    ranks = phase_dir / "ranks"
    ranks.mkdir(exist_ok=True)
    atomic_write_json(
        ranks / f"rank-{rank}.json",
        {
            "rank": rank,
            "world_size": world,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "backend": _process_group_backend(),
            "first_batches": trainer.first_batches,
            "adapter_sha256_of_tensors": digest,
            "torch_threads": _threads(),
        },
    )
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
