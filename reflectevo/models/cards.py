"""What a Hub card may say about a base model: its hub id and licence where they are known, and a plain
description where they are not (a built-in or a local folder has no hub id, and none is invented)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reflectevo.models.builtin.smollm2 import HUB_ID as SMOLLM2_HUB_ID
from reflectevo.models.builtin.smollm2 import SMOLLM2, WEIGHTS_NOTE

# Licences of the bases the shipped recipes name (the Hub's licence identifiers).
KNOWN_LICENSES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3",
    "unsloth/llama-3-8b-Instruct": "llama3",
    "unsloth/llama-3-8b-Instruct-bnb-4bit": "llama3",
    "mistralai/Mistral-7B-Instruct-v0.2": "apache-2.0",
    "unsloth/mistral-7b-instruct-v0.2": "apache-2.0",
    "unsloth/mistral-7b-instruct-v0.2-bnb-4bit": "apache-2.0",
    SMOLLM2_HUB_ID: "apache-2.0",
}
BUILTIN_DESCRIPTIONS = {
    SMOLLM2: (f"`{SMOLLM2}`: {WEIGHTS_NOTE} (hub id of the original: {SMOLLM2_HUB_ID})", "apache-2.0"),
    "builtin:tiny": (
        "`builtin:tiny`: reflectevo's 4M-parameter stand-in, trained on the package's own prompts where the "
        "package is installed; a test fixture, not a research model, and not on the Hub",
        "apache-2.0",
    ),
}


@dataclass(frozen=True)
class BaseModelInfo:
    name: str  # as the params give it
    hub_id: str | None  # only for a hub id: the Hub's `base_model`
    license: str | None  # a Hub licence identifier, where known
    description: str  # one line for the card's body


def base_model_info(name: str) -> BaseModelInfo:
    """Card facts for ``model.name``: a hub id, a built-in, or a local folder."""
    if name in BUILTIN_DESCRIPTIONS:
        description, license = BUILTIN_DESCRIPTIONS[name]
        return BaseModelInfo(name, None, license, description)
    if name.startswith("builtin:"):
        return BaseModelInfo(name, None, None, f"`{name}`: random weights in a real model's shape (for benchmarks)")
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") != 1
    if looks_local:
        # a folder on the machine that trained: its path means nothing elsewhere, so only its name is given
        return BaseModelInfo(name, None, None, f"a local model folder named `{Path(name).name}`")
    return BaseModelInfo(name, name, KNOWN_LICENSES.get(name), f"[`{name}`](https://huggingface.co/{name})")


def model_card_metadata(info: BaseModelInfo, *, tags: list[str], datasets: list[str] | None = None) -> str:
    """The YAML block a Hub model card opens with, for a LoRA adapter of ``info``'s model: ``library_name:
    peft``, ``base_model`` only for a hub id, the base's licence where known, tags, and ``datasets`` when the
    caller knows Hub dataset ids (a push does; a run folder does not). ``tags`` follow reflectevo's own."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="peft",
        base_model=info.hub_id,
        license=info.license,
        pipeline_tag="text-generation",
        tags=["reflectevo", "self-reflection", "lora", *tags],
        datasets=datasets or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"
