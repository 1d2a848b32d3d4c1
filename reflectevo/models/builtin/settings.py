"""The settings of builtin:tiny: corpus sizes, shape, training; another seed from REFLECTEVO_TINY_SEED."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

# Bump when the build changes in a way the hash below cannot see (the training loop, the template).
BUILDER_VERSION = "tiny-2"

TINY = "builtin:tiny"


@dataclass(frozen=True)
class TinySettings:
    """Everything that shapes ``builtin:tiny`` besides its corpus. All of it goes into the cache key."""

    # model: the "M" size of the feasibility study (3.9 M parameters, 16 MB on disk)
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 8
    vocab_size: int = 2048
    # training: a fixed step count makes the build bit-reproducible (a time budget would not)
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1  # cosine decay down to this share of the peak
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float = 1.0
    max_row_tokens: int = 512  # longer rows are dropped: they cost time (judge prompts reach about 490)
    length_buckets: int = 4  # draw this many batches at once and group them by length: less padding
    seed: int = 0
    # corpus
    renders_per_item: int = 6  # answer renders per training item, each with its own thought
    gold_share: float = 0.6  # the rest are plausible wrong answers
    generic_examples: int = 320  # format-only examples on random text, split as GENERIC_SHARES says

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT_TINY = TinySettings()

# Builds builtin:tiny from another seed: a different corpus draw and training run, so a different
# model, as a build on another CPU is (float rounding differs between CPUs). Running the tests with
# it checks that no expectation depends on what one build of the stand-in happens to write.
TINY_SEED_ENV = "REFLECTEVO_TINY_SEED"


def default_tiny_settings() -> TinySettings:
    """:data:`DEFAULT_TINY`, with the seed of ``$REFLECTEVO_TINY_SEED`` when it is set."""
    configured = os.environ.get(TINY_SEED_ENV, "").strip()
    if not configured:
        return DEFAULT_TINY
    if not configured.isdigit():
        raise ValueError(f"{TINY_SEED_ENV} must be a non-negative integer seed, got {configured!r}")
    return dataclasses.replace(DEFAULT_TINY, seed=int(configured))
