"""LoRA adapters: configuration, the model prepared for training, digests, merging, model cards."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reflectevo.config import Params
from reflectevo.core.files import atomic_directory
from reflectevo.runs.rundir import RunDir

if TYPE_CHECKING:
    from reflectevo.config import LoraParams, ModelParams

from reflectevo.errors import TrainingError
from reflectevo.models.loading import load_model


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


# ---- models --------------------------------------------------------------------------------------
def lora_config(lora: LoraParams):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def prepare_model(
    model_params: ModelParams, lora: LoraParams, gradient_checkpointing: bool, seed: int, adapter: Path | None = None
):
    """The model to train: a new LoRA adapter on the base model, or ``adapter`` loaded trainable (the
    correction phase continues the reflection phase's adapter). Returns the LoadedModel."""
    from transformers import set_seed

    set_seed(seed)  # the adapter's initial weights
    loaded = load_model(
        model_params.model_copy(update={"adapter": str(adapter) if adapter else None}), for_training=True
    )
    loaded.tokenizer.padding_side = "right"  # training pads on the right; generation set it to left
    if adapter is not None:
        return loaded
    if loaded.backend == "unsloth":
        from unsloth import FastLanguageModel

        loaded.model = FastLanguageModel.get_peft_model(
            loaded.model,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias="none",
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=seed,
        )
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

    dtype = "bfloat16" if model_params.load_in_4bit and model_params.dtype == "auto" else model_params.dtype
    plain = model_params.model_copy(
        update={"load_in_4bit": False, "adapter": str(adapter), "backend": "transformers", "dtype": dtype}
    )
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


def sort_adapter_config(folder: Path) -> None:
    """Sort the module lists PEFT keeps as sets: it writes them in hash order, which changes from one
    Python process to the next, so the same adapter would not be the same bytes."""
    for path in folder.rglob("adapter_config.json"):  # DPO also saves its reference adapter in ref/
        config = json.loads(path.read_text(encoding="utf-8"))
        for key in ("target_modules", "exclude_modules"):
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
        path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")  # as PEFT writes it


def adapter_folders(phases: Sequence[tuple[str, str]]) -> dict[str, str]:
    """phase -> the folder of its adapter in the variant's folder: ``adapter`` for the last phase (the
    variant's final adapter), ``<phase>_adapter`` for each earlier one (two_stage: ``reflection_adapter``)."""
    return {
        phase: "adapter" if index == len(phases) - 1 else f"{phase}_adapter" for index, (phase, _) in enumerate(phases)
    }


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
        raise TrainingError(
            f"dpo.start_from is {mode!r}, but stage 03_sft has not finished with that variant in "
            f"{params.run_dir} (no {adapter}); run stage 03 first (reflectevo run PARAMS --from 03)"
        )
    merged = params.run_dir / "dpo" / "start" / f"{mode}-{entry['identity'][:12]}"
    if main and not (merged / "config.json").is_file():
        merge_adapter(
            params.model,
            adapter,
            merged,
            f"# {params.model.name} + SFT adapter {mode}, merged for DPO\n\nSFT stage identity {entry['identity']}\n",
        )
    wait_for(merged / "config.json", "the merged SFT model")
    return params.model.model_copy(
        update={"name": str(merged), "adapter": None}
    ), f"{merged} ({params.model.name} + SFT {mode})"
