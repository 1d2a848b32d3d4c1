"""The realistic length mix every benchmark in bench/ draws from.

Prompts are real: the paper's official test items of the four tasks, in the package's own
zero-shot attempt prompts (their token counts come from the model's tokenizer). Outputs of a
random-weight model are noise that never stops, so their lengths are imposed per record, drawn
around the mean lengths the paper reports for ReflectEvo-460K (arXiv 2505.16475, dataset
statistics figure): answer length at turn 1, reflection length, answer length at turn 2. The
paper does not state the unit; we read it as tokens. BIG-bench stands for the paper's other
categories (contextual and context-free QA, reading comprehension, commonsense, social, causal,
physics), whose means are averaged with their sample counts as weights.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# $REFLECTEVO_OFFICIAL_DATA, else the shared data folder beside the repository (as tests/conftest.py)
DEFAULT_OFFICIAL_DIR = Path(
    os.environ.get("REFLECTEVO_OFFICIAL_DATA") or REPO.parent / "shared" / "data" / "reflectevo-official"
)

STEPS = ("first_trial", "reflection", "second_trial")
# Mean generated tokens per record: (turn-1 answer, reflection, turn-2 answer), from the paper's table.
_CATEGORY_MEANS = {  # category: (Q&A-reflection samples, turn 1, reflection, turn 2)
    "logical": (164_746, 131, 238, 163),
    "math": (106_434, 267, 222, 299),
    "coding": (7_520, 187, 254, 202),
    "contextual_qa": (17_448, 91, 267, 119),
    "context_free_qa": (2_940, 118, 251, 135),
    "reading": (20_760, 82, 261, 116),
    "commonsense": (10_012, 158, 268, 159),
    "social": (11_404, 110, 252, 133),
    "causal": (3_212, 118, 259, 130),
    "physics": (468, 112, 256, 124),
}
_BIGBENCH = ("contextual_qa", "context_free_qa", "reading", "commonsense", "social", "causal", "physics")


def _weighted(categories: tuple[str, ...]) -> dict[str, int]:
    total = sum(_CATEGORY_MEANS[c][0] for c in categories)
    return {
        step: round(sum(_CATEGORY_MEANS[c][0] * _CATEGORY_MEANS[c][1 + i] for c in categories) / total)
        for i, step in enumerate(STEPS)
    }


OUTPUT_MEANS: dict[str, dict[str, int]] = {
    "logiqa": _weighted(("logical",)),
    "math": _weighted(("math",)),
    "mbpp": _weighted(("coding",)),
    "bigbench": _weighted(_BIGBENCH),
}
# Spread of one record's length around its mean: log-normal with this sigma (a long right tail, as
# generated text has), clipped to [MIN_TOKENS, SPREAD_CAP x mean].
SPREAD_SIGMA = 0.5
MIN_TOKENS = 8
SPREAD_CAP = 3.0


def output_length(task: str, step: str, rng: random.Random) -> int:
    """One record's imposed output length: log-normal around the task's mean for ``step``."""
    mean = OUTPUT_MEANS[task][step]
    # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2), so mu = ln(mean) - s^2 / 2 keeps the mean
    draw = math.exp(rng.gauss(math.log(mean) - SPREAD_SIGMA**2 / 2, SPREAD_SIGMA))
    return int(min(max(MIN_TOKENS, round(draw)), SPREAD_CAP * mean))


@dataclass(frozen=True)
class MixItem:
    """One official test item with the lengths it is given in a benchmark."""

    key: str
    task: str
    item: Any  # reflectevo.tasks Item
    first_trial: int  # imposed output lengths, tokens
    reflection: int
    second_trial: int


def official_mix(count: int, seed: int, folder: Path = DEFAULT_OFFICIAL_DIR) -> list[MixItem]:
    """A seeded sample of ``count`` official test items over the four tasks, in the paper's task
    proportions (LogiQA 45%, MATH 31%, MBPP 2%, BIG-bench 22% of ReflectEvo-460K's Q&A-reflection
    samples), each with its three imposed output lengths."""
    from reflectevo.tasks import get_task, task_names

    shares = {"logiqa": 0.45, "math": 0.31, "mbpp": 0.02, "bigbench": 0.22}
    rng = random.Random(seed)
    pools = {}
    for name in task_names():
        path = folder / f"{name}_test.jsonl"
        if not path.is_file():
            raise SystemExit(
                f"official test file not found: {path} (give the folder with --official-dir "
                "or set REFLECTEVO_OFFICIAL_DATA)"
            )
        pools[name] = list(get_task(name).load_official(path))
    names = sorted(pools)
    tasks = rng.choices(names, weights=[shares[n] for n in names], k=count)
    mix = []
    for i, name in enumerate(tasks):
        item = rng.choice(pools[name])
        lengths = [output_length(name, step, rng) for step in STEPS]
        mix.append(MixItem(f"{i:05d}-{name}-{item.id}", name, item, *lengths))
    return mix


def describe() -> dict[str, Any]:
    """The length table, for a benchmark's JSON."""
    return {
        "output_means_tokens": OUTPUT_MEANS,
        "spread": {
            "distribution": "log-normal, mean kept",
            "sigma": SPREAD_SIGMA,
            "min": MIN_TOKENS,
            "cap_x_mean": SPREAD_CAP,
        },
        "source": "ReflectEvo-460K statistics (arXiv 2505.16475); prompts: official test items",
    }
