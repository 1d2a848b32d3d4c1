"""builtin:random-1b and builtin:random-8b: random weights in real shapes, for memory and speed measurements."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reflectevo.errors import ModelLoadError
from reflectevo.models.builtin.build import _build_once
from reflectevo.models.builtin.settings import TINY
from reflectevo.models.builtin.smollm2 import SMOLLM2
from reflectevo.models.builtin.tokenizer import LLAMA3_VOCAB_SIZE, llama3_vocab_tokenizer
from reflectevo.models.cache import cache_dir

RANDOM_1B = "builtin:random-1b"
RANDOM_8B = "builtin:random-8b"
RANDOM_INIT_SEED = 0

# The shapes of Llama-3.2-1B and Llama-3-8B (their config.json values), with Llama 3's vocabulary size.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    RANDOM_1B: {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
    },
    RANDOM_8B: {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "rms_norm_eps": 1e-5,
    },
}
BUILTIN_MODELS = (TINY, SMOLLM2, RANDOM_1B, RANDOM_8B)


def random_model_config(name: str, tokenizer=None):
    """The LlamaConfig of a random built-in; token ids come from ``tokenizer`` when given."""
    from transformers import LlamaConfig

    if name not in RANDOM_SHAPES:
        raise ModelLoadError(f"{name!r} is not a random built-in model; known: {', '.join(RANDOM_SHAPES)}")
    ids = {}
    if tokenizer is not None:
        ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    return LlamaConfig(vocab_size=LLAMA3_VOCAB_SIZE, **RANDOM_SHAPES[name], **ids)


def random_model_info(name: str) -> dict[str, Any]:
    return {
        "note": "random weights with a real model's shape: for speed and memory measurements only; it never stops by itself",
        "shape": RANDOM_SHAPES[name],
        "vocab_size": LLAMA3_VOCAB_SIZE,
        "seed": RANDOM_INIT_SEED,
    }


def random_model(name: str, device: str = "cpu", dtype: str = "float32", seed: int = RANDOM_INIT_SEED):
    """A random-init model of a real shape, created directly on ``device`` in ``dtype`` (never saved).

    Returns ``(model, tokenizer)``. The outputs are noise and do not end: pass ``max_new_tokens``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = llama3_vocab_tokenizer()
    config = random_model_config(name, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def random_model_dir(name: str, dtype: str = "bfloat16", seed: int = RANDOM_INIT_SEED) -> Path:
    """A random built-in saved to disk (``cache_dir()/models``), for loaders that read weights from a
    folder, such as Unsloth's. The same seed gives the same weights as :func:`random_model`, so both
    backends of a benchmark train and generate with identical models. Written once, atomically
    (about 2.5 GB for random-1b and 16 GB for random-8b in 16-bit)."""
    vocabulary = Path(llama3_vocab_tokenizer().name_or_path).name
    final = cache_dir() / "models" / f"{name.removeprefix('builtin:')}-{dtype}-seed{seed}-{vocabulary}"

    def build(staging: Path) -> None:
        model, tokenizer = random_model(name, device="cpu", dtype=dtype, seed=seed)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _build_once(final, "config.json", f"{name} saved to {final}", build)
